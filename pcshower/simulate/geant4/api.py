"""`simulate_geant4`: Geant4 showers in a layered stack as a `Showers` batch, detector or physics frame.

Detector frame: one point per energy-depositing Geant4 step in an active slab, stack-local mm and
MeV (z = depth along the stack normal from the front face, x/y transverse, origin at the impact
point). Points are NOT merged: the production loop applies ``pcshower.simulate.reduce_points``.

Physics frame (DESIGN.md: the full deposition of the shower in the homogeneous equivalent medium,
depth in X0, transverse in R_M, energy as a fraction of the incident energy): each point r is
rotated into the shower-axis frame (z' along the incident direction d, x' in the plane of d and the
stack normal, y' = z' × x'); the depth z' (mm along the axis) becomes the radiation lengths the
axis has crossed in the real slabs to that point, X0(z' cos θ) / cos θ with X0(·) the stack's
piecewise-linear ``x0_edges`` (the inverse of the parametrised engine's placement; on average
this is z'/X0_eff), and x', y' are divided by R_M,eff of ``stack.effective_medium()``
(Grindhammer & Peters rules). Each point's energy is rescaled by its shower's (energy deposited
in the sampling cell of its layer: the active slab and the passive slabs in front of it) /
(energy deposited in that active slab), so the points of a layer carry the whole deposit of
their cell, and each shower's fractions sum to the energy it left in the stack (E - leakage)
over E (:func:`physics_energy_scale`). Until 2026-12-03 one factor per shower was used, which
under-weighted the layers behind thicker absorbers (ILD's last ten, by about 2x) and so the
deep, wide part of every shower.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from pcshower.data.showers import Showers
from pcshower.physics.stack import Stack
from pcshower.units import BOTH_FRAMES, DETECTOR_FRAME, FRAMES, PHYSICS_FRAME, particle_code
from pcshower.simulate.geant4.engine import EventRecord, get_engine

__all__ = ["simulate_geant4", "run_geant4", "to_physics_frame", "shower_axis_basis",
           "physics_energy_scale", "fastsim_config"]


def shower_axis_basis(theta, phi) -> np.ndarray:
    """``[n, 3, 3]`` rows (x', y', z') of the shower-axis frame for directions (θ, φ) in radians.

    z' = (sinθ cosφ, sinθ sinφ, cosθ); x' = (cosθ cosφ, cosθ sinφ, -sinθ); y' = z' × x'
    = (-sinφ, cosφ, 0). At θ = 0 this is the stack frame rotated by φ about z.
    """
    theta = np.asarray(theta, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    st, ct, sp, cp = np.sin(theta), np.cos(theta), np.sin(phi), np.cos(phi)
    ex = np.stack([ct * cp, ct * sp, -st], -1)
    ey = np.stack([-sp, cp, np.zeros_like(sp)], -1)
    ez = np.stack([st * cp, st * sp, ct], -1)
    return np.stack([ex, ey, ez], -2)


def _point_layer(points: np.ndarray, stack: Stack) -> np.ndarray:
    """``[P]`` active layer of detector-frame points (each lies in an active slab)."""
    slab = np.clip(np.searchsorted(stack.z_edges_mm, points[:, 2], side="right") - 1, 0,
                   len(stack.slabs) - 1)
    return np.maximum(stack.layer_of_slab[slab], 0)


def physics_energy_scale(record: EventRecord, stack: Stack) -> np.ndarray:
    """``[B, L]`` factor from a shower's visible energy in active layer ``l`` to the energy it
    deposited in that layer's sampling cell (the active slab and the passive slabs in front of
    it, :func:`pcshower.physics.sampling.sampling_layers`), times one per-shower factor that
    carries the rest (cells whose active slab saw nothing, slabs behind the last active one), so
    that a shower's physics-frame energy is all it deposited in the stack."""
    from pcshower.physics.sampling import sampling_layers

    cell = sampling_layers(stack).cell_of_slab
    n, L = record.slab_edep_mev.shape[0], stack.num_layers
    in_cell = np.zeros((n, L))
    for c in range(L):
        in_cell[:, c] = record.slab_edep_mev[:, cell == c].sum(axis=1)
    active = record.slab_edep_mev[:, stack.active_mask]
    scale = np.divide(in_cell, active, out=np.zeros_like(in_cell), where=active > 0)
    carried = (scale * active).sum(axis=1)
    rest = np.divide(record.deposited_mev, carried, out=np.zeros(n), where=carried > 0)
    return scale * rest[:, None]


def to_physics_frame(record: EventRecord, energy_gev, theta, phi, stack: Stack) -> np.ndarray:
    """Points of ``record`` (detector frame) in the physics frame; see the module docstring."""
    pts = record.points
    n = len(record.ptr) - 1
    counts = np.diff(record.ptr)
    shower = np.repeat(np.arange(n), counts)
    basis = shower_axis_basis(np.broadcast_to(theta, (n,)), np.broadcast_to(phi, (n,)))[shower]
    local = np.einsum("pij,pj->pi", basis, pts[:, :3])
    eff = stack.effective_medium()
    cos_t = np.cos(np.broadcast_to(np.asarray(theta, dtype=np.float64), (n,)))[shower]
    normal_depth = local[:, 2] * cos_t
    depth_x0 = np.interp(normal_depth, stack.z_edges_mm, stack.x0_edges,
                         left=0.0, right=stack.total_x0) / cos_t
    e_frac = pts[:, 3] * physics_energy_scale(record, stack)[shower, _point_layer(pts, stack)] / (
        np.asarray(energy_gev, dtype=np.float64)[shower] * 1000.0)
    return np.stack([local[:, 0] / eff.rm_mm, local[:, 1] / eff.rm_mm, depth_x0, e_frac], axis=1)


def run_geant4(energy_gev, theta, phi, particle, stack: Stack, seed: int, *,
               transverse_mm=1000.0, cut_mm: float = 0.7, physics: str = "em",
               progress: bool | object = False, reference: bool = False, impact_mm=None,
               upstream=None, fastsim=None) -> EventRecord:
    """Low-level: run Geant4 and return the raw :class:`EventRecord` (points, per-slab deposits,
    leakage) — what the conservation tests and the engine comparison read. ``reference=True``
    also records the same events with the slow, independent stepping-action recorder
    (``record.reference_steps``; :func:`~pcshower.simulate.geant4.engine.reference_points`
    makes points of them), to validate the production recording.

    ``energy_gev`` ``[n, k]`` and ``impact_mm`` ``[n, k, 2]``: events of ``k`` primaries at
    their own (x, y) on the front face. ``upstream``: ``"MATERIAL:X0"`` or an
    :class:`~pcshower.simulate.geant4.fastsim.Upstream` slab in front of the stack (its deposits:
    ``record.upstream_edep_mev``). ``fastsim``: a
    :class:`~pcshower.simulate.geant4.fastsim.FastSim` configuration (or a model: a checkpoint
    path or ``"default"``): the fast-simulation hook (``record.fastsim``)."""
    from pcshower.simulate.geant4.fastsim import FastSim, FastSimHook, Upstream

    energy_gev = np.atleast_1d(np.asarray(energy_gev, dtype=np.float64))
    upstream = Upstream.parse(upstream)
    hook = None
    if fastsim is not None:
        config = fastsim if isinstance(fastsim, FastSim) else FastSim(model=str(fastsim))
        hook = FastSimHook(config, stack, transverse_mm)
    engine = get_engine(cut_mm=cut_mm, physics=physics)
    if engine.cut_mm != float(cut_mm) or engine.physics != physics:
        raise ValueError(f"this process already runs Geant4 with physics={engine.physics!r}, "
                         f"cut {engine.cut_mm} mm; Geant4 allows one run manager per process: "
                         "use a separate worker process for other settings")
    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=len(energy_gev), desc="geant4", unit="shower", file=sys.stderr)
    elif progress:
        bar = progress
    try:
        return engine.run(energy_gev, theta, phi, particle_code(particle), stack, seed,
                          transverse_mm=transverse_mm, progress=bar, reference=reference,
                          impact_mm=impact_mm, upstream=upstream, fastsim=hook)
    finally:
        if progress is True and bar is not None:
            bar.close()


def fastsim_config(fastsim, frame: str, threshold_gev=None, particles=None, steps=None,
                   batch_size=None, extrapolate: bool = False, device: str = "cpu"):
    """The :class:`~pcshower.simulate.geant4.fastsim.FastSim` of the engine options (``None``
    without ``fastsim``), checked: the hook's options need ``fastsim``, and its hits are
    detector-frame hits (the model's showers arrive as visible deposits, with no per-slab
    deposits for the physics frame's energy scale)."""
    from pcshower.simulate.geant4.fastsim import FastSim

    if fastsim is None:
        given = [name for name, value in (("fastsim_threshold_gev", threshold_gev),
                                          ("fastsim_particles", particles), ("fastsim_steps", steps),
                                          ("fastsim_batch_size", batch_size)) if value is not None]
        if given or extrapolate:
            raise ValueError(f"{', '.join(given) or 'fastsim_extrapolate'} set without fastsim: "
                             "name the hook's model (a checkpoint path or 'default')")
        return None
    if frame != DETECTOR_FRAME:
        raise ValueError(f"the fastsim hook writes detector-frame hits; frame {frame!r} is not "
                         "possible with it (use frame='detector', CLI: --frame detector)")
    if isinstance(fastsim, FastSim):
        return fastsim
    return FastSim.from_options(str(fastsim), threshold_gev, particles, steps, batch_size,
                                extrapolate, device)


def simulate_geant4(energy_gev, theta, phi, particle, stack: Stack, seed: int,
                    frame: str = DETECTOR_FRAME, *, transverse_mm=1000.0, cut_mm: float = 0.7,
                    physics: str = "em", progress: bool | object = False, upstream=None,
                    fastsim: str | None = None, fastsim_threshold_gev: float | None = None,
                    fastsim_particles=None, fastsim_steps: int | None = None,
                    fastsim_batch_size: int | None = None, fastsim_extrapolate: bool = False,
                    fastsim_device: str = "cpu") -> Showers:
    """Simulate showers with Geant4 in ``stack`` and return them, unreduced, as :class:`Showers`.

    Args:
        energy_gev: ``[n]`` incident energies in GeV.
        theta, phi: ``[n]`` (or scalars) direction in radians; θ is the angle to the stack normal
            (θ = 0: normal incidence; ILD's barrel polar angle 90° is θ = 0 here), φ the azimuth.
        particle: PDG code or name (photons, electrons, positrons; hadrons need a hadronic
            ``physics`` list and real data sets).
        stack: the layered stack; slabs' ``material.g4_name`` are Geant4 NIST names.
        seed: base seed; shower i is seeded from (seed, i), so results are identical for a seed.
        frame: ``"detector"`` (mm, MeV, stack-local) or ``"physics"`` (X0, R_M, energy fraction),
            or ``"both"``: a dict ``{"physics": Showers, "detector": Showers}`` of the same
            Geant4 events (one transport, two recordings).
        transverse_mm: full transverse size of the slabs (scalar or (x, y)); the slabs are
            centred on the shower axis at mid-depth.
        cut_mm: Geant4 production cut.
        physics: ``"em"`` (G4EmStandardPhysics_option1, runs offline) or a reference list name.
        progress: ``True`` for a tqdm bar, or an object with ``update(n)``.
        upstream: ``"MATERIAL:X0"`` (e.g. ``"Si:0.2"``): a tracker-like slab of that many
            radiation lengths in front of the stack (:class:`~pcshower.simulate.geant4.fastsim.Upstream`).
        fastsim: the fast-simulation hook's model, a checkpoint path or ``"default"``
            (:mod:`pcshower.simulate.geant4.fastsim`): photons and electrons entering the stack
            above ``fastsim_threshold_gev`` (default 1 GeV, narrowed to the model's training
            range unless ``fastsim_extrapolate``) are stopped at its front face and their
            showers generated and added as hits; detector frame only. ``fastsim_particles``
            (default: those the model was trained on), ``fastsim_steps`` (sampler steps),
            ``fastsim_batch_size`` (stopped particles per generation pass, default 256),
            ``fastsim_device``: see :class:`~pcshower.simulate.geant4.fastsim.FastSim`.

    ``metadata["generator"]`` is ``geant4-approximate-lowenergy`` when the approximate tables are
    in use (see :mod:`pcshower.simulate.geant4.datasets`), else ``geant4``.
    """
    if frame not in (*FRAMES, BOTH_FRAMES):
        raise ValueError(f"frame must be one of {FRAMES} or {BOTH_FRAMES!r}, got {frame!r}")
    energy_gev = np.atleast_1d(np.asarray(energy_gev, dtype=np.float64))
    n = len(energy_gev)
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), (n,)).copy()
    phi = np.broadcast_to(np.asarray(phi, dtype=np.float64), (n,)).copy()
    code = particle_code(particle)
    config = fastsim_config(fastsim, frame, fastsim_threshold_gev, fastsim_particles,
                            fastsim_steps, fastsim_batch_size, fastsim_extrapolate, fastsim_device)
    rec = run_geant4(energy_gev, theta, phi, code, stack, seed, transverse_mm=transverse_mm,
                     cut_mm=cut_mm, physics=physics, progress=progress, upstream=upstream,
                     fastsim=config)
    engine = get_engine()
    import geant4_pybind as g4  # already imported by the engine

    metadata = {
        "generator": engine.data.label,
        "engine": "geant4",
        "geant4_version": str(getattr(g4, "G4Version", "")).replace("$Name:", "").strip(" $"),
        "geant4_physics": "G4EmStandardPhysics_option1" if physics == "em" else physics,
        "production_cut_mm": float(cut_mm),
        "seed": int(seed),
        "stack": stack.name,
        # the physics frame's point energies carry their sampling cell's deposit (2026-12-03)
        "physics_energy": "per-cell deposit",
    }
    if upstream is not None:
        metadata["upstream"] = str(upstream)
        metadata["upstream_mm"] = float(engine.upstream_mm)
    if rec.fastsim is not None:
        metadata.update(rec.fastsim.config)
        metadata["fastsim_stopped"] = int(len(rec.fastsim.event))
        visible = float(rec.points[:, 3].sum()) if len(rec.points) else 0.0
        metadata["fastsim_hit_energy_fraction"] = (
            float(rec.points[rec.fastsim.point_mask, 3].sum()) / visible if visible > 0 else 0.0)
    if engine.data.approximate:
        metadata["geant4_tables"] = engine.data.get("tables", "")
        metadata["warning"] = ("Geant4 ran with approximate low-energy EM tables (no data sets "
                               "installed): sampling fraction and resolution carry a several-"
                               "percent systematic")

    def showers(f):
        points = rec.points if f == DETECTOR_FRAME else to_physics_frame(rec, energy_gev, theta,
                                                                         phi, stack)
        return Showers(points=torch.as_tensor(points, dtype=torch.float32),
                       ptr=torch.as_tensor(rec.ptr, dtype=torch.int64), energy=energy_gev,
                       theta=theta, phi=phi, particle=np.full(n, code),
                       position=np.zeros((n, 3)), frame=f, geometry=stack.name,
                       metadata=dict(metadata))

    if frame == BOTH_FRAMES:
        return {f: showers(f) for f in FRAMES}
    return showers(frame)
