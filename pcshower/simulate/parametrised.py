"""The parametrised (GFlash-style) shower engine: EM showers as clouds of energy spots.

Each shower is drawn as in Grindhammer & Peters (hep-ex/0001020; formulas in
:mod:`pcshower.simulate.gflash`): its longitudinal parameters ``(T, alpha)``, then ``N`` spots
with depths from the spot profile, energies that follow the energy profile, and radii from the
core + tail radial profile at their depth; azimuths are uniform. The medium is the homogeneous
equivalent of the stack (``Stack.effective_medium``: Z_eff, E_c,eff, X0_eff, R_M,eff).

In the physics frame the spots are the points (depth in X0, transverse in R_M, energy fraction,
summing to 1 per shower: full deposition in an infinite equivalent medium). In the detector frame
the spots are placed along the (inclined) axis in the real stack, their depth in X0 mapped to mm
through the slab boundaries, and :func:`pcshower.physics.sampling.to_active_layers` keeps the
visible part in active layers, with sampling fluctuations; points sit at the middle of their
active slab (moved along the shower direction), in mm and MeV; energy that leaks out of the stack
or lands in passive material behind the last active layer is dropped.

Every loop is over chunks of showers (bounded memory), never over showers or spots.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pcshower.data import Showers
from pcshower.physics.sampling import (depth_x0_to_mm, sampling_layers,
                                       to_active_layers)
from pcshower.physics.stack import Stack
from pcshower.simulate import gflash
from pcshower.units import (BOTH_FRAMES, DETECTOR_FRAME, FRAMES, PHYSICS_FRAME, particle_code,
                            particle_name)

__all__ = ["simulate_parametrised", "EM_PARTICLES", "ENERGY_RANGE_GEV", "MAX_THETA_RAD",
           "MAX_RADIUS_RM"]

#: PDG codes the parametrisation describes (photons, electrons, positrons).
EM_PARTICLES = (22, 11, -11)
#: Incident energies where the parametrisation is used, GeV (G&P fitted 1-100 GeV and were
#: checked up to several hundred GeV; the upper end is extrapolation).
ENERGY_RANGE_GEV = (1.0, 1000.0)
#: Largest polar angle to the stack normal accepted (89 degrees).
MAX_THETA_RAD = math.radians(89.0)
#: Radius (R_M) where the radial profile is cut by default. The GFlash ansatz falls as r^-3, so
#: without a cut every 50 GeV shower has a few spots beyond 20 R_M and some at hundreds of R_M
#: (metres in tungsten), far outside the range the parametrisation describes; the cut moves
#: about 0.05 % of the energy inside it.
MAX_RADIUS_RM = 20.0
#: Spots per chunk: bounds the memory of one vectorised pass (~100 bytes per spot).
CHUNK_SPOTS = 2_000_000


def _check_inputs(energy_gev, theta, phi, particle):
    energy = np.atleast_1d(np.asarray(energy_gev, dtype=np.float64))
    if energy.ndim != 1:
        raise ValueError(f"energy must be a scalar or a 1-D array of GeV, got shape {energy.shape}")
    n = energy.shape[0]
    try:
        theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), (n,)).copy()
        phi = np.broadcast_to(np.asarray(phi, dtype=np.float64), (n,)).copy()
    except ValueError:
        raise ValueError(f"theta and phi must be scalars or arrays of length {n} (one per "
                         "shower)") from None
    bad = ~np.isfinite(energy)
    if bad.any():
        raise ValueError(f"energy of shower {int(np.argmax(bad))} is not a number "
                         f"({energy[bad][0]}); give incident energies in GeV")
    lo, hi = ENERGY_RANGE_GEV
    out = (energy < lo * (1 - 1e-9)) | (energy > hi * (1 + 1e-9))
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"energy {energy[i]:g} GeV (shower {i}) is outside the parametrised "
                         f"engine's range {lo:g}-{hi:g} GeV; energies are in GeV and must be "
                         "positive")
    for name, arr in (("theta", theta), ("phi", phi)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite numbers of radians")
    if (theta < 0).any() or (theta > MAX_THETA_RAD + 1e-12).any():
        i = int(np.argmax((theta < 0) | (theta > MAX_THETA_RAD + 1e-12)))
        raise ValueError(f"theta = {math.degrees(theta[i]):.6g} deg (shower {i}) is outside "
                         "[0, 89] deg: theta is the angle to the stack normal in radians and must "
                         "be below 90 deg (the shower must enter the stack through its face)")
    code = particle_code(particle)
    if code not in EM_PARTICLES:
        raise ValueError(f"the parametrised engine simulates electromagnetic showers only "
                         f"(photon, electron, positron), not {particle_name(code)!r}; use "
                         "--engine geant4 for hadrons")
    return energy, theta, phi, code


def _segment_softmax(log_w: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Per-segment normalised weights ``exp(log_w) / sum_segment exp(log_w)``."""
    top = torch.full((n_seg,), -math.inf, dtype=log_w.dtype, device=log_w.device)
    top = top.scatter_reduce(0, seg, log_w, reduce="amax")
    w = torch.exp(log_w - top.index_select(0, seg))
    total = torch.zeros(n_seg, dtype=w.dtype, device=w.device).index_add_(0, seg, w)
    return w / total.index_select(0, seg)


def _physics_spots(energy: torch.Tensor, code: int, medium, generator, spot_scale: float,
                   max_radius_rm: float | None = None, par=gflash.PUBLISHED):
    """Spots of a chunk of showers in the physics frame: ``(points [P, 4] f32, counts [B])``."""
    Z = float(medium.Z)
    params = gflash.sample_shower_parameters(energy, Z, medium.ec_mev, generator, par)
    counts = gflash.spot_count(energy, Z, spot_scale)
    n_showers = energy.numel()
    seg = torch.repeat_interleave(torch.arange(n_showers, device=energy.device), counts)
    t, log_w = gflash.sample_depths(params, seg, generator)
    frac = _segment_softmax(log_w, seg, n_showers)
    tau = t * gflash.tau_scale(params).to(t.dtype).index_select(0, seg)
    r_core, r_tail, p_core = gflash.radial_parameters(tau, energy, Z, seg, par)
    u = torch.rand((3, t.numel()), dtype=t.dtype, device=t.device, generator=generator)
    radius_scale = torch.where(u[0] < p_core, r_core, r_tail)
    # inverse CDF of 2 r R^2 / (r^2 + R^2)^2, F(r) = r^2 / (r^2 + R^2): r = R sqrt(u / (1 - u)),
    # with u < F(r_max) when the profile is cut at r_max
    v = u[1]
    if max_radius_rm is not None:
        v = v * (max_radius_rm ** 2 / (max_radius_rm ** 2 + radius_scale ** 2))
    r = radius_scale * torch.sqrt(v / (1.0 - v).clamp_min(1e-7))
    ang = (2.0 * math.pi) * u[2]
    if code == 22:  # photons convert after an exponential depth of mean 9/7 X0
        start = torch.empty(n_showers, dtype=torch.float64, device=t.device).exponential_(
            1.0, generator=generator) * par.pair_length_x0
        t = t + start.to(t.dtype).index_select(0, seg)
    points = torch.stack([r * torch.cos(ang), r * torch.sin(ang), t, frac], dim=1)
    return points, counts


def _to_detector(points: torch.Tensor, counts: torch.Tensor, energy: torch.Tensor,
                 theta: torch.Tensor, phi: torch.Tensor, stack: Stack, medium, generator,
                 crossing_rms: float, par=gflash.PUBLISHED):
    """Place physics-frame spots in the stack and keep the visible energy of active layers.

    Shower direction ``d = (sin t cos p, sin t sin p, cos t)`` and transverse axes
    ``u = (cos t cos p, cos t sin p, -sin t)``, ``v = (-sin p, cos p, 0)`` in the stack frame.
    """
    dt = points.dtype
    seg = torch.repeat_interleave(torch.arange(energy.numel(), device=points.device), counts)
    # index_select: much faster than advanced indexing for per-point gathers on CPU
    st, ct, sp, cp = (a.to(dt).index_select(0, seg) for a in (torch.sin(theta), torch.cos(theta),
                                                                torch.sin(phi), torch.cos(phi)))
    # the axis reaches normal depth z after x0(z) / cos(theta) radiation lengths
    z_axis = depth_x0_to_mm(points[:, 2] * ct, stack)
    along = z_axis / ct
    xt = points[:, 0] * medium.rm_mm
    yt = points[:, 1] * medium.rm_mm
    z = z_axis - xt * st
    # the tune's scale of the sampling fraction (1 for the published coefficients)
    e_mev = points[:, 3] * (energy * 1000.0 * par.sampling_scale(energy, theta)).to(dt).index_select(
        0, seg)
    layer, visible = to_active_layers(z, e_mev, seg, stack, generator=generator,
                                      crossing_rms=crossing_rms)
    z_mid = torch.as_tensor(sampling_layers(stack).active_center_mm, dtype=dt,
                            device=points.device).index_select(0, layer.clamp_min(0))
    # move each deposit along the shower direction onto the middle plane of its active slab
    along = along + (z_mid - z) / ct
    x = along * st * cp + xt * ct * cp - yt * sp
    y = along * st * sp + xt * ct * sp + yt * cp
    idx = torch.nonzero((layer >= 0) & (visible > 0)).flatten()
    out = torch.stack([x, y, z_mid, visible], dim=1).index_select(0, idx)
    seg = seg.index_select(0, idx)
    new_counts = torch.bincount(seg, minlength=energy.numel())
    return out, new_counts


def simulate_parametrised(energy_gev, theta, phi, particle, stack: Stack, seed: int,
                          frame: str = PHYSICS_FRAME, *, spot_scale: float = 1.0,
                          max_radius_rm: float | None = MAX_RADIUS_RM,
                          crossing_rms: float | None = None, tune="auto",
                          device: str | torch.device = "cpu", progress=None) -> Showers:
    """Simulate EM showers with the GFlash parametrisation; the ``parametrised`` engine.

    Args:
        energy_gev: ``[n]`` incident energies in GeV (1-1000).
        theta, phi: ``[n]`` or scalars, radians: polar angle to the stack normal (< 89 deg) and
            azimuth about it, in the stack's local frame.
        particle: PDG code or name: photon, electron or positron.
        stack: the layered stack; its homogeneous equivalent is the shower medium.
        seed: all randomness comes from ``torch.Generator().manual_seed(seed)``: the same seed and
            inputs give identical showers.
        frame: ``"physics"`` (X0, R_M, energy fraction) or ``"detector"`` (mm, MeV, visible
            energy in active layers, stack-local frame with the impact point at the origin), or
            ``"both"``: ``{"physics": Showers, "detector": Showers}`` of the same spots.
        spot_scale: multiplies GFlash's number of spots (1 = the published count).
        max_radius_rm: the radial profile is cut at this radius (R_M) and renormalised inside
            it; ``None`` keeps the full r^-3 tail of the ansatz (see :data:`MAX_RADIUS_RM`).
        crossing_rms: ``kappa`` of the sampling fluctuations (detector frame only), see
            :mod:`pcshower.physics.sampling`; ``None``: the tune's (the module's default
            1.0 for the published coefficients).
        tune: the coefficients: ``"auto"`` (the stack's Geant4 tune where pcshower ships one,
            else the published ones with a notice), ``"published"`` (Grindhammer & Peters), a
            tune file or a :class:`~pcshower.simulate.gflash.Parametrisation`; see
            :mod:`pcshower.simulate.tuning`.
        device: torch device to simulate on.
        progress: optional object with ``update(n_showers)`` (a tqdm bar).

    Returns:
        Unreduced :class:`~pcshower.data.Showers` (one point per spot), float32 points; the
        metadata names the generator and the medium.
    """
    if frame not in (*FRAMES, BOTH_FRAMES):
        raise ValueError(f"frame must be one of {FRAMES} or {BOTH_FRAMES!r}, got {frame!r}")
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a pcshower.physics.Stack, got {type(stack).__name__}")
    if spot_scale <= 0:
        raise ValueError(f"spot_scale must be positive, got {spot_scale}")
    if max_radius_rm is not None and not (math.isfinite(max_radius_rm) and max_radius_rm > 0):
        raise ValueError(f"max_radius_rm must be a positive number of R_M or None, got "
                         f"{max_radius_rm!r}")
    energy_np, theta_np, phi_np, code = _check_inputs(energy_gev, theta, phi, particle)
    from pcshower.simulate.tuning import parametrisation_for

    par = parametrisation_for(stack, tune)
    if crossing_rms is None:
        crossing_rms = par.crossing_rms
    medium = stack.effective_medium()
    if frame != PHYSICS_FRAME:
        sampling_layers(stack)  # refuses a stack without active layers before any work
    generator = torch.Generator(device=device).manual_seed(int(seed))
    energy = torch.as_tensor(energy_np, dtype=torch.float64, device=device)
    theta_t = torch.as_tensor(theta_np, dtype=torch.float64, device=device)
    phi_t = torch.as_tensor(phi_np, dtype=torch.float64, device=device)
    # chunks of whole showers with at most CHUNK_SPOTS spots (at least one shower each)
    n_spots = gflash.spot_count(energy.cpu(), float(medium.Z), spot_scale).numpy()
    first_spot = np.cumsum(n_spots) - n_spots
    chunk = first_spot // CHUNK_SPOTS  # a chunk may overrun by its last shower's spots
    bounds = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(n_spots)]
    made = {f: ([], []) for f in FRAMES}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        p, c = _physics_spots(energy[a:b], code, medium, generator, spot_scale, max_radius_rm,
                              par)
        if frame != DETECTOR_FRAME:
            made[PHYSICS_FRAME][0].append(p.to(torch.float32))
            made[PHYSICS_FRAME][1].append(c)
        if frame != PHYSICS_FRAME:
            p, c = _to_detector(p, c, energy[a:b], theta_t[a:b], phi_t[a:b], stack, medium,
                                generator, crossing_rms, par)
            made[DETECTOR_FRAME][0].append(p.to(torch.float32))
            made[DETECTOR_FRAME][1].append(c)
        if progress is not None:
            progress.update(b - a)
    metadata = {"generator": "pcshower-parametrised-gflash", "seed": int(seed),
                "engine": "parametrised", "stack": stack.name,
                "medium": {"Z": medium.Z, "x0_mm": medium.x0_mm, "rm_mm": medium.rm_mm,
                           "ec_mev": medium.ec_mev},
                "spot_scale": spot_scale, "max_radius_rm": max_radius_rm,
                "parametrisation": par.name}

    def showers(f):
        pts, cnts = made[f]
        meta = dict(metadata, crossing_rms=crossing_rms) if f == DETECTOR_FRAME else dict(metadata)
        return Showers.from_counts(torch.cat(pts) if pts else torch.zeros((0, 4)),
                                   torch.cat(cnts) if cnts else torch.zeros(0, dtype=torch.int64),
                                   energy=energy.cpu(), theta=theta_t.cpu(), phi=phi_t.cpu(),
                                   particle=code, frame=f, metadata=meta)

    if frame == BOTH_FRAMES:
        return {f: showers(f) for f in FRAMES}
    return showers(frame)
