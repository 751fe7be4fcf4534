r"""Conditional flow matching with straight (optimal-transport) paths.

Lipman, Chen, Ben-Hamu, Nickel, Le, "Flow Matching for Generative Modeling", ICLR 2023,
arXiv:2210.02747, section 4.1 (the OT path), with :math:`t = 0` noise and :math:`t = 1` data.
A data point :math:`x_1` and a Gaussian draw :math:`x_0 \sim \mathcal N(0, I)` define the path

.. math::

    \psi_t = \big(1 - (1 - \sigma_\min)\,t\big)\,x_0 + t\,x_1,\qquad
    u_t = \frac{d\psi_t}{dt} = x_1 - (1 - \sigma_\min)\,x_0,

and the network :math:`v_\theta(x, t)` is trained on
:math:`\mathbb E_{t, x_0, x_1}\lVert v_\theta(\psi_t, t) - u_t\rVert^2`, whose minimiser is the
marginal velocity field that carries :math:`\mathcal N(0, I)` to the data distribution.
Sampling integrates :math:`dx/dt = v_\theta(x, t)` from 0 to 1 with Euler (one call per step)
or a second-order rule (midpoint or Heun, two calls per step;
:mod:`pcshower.models.samplers`). Straight paths make the field nearly constant along a
trajectory, which is why few steps suffice.

``time``: the training times are uniform on [0, 1], or logit-normal
(:math:`t = \mathrm{sigmoid}(m + s\,n)`, Esser et al. arXiv:2403.03206, section 3.1), which spends
the network's capacity on the middle of the path. The network sees :math:`t` as its time feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pcshower.models.objectives.edm import check_sampler
from pcshower.models.samplers import ODE_SOLVERS

__all__ = ["FlowMatching"]


@dataclass(frozen=True)
class FlowMatching:
    """Flow-matching hyper-parameters: ``sigma_min`` (the width the path keeps at the data end),
    ``time`` (``"uniform"`` or ``"logit_normal"``) and the logit-normal's ``logit_mean`` and
    ``logit_std``."""

    sigma_min: float = 1.0e-4
    time: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    name = "flow_matching"
    samplers = ("euler", "midpoint", "heun")

    def __post_init__(self):
        if self.time not in ("uniform", "logit_normal"):
            raise ValueError(f"flow_matching.time must be 'uniform' or 'logit_normal', got "
                             f"{self.time!r}")
        if not 0 <= self.sigma_min < 1:
            raise ValueError(f"flow_matching.sigma_min must be in [0, 1), got {self.sigma_min}")
        if not self.logit_std > 0:
            raise ValueError(f"flow_matching.logit_std must be > 0, got {self.logit_std}")

    def sample_time(self, n: int, generator: torch.Generator | None = None, device=None):
        """``n`` training times in [0, 1]."""
        if self.time == "uniform":
            return torch.rand(n, generator=generator, device=device)
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def path(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        """``(psi_t, u_t)`` for data ``x1``, noise ``x0`` and per-row times ``t [P, 1]``."""
        a = 1 - (1 - self.sigma_min) * t
        return a * x0 + t * x1, x1 - (1 - self.sigma_min) * x0

    def loss(self, net, x: torch.Tensor, batch: torch.Tensor, n_showers: int,
             generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             **_) -> torch.Tensor:
        """Mean squared velocity error over points; ``t`` per shower (default: drawn)."""
        if t is None:
            t = self.sample_time(n_showers, generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        psi, target = self.path(x, noise, t[batch, None].to(x.dtype))
        return ((net(psi, t.to(x.dtype)) - target) ** 2).mean()

    def network_calls(self, sampler: str, steps: int) -> int:
        check_sampler(self, sampler)
        return int(steps) * (1 if sampler == "euler" else 2)

    def sample(self, net, shape: tuple, batch: torch.Tensor, n_showers: int, steps: int,
               sampler: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Points of ``shape`` carried from Gaussian noise at t = 0 to t = 1 in ``steps``
        uniform steps."""
        check_sampler(self, sampler)
        if int(steps) < 1:
            raise ValueError(f"the number of sampler steps must be >= 1, got {steps}")
        dev = batch.device
        ts = torch.linspace(0.0, 1.0, int(steps) + 1, device=dev)
        x = torch.randn(shape, generator=generator, device=dev)

        def velocity(x, t):
            return net(x, t.expand(n_showers))

        return ODE_SOLVERS[sampler](velocity, x, ts)
