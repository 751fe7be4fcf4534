"""Calibration of generated points to the global shape that ShowerFlow sampled.

CaloClouds II (arXiv:2309.05704, section 3.4) corrects the diffusion model's points so that the
per-layer point counts and energies follow the flow. In the physics frame there are no layers, so
pcshower does it per depth slice: (1) the points of each shower, sorted in depth, are dealt to the
slices in the sampled counts; a point outside its slice moves to the nearest depth inside it
(order in depth is kept), or every point goes to a given depth per slice;
(2) point energies are scaled per slice to the sampled slice energy (and, for a model with rings,
alternately per ring about the axis to the sampled ring energy), then per shower to the sampled
visible energy; (3) the transverse centre of gravity is shifted to the sampled one, or, with a
``core_radius``, the shower is shifted so that its core (the energy within that distance of the
axis) is centred on the axis, and with a ``slice_core_radius`` then each depth slice alike.
All steps are vectorised over the flat ragged batch.
"""

from __future__ import annotations

import torch

from pcshower.models.showerflow import ShowerShape, ring_index
from pcshower.nn.pooling import segment_sum

__all__ = ["calibrate_points"]


#: Alternating slice/ring energy scalings (iterative proportional fitting) when rings are used.
RING_ITERATIONS = 5


#: Re-centring rounds for ``core_radius`` (the core is re-selected about the axis each round).
CORE_ITERATIONS = 3


def calibrate_points(points: torch.Tensor, ptr: torch.Tensor, shape: ShowerShape,
                     z_edges: torch.Tensor, r_edges: torch.Tensor | None = None,
                     core_radius: float | None = None,
                     slice_depth: torch.Tensor | None = None,
                     slice_core_radius: float | None = None) -> torch.Tensor:
    """Calibrated copy of physics-frame ``points [P, 4]`` (rows grouped by shower as in ``ptr``,
    ``P = shape.num_points.sum()``), re-ordered by depth within each shower.

    With ``r_edges`` (the codec's ring edges, R_M) and ``shape.ring_energy``, the energies are
    fitted to the sampled slice and ring energies together by iterative proportional fitting
    (alternate scalings; the slices are matched exactly, the rings to the extent the points
    allow: a ring without points keeps no energy).

    ``core_radius`` (R_M): instead of moving each shower's transverse centre of gravity to the
    sampled one, move the shower so that the energy-weighted centre of its points within
    ``core_radius`` of the axis lies on the axis (``CORE_ITERATIONS`` rounds). In the physics
    frame the core lies on the axis and the centre of gravity fluctuates with the halo; moving the
    whole shower to a sampled centre of gravity pushes the core off the axis.

    ``slice_depth`` ``[S]`` (X0): every point dealt to slice ``k`` is put at ``slice_depth[k]``
    instead of keeping its own depth (the model's ``split.snap_depth``).

    ``slice_core_radius`` (R_M; needs ``core_radius``): after the shower, move each depth slice
    so that the energy within that distance of the axis in the slice is centred on it. A photon
    shower's core is straight: in the reference the energy-weighted centre of each 1 X0 slice's
    core (0.3 R_M) lies 0.008 R_M from the axis (median), the network's 0.037 R_M (measured on the
    shipped model; docs/models.md). A slice without energy that close keeps its place."""
    b, s = shape.slice_points.shape
    counts = ptr[1:] - ptr[:-1]
    if not torch.equal(counts, shape.slice_points.sum(1)):
        raise ValueError("calibration: point counts per shower differ from the sampled shape")
    device = points.device
    batch = torch.repeat_interleave(torch.arange(b, device=device), counts)
    # (1) sort by (shower, z) and deal the points to depth slices in the sampled numbers
    order = torch.argsort(points[:, 2], stable=True)
    order = order[torch.argsort(batch[order], stable=True)]
    pts = points[order].clone()
    group_counts = shape.slice_points.reshape(-1)
    group = torch.repeat_interleave(torch.arange(b * s, device=device), group_counts)
    # a point keeps its own depth if it lies in its slice, else it moves to the nearest depth
    # inside it (the last slice is open towards depth); depth order is kept. Spreading each
    # slice's points evenly over it instead (as before) smears the depths by up to a slice width
    # on top of the sub-voxel split (docs/models.md).
    edges = z_edges.to(device, pts.dtype)
    slice_id = group % s
    if slice_depth is not None:
        pts[:, 2] = slice_depth.to(device, pts.dtype)[slice_id]
    else:
        lo = edges[slice_id]
        hi = torch.where(slice_id == s - 1, torch.full_like(lo, float("inf")), edges[1:][slice_id])
        below_hi = hi - 1e-4 * (edges[1:] - edges[:-1])[slice_id]
        pts[:, 2] = torch.minimum(torch.maximum(pts[:, 2], lo), below_hi)
    # (2) energies: per slice, then per shower (slices that got no point lose their share)
    e = pts[:, 3].double()
    evis = shape.visible_energy.double()[:, None]
    fits = [(group, (shape.slice_energy.double() * evis).reshape(-1))]
    if r_edges is not None and shape.ring_energy is not None:
        k = shape.ring_energy.shape[1]
        ring = batch * k + ring_index(pts, r_edges)
        fits = [fits[0], (ring, (shape.ring_energy.double() * evis).reshape(-1))] * RING_ITERATIONS
        fits.append(fits[0])
    for idx, target in fits:
        have = segment_sum(e, idx, target.numel())
        e = e * torch.where(have > 0, target / have.clamp(min=1e-300), torch.zeros_like(have))[idx]
    total = segment_sum(e, batch, b)
    scale = torch.where(total > 0, shape.visible_energy.double() / total.clamp(min=1e-300),
                        torch.zeros_like(total))
    e = e * scale[batch]
    pts[:, 3] = e.to(pts.dtype)
    # (3) transverse centre of gravity, or the core on the axis
    if core_radius is None:
        shift = shape.cog[:, :2].double() - _transverse_centre(pts, e, batch, b)
        pts[:, :2] = pts[:, :2] + shift.to(pts.dtype)[batch]
        return pts
    rounds = [(core_radius, batch, b)] * CORE_ITERATIONS
    if slice_core_radius is not None:
        rounds += [(slice_core_radius, group, b * s)] * CORE_ITERATIONS
    for radius, idx, n in rounds:
        core = e * (torch.hypot(pts[:, 0], pts[:, 1]) < radius).double()
        pts[:, :2] = pts[:, :2] - _transverse_centre(pts, core, idx, n).to(pts.dtype)[idx]
    return pts


def _transverse_centre(pts: torch.Tensor, weight: torch.Tensor, batch: torch.Tensor,
                       b: int) -> torch.Tensor:
    """``[b, 2]`` weighted mean (x, y) of the points of each group in ``batch`` (a shower or a
    slice; 0 for a group without weight)."""
    total = segment_sum(weight, batch, b).clamp(min=1e-300)
    return segment_sum(pts[:, :2].double() * weight[:, None], batch, b) / total[:, None]
