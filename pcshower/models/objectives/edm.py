r"""EDM continuous-time diffusion: preconditioning, training noise distribution, loss weighting
and sampling.

Karras, Aittala, Aila, Laine, arXiv:2206.00364, Table 1 ("EDM" column), as used for point
clouds by CaloClouds II (Buhmann et al., arXiv:2309.05704). With the raw network
:math:`F_\theta`, the denoiser is

.. math::

    D_\theta(x;\sigma) = c_\mathrm{skip}(\sigma)\,x + c_\mathrm{out}(\sigma)\,
        F_\theta\big(c_\mathrm{in}(\sigma)\,x;\ c_\mathrm{noise}(\sigma)\big),\quad
    c_\mathrm{skip} = \frac{\sigma_d^2}{\sigma^2+\sigma_d^2},\
    c_\mathrm{out} = \frac{\sigma\sigma_d}{\sqrt{\sigma^2+\sigma_d^2}},\
    c_\mathrm{in} = \frac{1}{\sqrt{\sigma^2+\sigma_d^2}},\
    c_\mathrm{noise} = \tfrac14\ln\sigma,

trained with :math:`\ln\sigma \sim \mathcal N(P_\mathrm{mean}, P_\mathrm{std}^2)` and the loss
:math:`\lambda(\sigma)\,\lVert D_\theta(x+\sigma n;\sigma) - x\rVert^2`,
:math:`\lambda = (\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2`. Samples integrate the
probability-flow ODE from :math:`\sigma_\max` to 0 (:mod:`pcshower.models.samplers`).

Every objective of :mod:`pcshower.models.objectives` works on a raw network callable
``net(x_in, t)`` (points ``[P, D]``, one time feature per shower ``[B]``) and the point-to-shower
index ``batch``; the network sees the time feature among its conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pcshower.models.samplers import SAMPLERS, karras_sigmas

__all__ = ["EDM"]


@dataclass(frozen=True)
class EDM:
    """EDM hyper-parameters (defaults from arXiv:2206.00364; ``sigma_data = 1`` because pcshower
    standardises every point feature to unit variance)."""

    sigma_data: float = 1.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    name = "edm"
    #: the samplers this objective's networks are integrated with (the first is the default)
    samplers = ("heun", "euler")

    def coefficients(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (any shape)."""
        sd2 = self.sigma_data ** 2
        total = sigma ** 2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None):
        """``n`` training noise levels, log-normal."""
        z = torch.randn(n, generator=generator, device=device)
        return (self.p_mean + self.p_std * z).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def denoise(self, net, x: torch.Tensor, sigma: torch.Tensor,
                batch: torch.Tensor) -> torch.Tensor:
        """:math:`D(x;\\sigma)` from the raw network, ``sigma`` per shower ``[B]``."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip[batch, None] * x + c_out[batch, None] * net(x * c_in[batch, None], c_noise)

    def loss(self, net, x: torch.Tensor, batch: torch.Tensor, n_showers: int,
             generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
             **_) -> torch.Tensor:
        """Weighted denoising loss, mean over points; ``sigma`` per shower (default: drawn)."""
        if sigma is None:
            sigma = self.sample_sigma(n_showers, generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        d = self.denoise(net, x + sigma[batch, None] * noise, sigma, batch)
        w = self.loss_weight(sigma)[batch]
        return (w * ((d - x) ** 2).mean(1)).mean()

    def network_calls(self, sampler: str, steps: int) -> int:
        """Network calls of ``sampler`` over ``steps`` steps (Heun: 2N - 1, its last step Euler)."""
        check_sampler(self, sampler)
        return int(steps) if sampler == "euler" else 2 * int(steps) - 1

    def sample(self, net, shape: tuple, batch: torch.Tensor, n_showers: int, steps: int,
               sampler: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clean points of ``shape`` (``[P, D]``, shower index ``batch``) from Gaussian noise at
        ``sigma_max``."""
        check_sampler(self, sampler)
        dev = batch.device
        sigmas = karras_sigmas(int(steps), self.sigma_min, self.sigma_max, self.rho, device=dev)
        x = torch.randn(shape, generator=generator, device=dev) * sigmas[0]

        def denoiser(x, sigma):
            return self.denoise(net, x, sigma.expand(n_showers), batch)

        return SAMPLERS[sampler](denoiser, x, sigmas)


def check_sampler(objective, sampler: str) -> None:
    """Refuse a sampler the objective has none of, naming those it has."""
    if sampler not in objective.samplers:
        raise ValueError(f"unknown sampler {sampler!r} for the {objective.name!r} objective; "
                         f"choose one of {list(objective.samplers)}")
