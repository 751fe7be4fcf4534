"""Noise schedules and ODE samplers, as plain functions of a denoiser (EDM) or velocity (flow
matching) callable.

The denoiser is any callable ``denoiser(x, sigma) -> D(x; sigma)`` returning the estimate of the
clean sample; ``sigma`` is a 0-d tensor. Formulas from Karras, Aittala, Aila, Laine, "Elucidating
the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, arXiv:2206.00364.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["karras_sigmas", "sample_euler", "sample_heun", "SAMPLERS", "network_calls", "ode_euler",
           "ode_midpoint", "ode_heun", "ODE_SOLVERS", "sample_consistency"]


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    r"""The EDM noise levels (arXiv:2206.00364, eq. 5), with a final 0 appended:

    .. math:: \sigma_i = \big(\sigma_\max^{1/\rho} + \tfrac{i}{N-1}(\sigma_\min^{1/\rho}
              - \sigma_\max^{1/\rho})\big)^\rho,\quad i = 0..N-1,\qquad \sigma_N = 0.

    ``steps = 1`` gives ``[sigma_max, 0]`` (one denoising step).
    """
    if int(steps) < 1:
        raise ValueError(f"the number of sampler steps must be >= 1, got {steps}")
    steps = int(steps)
    if steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).to(device=device, dtype=dtype)


def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""Euler integration of the probability-flow ODE :math:`dx/d\sigma = (x - D(x;\sigma))/\sigma`
    from ``sigmas[0]`` to ``sigmas[-1]`` (EDM, arXiv:2206.00364, eq. 4 with
    :math:`\sigma(t) = t`). ``x`` must already be scaled to ``sigmas[0]``. One call of the
    denoiser per step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s)) / s
        x = x + (s_next - s) * d
    return x


def sample_heun(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""Heun's second-order deterministic sampler, EDM arXiv:2206.00364 Algorithm 1 (no churn):
    an Euler step followed by a trapezoidal correction, except on the last step to
    :math:`\sigma = 0`, where it falls back to Euler. ``2N - 1`` denoiser calls for ``N`` steps."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def network_calls(sampler: str, steps: int) -> int:
    """Denoiser calls of ``sampler`` over ``steps`` steps (Heun: 2N - 1, its last step Euler)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return int(steps) if sampler == "euler" else 2 * int(steps) - 1


# --------------------------------------------------------------------------- flow matching ODEs
# dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on a uniform grid; ``velocity(x, t)`` with
# ``t`` a 0-d tensor. Used by :mod:`pcshower.models.objectives.flow_matching`.

def ode_euler(velocity: Callable, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Explicit Euler over the time grid ``ts``: one velocity call per step."""
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])
    return x


def ode_midpoint(velocity: Callable, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Explicit midpoint rule (second order): two velocity calls per step."""
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        x = x + h * velocity(x + 0.5 * h * velocity(x, ts[i]), ts[i] + 0.5 * h)
    return x


def ode_heun(velocity: Callable, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Heun's method (explicit trapezoid, second order): two velocity calls per step."""
    for i in range(len(ts) - 1):
        h = ts[i + 1] - ts[i]
        v = velocity(x, ts[i])
        x = x + 0.5 * h * (v + velocity(x + h * v, ts[i + 1]))
    return x


ODE_SOLVERS = {"euler": ode_euler, "midpoint": ode_midpoint, "heun": ode_heun}


# --------------------------------------------------------------------------- consistency models
def sample_consistency(consistency_fn: Callable, x: torch.Tensor, levels: torch.Tensor,
                       sigma_min: float, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Multistep consistency sampling (Song et al. arXiv:2303.01469, Algorithm 1): ``x`` is
    noise at ``levels[0]``; :math:`x \leftarrow f(x, \tau_0)`, then for each further level
    re-noise :math:`x + \sqrt{\tau^2 - \sigma_\min^2}\, z` and apply :math:`f` again.
    ``consistency_fn(x, sigma)`` with ``sigma`` a 0-d tensor; one call per level."""
    x = consistency_fn(x, levels[0])
    for tau in levels[1:]:
        z = torch.randn(x.shape, generator=generator, device=x.device)
        x = consistency_fn(x + (tau ** 2 - sigma_min ** 2).sqrt() * z, tau)
    return x
