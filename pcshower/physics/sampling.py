"""The response of a layered sampling calorimeter to the energy a shower deposits in it.

A shower is described by its deposits in the *homogeneous equivalent* of the stack (the physics
frame). A sampling calorimeter only sees the part of each deposit that lands in its active
layers, and that part fluctuates. This module turns equivalent-medium deposits at a depth
``z_mm`` into (active layer, visible energy), the detector-level truth that the reference
simulator (:mod:`pcshower.simulate`) and every planar geometry adapter share.

Model (per point of energy ``E_i`` [MeV] at depth ``z_i``):

1. **Sampling cells.** The stack is cut into cells, one per active layer: an active slab together
   with the passive slabs directly in front of it (charged particles made in an absorber are
   mostly seen by the next active layer downstream). Passive slabs behind the last active layer,
   and depths outside ``[0, total thickness)``, belong to no cell (layer ``-1``, visible 0).
2. **Mean visible energy** ``mu_i = f_c E_i`` with the electromagnetic sampling fraction of the
   cell ``f_c = f_mip,c * e/mip_c``: the minimum-ionising fraction
   ``f_mip = dE_mip(active) / dE_mip(cell)`` corrected by the e/mip ratio of GFlash,
   ``e/mip = 1 / (1 + 0.007 (Z_passive - Z_active))`` (Grindhammer & Peters, hep-ex/0001020,
   section 4.1, after Wigmans): soft electrons from high-Z absorbers are sampled less than mips.
3. **Sampling fluctuations** by counting the active-layer crossings (Amaldi, Phys. Scripta 23
   (1981) 409; Fabjan & Gianotti, Rev. Mod. Phys. 75 (2003) 1243, eq. 29): a charged track
   crossing the active layer deposits on average ``d_c = dE_mip(active) / cos(theta_A)``, with
   Amaldi's mean crossing angle ``cos(theta_A) = cos(E_s / (pi E_c,passive))``, so a point
   stands for ``n_i = mu_i / d_c`` crossings. Each crossing's deposit fluctuates with a relative
   r.m.s. ``kappa`` (Landau straggling in the thin active layer and the spread of path lengths),
   giving ``var(visible_i) = (1 + kappa^2) mu_i d_c``. The visible energy is drawn from a Gamma
   distribution with that mean and variance (shape ``n_i / (1 + kappa^2)``, scale
   ``d_c (1 + kappa^2)``), the distribution GFlash itself uses for sampling fluctuations.
   Because the scale is the same for all points of a cell, the sum over any set of points of a
   cell is again Gamma with the summed shape: the result does not depend on how a shower's
   energy was split into points (spots, steps or merged points).

``kappa = 1.0`` (default) is the one tuned number. With it the full simulator
(:mod:`pcshower.simulate`, layer-calibrated sum, 5-100 GeV electrons, 2000 showers each) gives
16.0 %/sqrt(E) (+) 1.4 % for the CALICE Si-W physics prototype (10 x 1.4, 10 x 2.8, 10 x 4.2 mm W,
0.525 mm Si), whose measured resolution is 16.5 %/sqrt(E) (+) 1.1 % (CALICE, NIM A 608 (2009)
372), and 15.0 %/sqrt(E) for the ILD-like stack; the plain Amaldi count (``kappa = 0``) gives
about 11 %, the known underestimate for thin silicon layers (Landau tails, path lengths). For
thick scintillator or liquid-argon gaps the Landau part is smaller; pass a smaller ``kappa``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from pcshower.physics.materials import E_SCALE_MEV
from pcshower.physics.stack import Stack

__all__ = ["SamplingLayers", "sampling_layers", "to_active_layers", "depth_x0_to_mm",
           "segment_index", "extended_segment", "sample_gamma", "DEFAULT_CROSSING_RMS"]

#: Default relative r.m.s. ``kappa`` of the energy one track crossing deposits in an active layer.
DEFAULT_CROSSING_RMS = 1.0

#: GFlash's e/mip slope: e/mip = 1 / (1 + EHAT_SLOPE (Z_passive - Z_active)) (hep-ex/0001020).
EHAT_SLOPE = 0.007


@dataclass(frozen=True)
class SamplingLayers:
    """Per-layer sampling constants of a stack (numpy arrays; ``L`` active layers, ``S`` slabs).

    Attributes:
        z_edges_mm: ``[S+1]`` slab boundaries from the front face.
        cell_of_slab: ``[S]`` active layer whose sampling cell holds the slab, -1 for none.
        active_z_mm: ``[L, 2]`` front and back face of each active slab.
        sampling_fraction: ``[L]`` mean visible / deposited energy for EM showers (f_mip * e/mip).
        mip_fraction: ``[L]`` f_mip of the cell.
        e_over_mip: ``[L]`` the GFlash e/mip ratio of the cell.
        crossing_mev: ``[L]`` mean visible energy per track crossing, ``d_c``.
    """

    z_edges_mm: np.ndarray
    cell_of_slab: np.ndarray
    active_z_mm: np.ndarray
    sampling_fraction: np.ndarray
    mip_fraction: np.ndarray
    e_over_mip: np.ndarray
    crossing_mev: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.sampling_fraction.shape[0])

    @property
    def active_center_mm(self) -> np.ndarray:
        """``[L]`` depth of the middle of each active slab."""
        return self.active_z_mm.mean(axis=1)


def sampling_layers(stack: Stack) -> SamplingLayers:
    """The sampling cells of ``stack`` and their constants (see the module docstring)."""
    if not isinstance(stack, Stack):
        raise TypeError(f"expected a pcshower.physics.Stack, got {type(stack).__name__}")
    # computed once per stack (stacks are immutable), handed out as private copies
    return SamplingLayers(**{k: v.copy() for k, v in _sampling_arrays(stack).items()})


@functools.lru_cache(maxsize=64)
def _sampling_arrays(stack: Stack) -> dict:
    active = stack.active_mask
    if not active.any():
        raise ValueError(f"stack {stack.name!r} has no active slab: mark the sensitive slabs "
                         "with active=True")
    n_slabs = len(stack.slabs)
    layer_of_slab = stack.layer_of_slab
    # each slab belongs to the next active slab at or behind it
    cell = np.full(n_slabs, -1, dtype=np.int64)
    nxt = -1
    for s in range(n_slabs - 1, -1, -1):
        if active[s]:
            nxt = int(layer_of_slab[s])
        cell[s] = nxt
    edges = stack.z_edges_mm
    n_layers = stack.num_layers
    mip_loss = np.array([s.material.mip_mev_per_mm * s.thickness_mm for s in stack.slabs])
    mass = np.array([s.material.density * s.thickness_mm for s in stack.slabs])
    z_mat = np.array([s.material.Z for s in stack.slabs])
    ec = np.array([s.material.ec_mev for s in stack.slabs])
    f_mip = np.empty(n_layers)
    ehat = np.empty(n_layers)
    crossing = np.empty(n_layers)
    active_z = np.empty((n_layers, 2))
    for c in range(n_layers):
        in_cell = cell == c
        act = in_cell & active
        pas = in_cell & ~active
        active_loss = mip_loss[act].sum()
        f_mip[c] = active_loss / mip_loss[in_cell].sum()
        idx = np.nonzero(act)[0]
        active_z[c] = (edges[idx[0]], edges[idx[-1] + 1])
        if pas.any():
            z_p = np.average(z_mat[pas], weights=mass[pas])
            z_a = np.average(z_mat[act], weights=mass[act])
            ehat[c] = 1.0 / (1.0 + EHAT_SLOPE * (z_p - z_a))
            ec_p = np.average(ec[pas], weights=mass[pas])
            cos_theta = math.cos(min(E_SCALE_MEV / (math.pi * ec_p), 1.5))
            crossing[c] = active_loss / cos_theta
        else:  # a fully active cell: what is deposited is seen, without sampling fluctuations
            ehat[c] = 1.0
            crossing[c] = 0.0
    return dict(z_edges_mm=edges, cell_of_slab=cell, active_z_mm=active_z,
                sampling_fraction=f_mip * ehat, mip_fraction=f_mip, e_over_mip=ehat,
                crossing_mev=crossing)


@functools.lru_cache(maxsize=256)
def _bin_table(edges: tuple):
    """Uniform-pitch lookup table of the extended segment index ``j = #(edges <= v)`` (``0`` in
    front of ``edges[0]``, ``S + 1`` behind ``edges[-1]``), or None when a binary search is
    needed (a zero-width segment, or more than 10^6 bins).

    Bins are narrower than the thinnest segment, so a bin holds at most one edge: ``j(v)`` is the
    table entry of ``v``'s bin or one more (one comparison with that edge). The grid is shifted
    so that no edge lies within ``1e-9`` of the span of a bin boundary: a float64 bin index
    rounded across a boundary then cannot cross an edge, and the one comparison is exact. Values
    of lower precision get a second comparison downwards."""
    e = np.asarray(edges, dtype=np.float64)
    if e.size < 2:
        return None
    width = float(np.diff(e).min())
    span = float(e[-1] - e[0])
    if width <= 0 or span / width > 1e6:
        return None
    h = 0.999 * width
    tol = 1e-9 * (abs(e[0]) + span + h)
    best = (-1.0, 0.0)
    for shift in np.arange(64) / 64.0:  # the grid offset keeping edges furthest from boundaries
        pos = (e - (e[0] - (1.0 + shift) * h)) / h
        margin = float(np.abs(pos - np.round(pos)).min()) * h
        best = max(best, (margin, shift))
    start = e[0] - (1.0 + best[1]) * h
    n_bins = int(math.ceil((e[-1] + h - start) / h)) + 1
    table = np.searchsorted(e, start + h * np.arange(n_bins), side="right").astype(np.int64)
    upper = np.concatenate([e, [np.inf]])  # upper edge of extended segment j
    lower = np.concatenate([[-np.inf], e])  # its lower edge
    return start, 1.0 / h, n_bins, table, upper, lower, best[0] > tol


def extended_segment(values: torch.Tensor, edges) -> torch.Tensor:
    """``j = #(edges <= v)`` for each value: ``0`` in front of ``edges[0]``, ``i + 1`` in segment
    ``[edges[i], edges[i+1])``, ``S + 1`` at or behind ``edges[-1]`` (edges increasing, numpy or
    sequence). Equal to ``torch.searchsorted(edges, values, right=True)`` in the values' dtype,
    computed through a cached table of uniform bins (one gather and one comparison per value
    instead of a binary search); values must not be NaN."""
    dev, dt = values.device, values.dtype
    tab = _bin_table(tuple(float(x) for x in np.asarray(edges).reshape(-1)))
    e = torch.as_tensor(np.asarray(edges), dtype=dt if values.is_floating_point() else torch.float64,
                        device=dev)
    if tab is None or not values.is_floating_point():
        return torch.searchsorted(e, values.to(e.dtype).contiguous(), right=True)
    start, inv_h, n_bins, table, upper, lower, exact = tab
    # the bin of each value, clamped into the table (far outside: the first or last bin, whose
    # extended segment is 0 or S + 1 whatever the comparisons below)
    k = ((values - start) * inv_h).clamp_(0, n_bins - 1).to(torch.int64)
    j = torch.as_tensor(table, device=dev).index_select(0, k)
    up = torch.as_tensor(upper, dtype=dt, device=dev)
    up[:-1] = e  # edges rounded to the values' dtype exactly as searchsorted sees them
    # (bool -> int64 first: a mixed-dtype add is an order of magnitude slower on CPU)
    j += (values >= up.index_select(0, j)).to(torch.int64)
    if not (exact and dt == torch.float64):
        lo = torch.as_tensor(lower, dtype=dt, device=dev)
        lo[1:] = e
        j -= (values < lo.index_select(0, j)).to(torch.int64)
    return j


def segment_index(values: torch.Tensor, edges) -> torch.Tensor:
    """Index ``i`` with ``edges[i] <= v < edges[i+1]`` for each value (-1 below, ``S`` above).

    The same as ``torch.searchsorted(edges, values, right=True) - 1`` through the uniform-bin
    table of :func:`extended_segment`.
    """
    return extended_segment(values, edges) - 1


@functools.lru_cache(maxsize=64)
def _x0_to_mm_coefficients(stack: Stack):
    """``(A, B)`` per extended X0 segment with ``z_mm = A + B t``: the mean mm per X0 in front of
    and behind the stack, the slab's own slope inside."""
    x0e, zmm = np.asarray(stack.x0_edges, dtype=np.float64), np.asarray(stack.z_edges_mm, dtype=np.float64)
    slope = np.diff(zmm) / np.diff(x0e)
    mm_per_x0 = float(stack.total_thickness_mm / stack.total_x0)
    b = np.concatenate([[mm_per_x0], slope, [mm_per_x0]])
    a = np.concatenate([[0.0], zmm[:-1] - x0e[:-1] * slope, [zmm[-1] - x0e[-1] * mm_per_x0]])
    return a, b


def depth_x0_to_mm(depth_x0: torch.Tensor, stack: Stack, *, return_slab: bool = False):
    """Depth in radiation lengths traversed (along the stack normal) to depth in mm.

    Piecewise linear through the slab boundaries (``stack.x0_edges`` -> ``stack.z_edges_mm``), so
    a shower that develops in X0 crosses thin and thick absorbers at the right place; behind the
    back face and in front of the front face the stack's mean mm per X0 is used. One table lookup
    (:func:`extended_segment`) and one multiply-add per value. With ``return_slab``, also the
    extended slab index of each depth (0 in front, ``s + 1`` in slab ``s``, ``S + 1`` behind),
    which :func:`to_active_layers` accepts instead of looking the mm depth up again.
    """
    dt = depth_x0.dtype if depth_x0.is_floating_point() else torch.float64
    t = depth_x0.to(dt)
    j = extended_segment(t, stack.x0_edges)
    a, b = _x0_to_mm_coefficients(stack)
    a = torch.as_tensor(a, dtype=dt, device=t.device).index_select(0, j)
    z = a.addcmul_(t, torch.as_tensor(b, dtype=dt, device=t.device).index_select(0, j))
    return (z, j) if return_slab else z


def sample_gamma(shape: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma(shape, 1) variates for a tensor of shapes, reproducible with ``generator``.

    Marsaglia & Tsang, "A simple method for generating gamma variables", ACM TOMS 26 (2000) 363,
    vectorised: every element is proposed until accepted (acceptance > 95 % for shape >= 1); for
    shape < 1 the variate of shape + 1 is multiplied by U^(1/shape). ``torch.distributions.Gamma``
    cannot take a generator, hence this function. Shapes of 0 give 0. Computes in the dtype of
    ``shape`` (float64 for integer shapes).

    Written in TorchScript's subset: a traced graph (``pcshower export``) calls the scripted
    function, whose rejection loop then runs as a loop in the graph, drawing the same numbers in
    the same order as this function does in Python.
    """
    if torch.jit.is_tracing():
        return _scripted_gamma()(shape, generator)
    return _sample_gamma(shape, generator)


def _gamma_propose(d: torch.Tensor, c: torch.Tensor, generator: Optional[torch.Generator]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Marsaglia-Tsang proposal per element: ``(d v, accepted)``."""
    x = torch.randn(d.shape, dtype=d.dtype, device=d.device, generator=generator)
    u = torch.rand(d.shape, dtype=d.dtype, device=d.device, generator=generator)
    v = c * x
    v += 1.0
    v = v * v * v
    # log(u) < x^2/2 + d - d v + d log(v), and v > 0
    rhs = torch.log(v.clamp_min(1e-30)).sub_(v).add_(1.0).mul_(d).addcmul_(x, x, value=0.5)
    ok = (v > 0) & (torch.log(u) < rhs)
    return d * v, ok


def _sample_gamma(shape: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if not shape.is_floating_point():
        shape = shape.to(torch.float64)
    small = (shape < 1.0).to(shape.dtype)  # same-dtype arithmetic below (mixed dtypes are slow)
    d = (shape + small) - 1.0 / 3.0  # shapes below 1 are drawn as shape + 1
    c = torch.rsqrt(9.0 * d)
    out, ok = _gamma_propose(d, c, generator)  # the first round on whole tensors, then rejects
    todo = torch.nonzero(~ok).flatten()
    while todo.numel() > 0:
        value, ok = _gamma_propose(d[todo], c[todo], generator)
        out[todo[ok]] = value[ok]
        todo = todo[~ok]
    if bool(small.max() > 0):
        u = torch.rand(shape.shape, dtype=shape.dtype, device=shape.device, generator=generator)
        # U^(1/shape) below shape 1 (a shape of 0 gives U^inf = 0); above, U^0 = 1 leaves the
        # variate as it is, so only the small shapes are raised (the same numbers, fewer powers)
        few = torch.nonzero(small).flatten()
        out[few] = out[few] * u[few].pow(1.0 / shape[few])
    return out


@functools.lru_cache(maxsize=1)
def _scripted_gamma():
    return torch.jit.script(_sample_gamma)


@functools.lru_cache(maxsize=64)
def _response_table(stack: Stack, crossing_rms: float):
    """Per extended slab ``j`` (0 in front, ``s + 1`` for slab ``s``, ``S + 1`` behind): active
    layer (-1 for none), sampling fraction (0 for none), Gamma scale ``d_c (1 + kappa^2)``, its
    inverse (0 where there are no fluctuations) and 1 where the cell is fully active."""
    layers = sampling_layers(stack)
    cell = layers.cell_of_slab
    layer = np.concatenate([[-1], cell, [-1]]).astype(np.int64)
    seen = layer >= 0
    lidx = np.clip(layer, 0, None)
    frac = np.where(seen, layers.sampling_fraction[lidx], 0.0)
    scale = np.where(seen, layers.crossing_mev[lidx] * (1.0 + crossing_rms ** 2), 0.0)
    inv_scale = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    unsampled = (seen & (scale <= 0)).astype(np.float64)
    return layers.z_edges_mm, layer, frac, scale, inv_scale, unsampled


def to_active_layers(z_mm: torch.Tensor, e_mev: torch.Tensor, batch: torch.Tensor, stack: Stack,
                     *, fluctuate: bool = True, generator: torch.Generator | None = None,
                     crossing_rms: float = DEFAULT_CROSSING_RMS, slab: torch.Tensor | None = None):
    """Active layer and visible energy of equivalent-medium deposits in a sampling stack.

    Args:
        z_mm: ``[P]`` depth of each deposit along the stack normal, mm (0 = front face).
        e_mev: ``[P]`` energy the shower deposits there in the homogeneous equivalent medium, MeV.
        batch: ``[P]`` shower index of each deposit. The model acts point by point and, thanks to
            the additivity of the Gamma fluctuations, needs no per-shower sums; ``batch`` is
            checked for shape so that callers keep one signature for all engines.
        stack: the layered stack.
        fluctuate: draw sampling fluctuations (else return the mean visible energy).
        generator: ``torch.Generator`` on the tensors' device, for reproducible fluctuations.
        crossing_rms: ``kappa``, relative r.m.s. of one crossing's visible deposit.
        slab: ``[P]`` extended slab index of each depth when already known (from
            ``depth_x0_to_mm(..., return_slab=True)``); it replaces the lookup of ``z_mm`` (they
            agree up to the round-off of the mm depth at a slab boundary).

    Returns:
        ``(layer, visible_mev)``: ``[P]`` int64 active-layer index (-1 in front of, behind or
        outside every sampling cell) and ``[P]`` visible energy in MeV (0 where layer is -1),
        computed in the dtype of ``e_mev``; the Gamma variates are drawn in float32 (their
        relative round-off, 6e-8, is far below any sampling fluctuation). Model and references:
        module docstring.
    """
    if z_mm.shape != e_mev.shape or z_mm.ndim != 1:
        raise ValueError(f"z_mm and e_mev must be 1-D of the same length, got {tuple(z_mm.shape)} "
                         f"and {tuple(e_mev.shape)}")
    if batch.shape != z_mm.shape:
        raise ValueError(f"batch must have one entry per point ({z_mm.shape[0]}), got "
                         f"{tuple(batch.shape)}")
    if not bool(torch.isfinite(z_mm.sum() + e_mev.sum())):  # one reduction; NaN/inf propagate
        if not (torch.isfinite(z_mm).all() and torch.isfinite(e_mev).all()):
            raise ValueError("z_mm and e_mev must be finite (found NaN or inf)")
    if e_mev.numel() and bool(e_mev.min() < 0):
        raise ValueError("e_mev must be >= 0: deposits are energies")
    if crossing_rms < 0:
        raise ValueError(f"crossing_rms must be >= 0, got {crossing_rms}")
    edges, layer_of, frac_of, scale_of, inv_scale_of, unsampled_of = _response_table(
        stack, float(crossing_rms))
    dev = z_mm.device
    dt = e_mev.dtype if e_mev.is_floating_point() else torch.float64
    if slab is None:
        j = extended_segment(z_mm if z_mm.is_floating_point() else z_mm.double(), edges)
    else:
        if slab.shape != z_mm.shape:
            raise ValueError(f"slab must have one entry per point ({z_mm.shape[0]}), got "
                             f"{tuple(slab.shape)}")
        j = slab
    table = lambda x: torch.as_tensor(x, dtype=dt, device=dev).index_select(0, j)  # noqa: E731
    layer = torch.as_tensor(layer_of, device=dev).index_select(0, j)
    mean = table(frac_of) * e_mev.to(dt)
    if not fluctuate:
        return layer, mean
    shape = (mean * table(inv_scale_of)).to(torch.float32)
    visible = sample_gamma(shape, generator).to(dt) * table(scale_of)
    return layer, visible.addcmul_(mean, table(unsampled_of))
