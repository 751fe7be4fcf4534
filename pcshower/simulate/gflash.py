"""The GFlash parametrisation of electromagnetic showers, as vectorised torch functions.

Grindhammer & Peters, "The parameterized simulation of electromagnetic showers in homogeneous
and sampling calorimeters", hep-ex/0001020 (G&P below); the numbers are theirs, as Geant4's
GFlash (``GVFlashHomoShowerTuning``) uses them. All functions act on ``[B]`` tensors of showers
or ``[P]`` tensors of spots at once.

Longitudinal profile of one shower (G&P eq. 2), with ``t`` the depth in X0:

.. math:: \\frac{1}{E}\\frac{dE}{dt} = \\frac{(\\beta t)^{\\alpha-1}\\,\\beta\\,e^{-\\beta t}}{\\Gamma(\\alpha)},
   \\qquad T = \\frac{\\alpha-1}{\\beta}

with ``(ln T, ln alpha)`` drawn from a correlated normal (G&P eqs. 11-13, homogeneous media,
``y = E / E_c``):

- ``<ln T> = ln(ln y - 0.812)``,  ``sigma(ln T) = (-1.4 + 1.26 ln y)^-1``
- ``<ln alpha> = ln(0.81 + (0.458 + 2.26 / Z) ln y)``,  ``sigma(ln alpha) = (-0.58 + 0.86 ln y)^-1``
- ``rho(ln T, ln alpha) = 0.705 - 0.023 ln y``.

Radial profile at depth ``tau = t / T`` (in the shower's own scale, G&P eqs. 18-23), ``r`` in R_M:

.. math:: f(r) = p\\,\\frac{2 r R_C^2}{(r^2+R_C^2)^2} + (1-p)\\,\\frac{2 r R_T^2}{(r^2+R_T^2)^2}

- ``R_C = z1 + z2 tau``, ``z1 = 0.0251 + 0.00319 ln E``, ``z2 = 0.1162 - 0.000381 Z``
- ``R_T = k1 (exp(k3 (tau - k2)) + exp(k4 (tau - k2)))``, ``k1 = 0.659 - 0.00309 Z``,
  ``k2 = 0.645``, ``k3 = -2.59``, ``k4 = 0.3585 + 0.0412 ln E``
- ``p = p1 exp((p2 - tau)/p3 - exp((p2 - tau)/p3))``, ``p1 = 2.632 - 0.00094 Z``,
  ``p2 = 0.401 + 0.00187 Z``, ``p3 = 1.313 - 0.0686 ln E`` (E in GeV).

Energy spots (G&P section 5): ``N = 93 ln(Z) E^0.876`` spots per shower, distributed in depth
with their own Gamma profile, ``T_spot = T (0.698 + 0.00212 Z)``,
``alpha_spot = alpha (0.639 + 0.00334 Z)``; each spot carries the energy profile over the spot
profile at its depth, so that the energy profile is the one above. Photons first travel an
exponential depth of mean 9/7 X0 before they convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pcshower.physics.sampling import DEFAULT_CROSSING_RMS, sample_gamma

__all__ = ["Parametrisation", "PUBLISHED", "ShowerParameters", "longitudinal_parameters",
           "shower_parameters", "sample_shower_parameters",
           "spot_count", "radial_parameters", "tau_scale", "sample_depths",
           "mean_containment", "gamma_log_pdf", "mean_profile",
           "PAIR_LENGTH_X0"]

#: Mean free path of a high-energy photon for pair production, in X0 (PDG: 9/7 X0).
PAIR_LENGTH_X0 = 9.0 / 7.0



@dataclass(frozen=True)
class Parametrisation:
    """The coefficients of the parametrisation, in the layout of the formulas above.

    :data:`PUBLISHED` holds Grindhammer & Peters' homogeneous-medium values (with their Z
    dependence). A fit to one stack's Geant4 showers (:mod:`pcshower.simulate.tuning`) keeps the
    same formulas and puts its numbers here with the Z slopes at zero (the stack's Z is fixed).
    Coefficients may be torch tensors (the fit differentiates through the same functions).

    Fields: ``t_max = (c0, c1)``: ``<ln T> = ln(c0 + c1 ln y)``; ``alpha = (a0, a1, a2)``:
    ``<ln alpha> = ln(a0 + (a1 + a2 / Z) ln y)``; ``sigma_t``, ``sigma_alpha = (s0, s1)``:
    ``sigma = 1 / (s0 + s1 ln y)``; ``rho = (r0, r1)``: ``rho = r0 + r1 ln y``; ``r_core``,
    ``r_tail``, ``p_core``: the radial constants in the order of the formulas (Z slopes second
    in each pair); ``pair_length_x0``: mean depth of a photon's conversion; ``sampling =
    (s0, s_e, s_theta)``: the detector frame's visible energy is the stack's sampling fraction
    times ``s0 (1 + s_e ln(E / 50 GeV)) (1 + s_theta (1 / cos(theta) - 1))`` (all 1, 0, 0 in the
    published set: the e/mip model of :mod:`pcshower.physics.sampling` alone);
    ``crossing_rms``: ``kappa`` of the sampling fluctuations of that module (its default 1.0 in
    the published set).
    """

    t_max: tuple = (-0.812, 1.0)
    alpha: tuple = (0.81, 0.458, 2.26)
    sigma_t: tuple = (-1.4, 1.26)
    sigma_alpha: tuple = (-0.58, 0.86)
    rho: tuple = (0.705, -0.023)
    r_core: tuple = (0.0251, 0.00319, 0.1162, -0.000381)
    r_tail: tuple = (0.659, -0.00309, 0.645, -2.59, 0.3585, 0.0412)
    p_core: tuple = (2.632, -0.00094, 0.401, 0.00187, 1.313, -0.0686)
    pair_length_x0: float = PAIR_LENGTH_X0
    sampling: tuple = (1.0, 0.0, 0.0)
    crossing_rms: float = DEFAULT_CROSSING_RMS
    name: str = "published"

    def sampling_scale(self, energy_gev, theta):
        """The multiplier of the stack's sampling fraction for showers ``(E [GeV], theta [rad])``."""
        s0, s_e, s_t = self.sampling
        return (s0 * (1.0 + s_e * torch.log(energy_gev / 50.0))
                * (1.0 + s_t * (1.0 / torch.cos(theta) - 1.0)))


#: Grindhammer & Peters' coefficients (as Geant4's GVFlashHomoShowerTuning uses them).
PUBLISHED = Parametrisation()
_SPOT_N = (93.0, 0.876)
_SPOT_T = (0.698, 0.00212)
_SPOT_A = (0.639, 0.00334)
#: Floors that keep the profiles proper (Geant4's sampling parameterisation uses the same).
_ALPHA_MIN = 1.1
_SPOT_ALPHA_MIN = 1.05


@dataclass
class ShowerParameters:
    """Per-shower longitudinal parameters ``[B]`` drawn for one batch."""

    T: torch.Tensor  # depth of the maximum in X0
    alpha: torch.Tensor  # shape of the energy profile
    mean_alpha: torch.Tensor  # exp(<ln alpha>): the scale of tau
    T_spot: torch.Tensor
    alpha_spot: torch.Tensor

    @property
    def beta(self) -> torch.Tensor:
        return (self.alpha - 1.0) / self.T

    @property
    def beta_spot(self) -> torch.Tensor:
        return (self.alpha_spot - 1.0) / self.T_spot


def longitudinal_parameters(energy_gev: torch.Tensor, Z: float, ec_mev: float,
                            par: Parametrisation = PUBLISHED):
    """Means, widths and correlation of ``(ln T, ln alpha)`` (G&P eqs. 11-13), each ``[B]``."""
    ln_y = torch.log(energy_gev.to(torch.float64) * 1000.0 / ec_mev)
    mu_t = torch.log((par.t_max[0] + par.t_max[1] * ln_y).clamp_min(0.1))
    a0, a1, a2 = par.alpha
    mu_a = torch.log((a0 + (a1 + a2 / Z) * ln_y).clamp_min(0.1))
    sig_t = (1.0 / (par.sigma_t[0] + par.sigma_t[1] * ln_y)).clamp(0.0, 0.5)
    sig_a = (1.0 / (par.sigma_alpha[0] + par.sigma_alpha[1] * ln_y)).clamp(0.0, 0.5)
    rho = (par.rho[0] + par.rho[1] * ln_y).clamp(-1.0, 1.0)
    return mu_t, mu_a, sig_t, sig_a, rho


def shower_parameters(energy_gev: torch.Tensor, Z: float, ec_mev: float, z: torch.Tensor,
                      par: Parametrisation = PUBLISHED) -> ShowerParameters:
    """``T`` and ``alpha`` of each shower from two standard normals ``z [2, B]``, correlated
    as the parametrisation says, and its spot profile."""
    mu_t, mu_a, sig_t, sig_a, rho = longitudinal_parameters(energy_gev, Z, ec_mev, par)
    c1, c2 = torch.sqrt((1.0 + rho) / 2.0), torch.sqrt((1.0 - rho) / 2.0)
    T = torch.exp(mu_t + sig_t * (c1 * z[0] + c2 * z[1]))
    alpha = torch.exp(mu_a + sig_a * (c1 * z[0] - c2 * z[1])).clamp_min(_ALPHA_MIN)
    T_spot = T * (_SPOT_T[0] + _SPOT_T[1] * Z)
    alpha_spot = (alpha * (_SPOT_A[0] + _SPOT_A[1] * Z)).clamp_min(_SPOT_ALPHA_MIN)
    return ShowerParameters(T=T, alpha=alpha, mean_alpha=torch.exp(mu_a), T_spot=T_spot,
                            alpha_spot=alpha_spot)


def sample_shower_parameters(energy_gev: torch.Tensor, Z: float, ec_mev: float,
                             generator: torch.Generator | None = None,
                             par: Parametrisation = PUBLISHED) -> ShowerParameters:
    """Draw ``T`` and ``alpha`` of each shower with their correlation, and its spot profile."""
    z = torch.randn((2, energy_gev.numel()), dtype=torch.float64, device=energy_gev.device,
                    generator=generator)
    return shower_parameters(energy_gev, Z, ec_mev, z, par)


def spot_count(energy_gev: torch.Tensor, Z: float, scale: float = 1.0) -> torch.Tensor:
    """``[B]`` int64 number of spots, ``scale * 93 ln(Z) E^0.876`` rounded (at least 1)."""
    n = scale * _SPOT_N[0] * math.log(Z) * energy_gev.to(torch.float64) ** _SPOT_N[1]
    return torch.round(n).clamp_min(1).to(torch.int64)


def gamma_log_pdf(t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log of the Gamma density ``(beta t)^(alpha-1) beta exp(-beta t) / Gamma(alpha)``."""
    t = t.clamp_min(1e-30)
    return (alpha * torch.log(beta) + (alpha - 1.0) * torch.log(t) - beta * t
            - torch.lgamma(alpha))


def radial_parameters(tau: torch.Tensor, energy_gev: torch.Tensor, Z: float,
                      seg: torch.Tensor | None = None, par: Parametrisation = PUBLISHED):
    """Core radius, tail radius (R_M) and core weight at shower depth ``tau`` (G&P eqs. 18-23).

    ``energy_gev`` is per shower and ``seg`` maps each ``tau`` to its shower (``None``: one
    energy per ``tau``); the energy-dependent constants are computed once per shower.
    """
    rc, rt, wc = par.r_core, par.r_tail, par.p_core
    ln_e = torch.log(energy_gev.to(torch.float64))
    z1 = (rc[0] + rc[1] * ln_e).to(tau.dtype)
    k4 = (rt[4] + rt[5] * ln_e).to(tau.dtype)
    p3 = (wc[4] + wc[5] * ln_e).to(tau.dtype)
    if seg is not None:
        z1, k4, p3 = (a.index_select(0, seg) for a in (z1, k4, p3))
    r_core = z1 + (rc[2] + rc[3] * Z) * tau
    k1, k2, k3 = rt[0] + rt[1] * Z, rt[2], rt[3]
    r_tail = k1 * (torch.exp(k3 * (tau - k2)) + torch.exp(k4 * (tau - k2)))
    p1, p2 = wc[0] + wc[1] * Z, wc[2] + wc[3] * Z
    arg = (p2 - tau) / p3
    p_core = (p1 * torch.exp(arg - torch.exp(arg))).clamp(0.0, 1.0)
    return r_core.clamp_min(1e-4), r_tail.clamp_min(1e-4), p_core


def tau_scale(params: "ShowerParameters") -> torch.Tensor:
    """``[B]`` factor ``c`` with ``tau = c t``: the depth in units of the shower's own length.

    ``tau = t / <t>_shower * <t>_mean / T_mean``, i.e. ``c = (alpha - 1) / (alpha T) *
    abar / (abar - 1)`` with ``abar = exp(<ln alpha>)`` (Geant4 GFlash's ``ComputeTau``), so that
    ``tau`` is about 1 at the maximum of every shower.
    """
    a, abar = params.alpha, params.mean_alpha
    return (a - 1.0) / (a * params.T) * abar / (abar - 1.0)


def mean_profile(edges_x0: torch.Tensor, energy_gev: float, Z: float, ec_mev: float, *,
                 photon: bool = False, samples: int = 20000, seed: int = 0,
                 par: Parametrisation = PUBLISHED) -> torch.Tensor:
    """Mean fraction of the energy in each depth bin, averaged over the (T, alpha) distribution.

    The reference the simulator is tested against: the Gamma CDF integrated over each bin for
    ``samples`` parameter draws (and, for photons, convolved with the conversion depth).
    """
    g = torch.Generator().manual_seed(seed)
    e = torch.full((samples,), float(energy_gev), dtype=torch.float64)
    p = sample_shower_parameters(e, Z, ec_mev, g, par)
    shift = (torch.empty(samples, dtype=torch.float64).exponential_(1.0, generator=g)
             * par.pair_length_x0) if photon else torch.zeros(samples, dtype=torch.float64)
    x = ((edges_x0.to(torch.float64)[None, :] - shift[:, None]).clamp_min(0.0)
         * p.beta[:, None])
    cdf = torch.special.gammainc(p.alpha[:, None].expand_as(x), x)
    return (cdf[:, 1:] - cdf[:, :-1]).mean(0)


def mean_containment(radius_rm: float, energy_gev: float, Z: float, ec_mev: float, *,
                     max_radius_rm: float | None = None, samples: int = 1000,
                     seed: int = 0, par: Parametrisation = PUBLISHED) -> float:
    """Mean fraction of the energy within ``radius_rm`` Moliere radii of the axis, predicted by the
    parametrisation: the radial CDF ``F(r) = r^2 / (r^2 + R^2)`` of core and tail (divided by
    ``F(max_radius_rm)`` for a cut profile), weighted by each shower's longitudinal profile and
    averaged over ``samples`` draws of (T, alpha)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.full((samples, 1), float(energy_gev), dtype=torch.float64)
    p = sample_shower_parameters(e.flatten(), Z, ec_mev, g, par)
    t = torch.linspace(0.01, 60.0, 1500, dtype=torch.float64)[None, :]
    density = torch.exp(gamma_log_pdf(t, p.alpha[:, None], p.beta[:, None]))
    r_core, r_tail, p_core = radial_parameters(t * tau_scale(p)[:, None], e, Z, par=par)
    r2 = float(radius_rm) ** 2
    def cdf(r_sq, scale):
        f = r_sq / (r_sq + scale ** 2)
        if max_radius_rm is not None:
            m2 = float(max_radius_rm) ** 2
            f = torch.clamp(f / (m2 / (m2 + scale ** 2)), max=1.0)
        return f

    inside = p_core * cdf(r2, r_core) + (1.0 - p_core) * cdf(r2, r_tail)
    return float(((density * inside).sum(1) / density.sum(1)).mean())


def sample_depths(params: ShowerParameters, seg: torch.Tensor,
                  generator: torch.Generator | None = None, dtype=torch.float32):
    """Spot depths ``[P]`` from the spot profile and their log energy weights.

    The weight of a spot at depth ``t`` is ``f_E(t) / f_N(t)`` up to a per-shower constant
    (which cancels when the weights are normalised per shower):
    ``log w = (alpha - alpha_s) ln t - (beta - beta_s) t``.
    """
    def per_spot(a):  # index_select: much faster than a[seg] on CPU
        return a.to(dtype).index_select(0, seg)

    t = sample_gamma(per_spot(params.alpha_spot), generator) / per_spot(params.beta_spot)
    da = per_spot(params.alpha - params.alpha_spot)
    db = per_spot(params.beta - params.beta_spot)
    log_w = da * torch.log(t.clamp_min(1e-30)) - db * t
    return t, log_w
