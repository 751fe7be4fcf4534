r"""EDM continuous-time diffusion: preconditioning, training noise distribution and loss weighting.

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
:math:`\lambda = (\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
