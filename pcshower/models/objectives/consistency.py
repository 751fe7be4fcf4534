r"""Consistency models: one- and few-step sampling, distilled from an EDM teacher or trained alone.

Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023, arXiv:2303.01469, as used for
calorimeter showers by CaloClouds II (Buhmann et al., arXiv:2309.05704: EDM teacher, Heun
steps of the teacher's ODE, one network call per shower). A consistency function maps any point
of a probability-flow ODE trajectory straight to its end at :math:`\sigma_\min`:

.. math::

    f_\theta(x, \sigma) = c_\mathrm{skip}(\sigma)\,x + c_\mathrm{out}(\sigma)\,
        F_\theta\big(c_\mathrm{in}(\sigma)\,x;\ \tfrac14\ln\sigma\big),\quad
    c_\mathrm{skip} = \frac{\sigma_d^2}{(\sigma-\sigma_\min)^2+\sigma_d^2},\
    c_\mathrm{out} = \frac{(\sigma-\sigma_\min)\,\sigma_d}{\sqrt{\sigma^2+\sigma_d^2}},\
    c_\mathrm{in} = \frac{1}{\sqrt{\sigma^2+\sigma_d^2}}

(arXiv:2303.01469, appendix C), so :math:`f_\theta(x, \sigma_\min) = x` holds by construction
and, with the same :math:`c_\mathrm{in}, c_\mathrm{noise}` as EDM, a student starts from its
teacher's weights. Training discretises :math:`[\sigma_\min, \sigma_\max]` into ``bins``
Karras levels :math:`t_1 < \dots < t_N` (eq. 5 of arXiv:2206.00364), draws
:math:`n \sim U\{1..N-1\}` per shower and minimises

.. math::

    \big\lVert f_\theta(x + t_{n+1} z,\ t_{n+1}) - f_{\theta^-}(\hat x_n,\ t_n) \big\rVert^2,

- **distillation** (CD, Algorithm 2): :math:`\hat x_n` is one Heun step of the teacher's ODE
  from :math:`x + t_{n+1} z` down to :math:`t_n` (two teacher calls);
- **training** (CT, Algorithm 3): :math:`\hat x_n = x + t_n z`, the same noise draw, no teacher.

:math:`\theta^-` is a stop-gradient copy of the weights: their exponential moving average with
``target_decay`` (CD used 0.95), or the current weights themselves with ``target_decay = 0``
(improved consistency training, Song & Dhariwal, arXiv:2310.14189, section 3.2).

Sampling (Algorithm 1): :math:`x = f_\theta(\sigma_\max z, \sigma_\max)`; each further step
re-noises to the next level :math:`\tau` (:math:`x + \sqrt{\tau^2 - \sigma_\min^2}\, z`) and
applies :math:`f_\theta` again: one network call per step. The levels of an ``s``-step sample
are the first ``s`` of the ``s + 1`` Karras levels from :math:`\sigma_\max` to
:math:`\sigma_\min` (the last, :math:`\sigma_\min`, would return its input unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pcshower.models.objectives.edm import check_sampler
from pcshower.models.samplers import karras_sigmas, sample_consistency

__all__ = ["Consistency"]


@dataclass(frozen=True)
class Consistency:
    """Consistency-model hyper-parameters. ``sigma_*``/``rho``/``sigma_data``: the noise range
    and schedule (a distilled model takes them from its EDM teacher); ``bins``: N, the number of
    discretisation levels in training (18 in arXiv:2303.01469 for CIFAR-10); ``mode``:
    ``"distillation"`` (needs a teacher) or ``"training"``; ``target_decay``: EMA rate of the
    target weights (0: the current weights)."""

    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    bins: int = 18
    mode: str = "distillation"
    target_decay: float = 0.0

    name = "consistency"
    samplers = ("multistep",)

    def __post_init__(self):
        if self.mode not in ("distillation", "training"):
            raise ValueError(f"consistency.mode must be 'distillation' or 'training', got "
                             f"{self.mode!r}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"consistency.bins must be a whole number >= 2, got {self.bins!r}")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"consistency.target_decay must be in [0, 1), got {self.target_decay}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"consistency needs 0 < sigma_min < sigma_max, got "
                             f"{self.sigma_min}, {self.sigma_max}")

    def coefficients(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` of the consistency parametrisation."""
        sd2 = self.sigma_data ** 2
        shifted = sigma - self.sigma_min
        return (sd2 / (shifted ** 2 + sd2), shifted * self.sigma_data / (sigma ** 2 + sd2).sqrt(),
                1 / (sigma ** 2 + sd2).sqrt(), sigma.log() / 4)

    def function(self, net, x: torch.Tensor, sigma: torch.Tensor, batch: torch.Tensor):
        """:math:`f_\\theta(x, \\sigma)`, ``sigma`` per shower ``[B]``."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip[batch, None] * x + c_out[batch, None] * net(x * c_in[batch, None], c_noise)

    def levels(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The training discretisation :math:`t_1 < \\dots < t_N` (ascending)."""
        return karras_sigmas(self.bins, self.sigma_min, self.sigma_max, self.rho, device=device,
                             dtype=dtype)[:-1].flip(0)

    def loss(self, net, x: torch.Tensor, batch: torch.Tensor, n_showers: int,
             generator: torch.Generator | None = None, teacher=None, target=None,
             n: torch.Tensor | None = None, **_) -> torch.Tensor:
        """Consistency loss, mean over points. ``teacher(x, sigma[B])``: the EDM teacher's
        denoiser (distillation); ``target``: the raw network of :math:`\\theta^-` (default:
        ``net`` without gradient); ``n``: the level index per shower in [0, bins - 2]
        (default: drawn)."""
        if self.mode == "distillation" and teacher is None:
            raise ValueError("consistency distillation needs the teacher's denoiser "
                             "(train.teacher)")
        t = self.levels(x.device, x.dtype)
        if n is None:
            n = torch.randint(self.bins - 1, (n_showers,), generator=generator).to(x.device)
        t_n, t_next = t[n], t[n + 1]
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x_next = x + t_next[batch, None] * z
        with torch.no_grad():
            if self.mode == "distillation":
                x_hat = _heun_step(teacher, x_next, t_next, t_n, batch)
            else:
                x_hat = x + t_n[batch, None] * z
            goal = self.function(target or net, x_hat, t_n, batch)
        return ((self.function(net, x_next, t_next, batch) - goal) ** 2).mean()

    def network_calls(self, sampler: str, steps: int) -> int:
        check_sampler(self, sampler)
        return int(steps)

    def sample_levels(self, steps: int, device=None) -> torch.Tensor:
        """The noise levels of a ``steps``-step sample, from ``sigma_max`` down."""
        if int(steps) < 1:
            raise ValueError(f"the number of sampler steps must be >= 1, got {steps}")
        if int(steps) == 1:
            return torch.tensor([self.sigma_max], device=device)
        return karras_sigmas(int(steps) + 1, self.sigma_min, self.sigma_max, self.rho,
                             device=device)[:int(steps)]

    def sample(self, net, shape: tuple, batch: torch.Tensor, n_showers: int, steps: int,
               sampler: str = "multistep",
               generator: torch.Generator | None = None) -> torch.Tensor:
        check_sampler(self, sampler)
        dev = batch.device
        levels = self.sample_levels(steps, dev)
        x = torch.randn(shape, generator=generator, device=dev) * levels[0]

        def consistency_fn(x, sigma):
            return self.function(net, x, sigma.expand(n_showers), batch)

        return sample_consistency(consistency_fn, x, levels, self.sigma_min, generator)


def _heun_step(denoiser, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor,
               batch: torch.Tensor) -> torch.Tensor:
    """One Heun step of the EDM probability-flow ODE from per-shower levels ``s`` to ``s_next``
    (both > 0): the teacher's update in consistency distillation."""
    h = (s_next - s)[batch, None]
    d = (x - denoiser(x, s)) / s[batch, None]
    x_euler = x + h * d
    d_next = (x_euler - denoiser(x_euler, s_next)) / s_next[batch, None]
    return x + 0.5 * h * (d + d_next)
