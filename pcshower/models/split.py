"""Sub-voxel split: undo, at generation time, what merging the training data on a grid removed.

A model trained on points merged on a grid (:func:`pcshower.simulate.reduce_points`, energy-
weighted centroids) generates voxel centroids. Their energy-weighted means are right, but each
voxel's internal spread is gone, so a readout cell finer than the voxel sees too few, too
energetic deposits. :func:`split_points` turns every generated point into ``factor`` points of
equal energy spread over a box about it (Latin-hypercube offsets).

How large that box should be depends on where the voxel is. Near the shower axis a voxel is full
of deposits and its energy is spread over most of it; a few Molière radii out the same voxel
holds one or two deposits and no spread at all (measured on GFlash showers merged from
0.05 R_M x 0.05 R_M x 0.25 X0 onto 0.25 R_M x 0.25 R_M x 1 X0: a uniform-box equivalent width of
0.2 R_M transversely near the axis, 0.02 R_M at 2-3 R_M; docs/models.md). A flat box of the
voxel's size smears the tails into too many, too soft cells. :func:`measure_voxel_spread` measures
the spread from finer data, per bin of the voxel centroid's radius and depth, as the box a
uniform density would need to have the same variance (``sqrt(12 var)``); :func:`spread_boxes`
looks the box up for each generated point.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from pcshower.models.showerflow import slice_index

__all__ = ["split_points", "measure_voxel_spread", "spread_boxes", "declump_points",
           "SPREAD_R_EDGES", "SPREAD_Z_EDGES", "DECLUMP_ROUNDS"]

#: Bin edges of the spread table: voxel-centroid radius [R_M] and depth [X0] (last bins open).
SPREAD_R_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)
SPREAD_Z_EDGES = tuple(float(z) for z in range(0, 30, 2)) + (math.inf,)


def split_points(points: torch.Tensor, ptr: torch.Tensor, factor: int, box,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every physics-frame point into ``factor`` points of equal energy spread uniformly
    (Latin-hypercube stratified) over a box centred on it; depths below 0 are reflected.

    Args:
        points: ``[P, F]`` physics-frame points (x, y, z, e, ...).
        ptr: ``[B + 1]`` shower offsets.
        factor: sub-points per point (a positive integer; 1 returns the input).
        box: ``(dx, dy, dz)`` (R_M, R_M, X0) for every point, or a ``[P, 3]`` tensor of per-point
            boxes (e.g. from :func:`spread_boxes`).

    A uniform spread over a box of side ``d`` gives the within-voxel variance ``d^2 / 12``; each
    shower's energy is kept exactly and its energy-weighted centroid on average.
    Returns ``(points [P * factor, F], ptr * factor)``.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"split factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return points, ptr
    n, k = points.shape[0], int(factor)
    if isinstance(box, torch.Tensor) and box.dim() == 2:
        if box.shape != (n, 3):
            raise ValueError(f"per-point split boxes must be [{n}, 3], got {tuple(box.shape)}")
        size = box.to(device=points.device, dtype=points.dtype)
        if not bool(torch.isfinite(size).all()) or bool((size < 0).any()):
            raise ValueError("per-point split boxes must be finite and non-negative")
        size = size[:, None, :]
    else:
        if box is None or len(box) != 3 or not all(math.isfinite(float(b)) and float(b) >= 0
                                                   for b in box):
            raise ValueError(f"split box must be three non-negative numbers (dx, dy, dz in R_M, "
                             f"R_M, X0) or a [P, 3] tensor, got {box!r}")
        size = torch.tensor([float(b) for b in box], dtype=points.dtype, device=points.device)
    out = points.repeat_interleave(k, 0)
    # Latin-hypercube offsets: along each axis the k sub-points of a parent take one of k equal
    # strata each (random order, uniform within the stratum). Same uniform marginal as i.i.d.
    # draws, but no clumping: with i.i.d. draws three of four sub-points of a core point often
    # share one 0.63 X0 ILD layer, and the cell-energy spectrum grows a tail (measured, W1 to
    # the reference 0.28 -> 0.19 MeV for the 0.25 R_M x 0.25 R_M x 1 X0 grid, docs/models.md).
    u = torch.rand(n, k, 3, generator=generator, device=out.device, dtype=out.dtype)
    strata = torch.rand(n, k, 3, generator=generator, device=out.device).argsort(dim=1)
    offsets = ((strata.to(out.dtype) + u) / k - 0.5) * size
    xyz = out[:, :3] + offsets.reshape(n * k, 3)
    xyz[:, 2] = xyz[:, 2].abs()
    return torch.cat([xyz, out[:, 3:4] / k, out[:, 4:]], 1), ptr * k


#: Rounds of :func:`declump_points` (each moves clashing points one more voxel width along the arc).
DECLUMP_ROUNDS = 8


def declump_points(points: torch.Tensor, ptr: torch.Tensor, grid,
                   rounds: int = DECLUMP_ROUNDS) -> tuple[torch.Tensor, int]:
    """Move points that share a ``grid`` voxel with another point of their shower, along the
    circle about the shower axis, to a free voxel. Returns ``(points, moved)``.

    Training points merged on a grid (:func:`pcshower.simulate.reduce_points`) hold at most one
    point per voxel; a generative network's points clump (measured on the shipped model: 17 % of
    its points share a 0.25 R_M x 0.25 R_M x 1 X0 voxel with another, the data none), and
    clumped points light too few cells (docs/models.md). Each round, every point but the first in
    an occupied voxel tries the position rotated about the axis by ``m`` voxel widths of arc
    (``m`` growing with its rank in the voxel and the round, sides alternating) and moves if that
    voxel is free and no other point claims it. Radius, depth and energy of every point are
    kept, so the radial and longitudinal energy profiles are unchanged; in a full core no voxel
    on the arc is free and the points stay. Deterministic (no random numbers).
    """
    grid = tuple(float(g) for g in grid)
    if len(grid) != 3 or not all(math.isfinite(g) and g > 0 for g in grid):
        raise ValueError(f"grid must be three positive numbers (dx, dy, dz), got {grid!r}")
    b = ptr.numel() - 1
    counts = ptr[1:] - ptr[:-1]
    batch = torch.repeat_interleave(torch.arange(b, device=points.device), counts)
    p = points.to(torch.float64).clone()
    r = torch.hypot(p[:, 0], p[:, 1])
    phi = torch.atan2(p[:, 1], p[:, 0])
    moved = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
    encode = _arc_voxel_encoder(p, r, batch, b, grid)
    for it in range(int(rounds)):
        key = encode(p, batch) if encode else _voxel_keys(p, batch, grid)
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        _, n_in = torch.unique_consecutive(sorted_key, return_counts=True)
        start = torch.repeat_interleave(torch.cumsum(n_in, 0) - n_in, n_in)
        rank = torch.empty_like(key)
        rank[order] = torch.arange(key.numel(), device=p.device) - start
        clash = torch.nonzero(rank > 0).flatten()
        if clash.numel() == 0:
            break
        step = (rank[clash] + 1) // 2 + it // 2
        side = torch.where(rank[clash] % 2 == 1, 1.0, -1.0) * (1.0 if it % 2 == 0 else -1.0)
        angle = phi[clash] + side * step * grid[0] / r[clash].clamp(min=grid[0])
        cand = p[clash].clone()
        cand[:, 0], cand[:, 1] = r[clash] * torch.cos(angle), r[clash] * torch.sin(angle)
        if encode:
            target = encode(cand, batch[clash])
        else:
            both = _voxel_keys(torch.cat([p[:, :3], cand[:, :3]]),
                               torch.cat([batch, batch[clash]]), grid)
            sorted_key, target = torch.sort(both[:p.shape[0]])[0], both[p.shape[0]:]
        at = torch.searchsorted(sorted_key, target).clamp(max=sorted_key.numel() - 1)
        free = torch.nonzero(sorted_key[at] != target).flatten()
        # of several points aiming at one free voxel, the first (lowest index) takes it
        by_target = free[torch.argsort(target[free], stable=True)]
        _, n_aim = torch.unique_consecutive(target[by_target], return_counts=True)
        winners = by_target[torch.cumsum(n_aim, 0) - n_aim]
        dest = clash[winners]
        p[dest, :2] = cand[winners, :2]
        phi[dest] = angle[winners]
        moved[dest] = True
    return p.to(points.dtype), int(moved.sum())


def _arc_voxel_encoder(p: torch.Tensor, r: torch.Tensor, batch: torch.Tensor, b: int, grid):
    """An int64 voxel id ``(shower, ix, iy, iz)`` by arithmetic, valid for the points ``p`` and
    every position on their circles about the axis (radius and depth do not change), so ids of
    different calls compare; ``None`` if the id range would overflow (far outliers: the caller
    ranks ids with :func:`_voxel_keys` instead)."""
    if p.shape[0] == 0:
        return None
    dx, dy, dz = grid
    nx = int(math.floor(float(r.max()) / dx + 0.5)) + 1
    ny = int(math.floor(float(r.max()) / dy + 0.5)) + 1
    iz = _voxel_index(p[:, 2], dz)
    z0, nz = int(iz.min()), int(iz.max() - iz.min()) + 1
    if b * nz * (2 * nx + 1) * (2 * ny + 1) >= 2 ** 62:
        return None

    def encode(q: torch.Tensor, shower: torch.Tensor) -> torch.Tensor:
        ix = _voxel_index(q[:, 0], dx) + nx
        iy = _voxel_index(q[:, 1], dy) + ny
        kz = _voxel_index(q[:, 2], dz) - z0
        return ((shower * nz + kz) * (2 * nx + 1) + ix) * (2 * ny + 1) + iy

    return encode


def _bins(points: torch.Tensor, r_edges, z_edges,
          grid=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread-table bin of each point: (radius bin, depth bin), clamped to the table; with
    ``grid`` the radius of the centre of the voxel the point lies in (``reduce_points``'
    convention: voxels centred on the axis)."""
    p = points.to(torch.float64)
    re = torch.tensor(r_edges[1:-1], dtype=torch.float64, device=p.device)
    ze = torch.tensor(z_edges[1:-1], dtype=torch.float64, device=p.device)
    x, y = p[:, 0], p[:, 1]
    if grid is not None:
        dx, dy = float(grid[0]), float(grid[1])
        x, y = _voxel_index(x, dx).to(p.dtype) * dx, _voxel_index(y, dy).to(p.dtype) * dy
    r = torch.hypot(x, y).contiguous()
    return (torch.bucketize(r, re, right=True),
            torch.bucketize(p[:, 2].contiguous(), ze, right=True))


def spread_boxes(points: torch.Tensor, table: torch.Tensor, r_edges=SPREAD_R_EDGES,
                 z_edges=SPREAD_Z_EDGES, *, grid=None) -> torch.Tensor:
    """``[P, 3]`` split boxes (dx = dy, dz) for physics-frame ``points`` from a spread ``table``
    ``[R, Z, 2]`` (transverse, depth box per radius and depth bin). The radius is the point's
    own, or with ``grid`` that of the centre of the grid voxel it lies in (a table measured
    with the same ``grid`` keying, :func:`measure_voxel_spread`)."""
    if table.shape != (len(r_edges) - 1, len(z_edges) - 1, 2):
        raise ValueError(f"spread table must be [{len(r_edges) - 1}, {len(z_edges) - 1}, 2], "
                         f"got {tuple(table.shape)}")
    ri, zi = _bins(points, r_edges, z_edges, grid)
    b = table.to(points.device)[ri, zi]
    return torch.stack([b[:, 0], b[:, 0], b[:, 1]], 1).to(points.dtype)


def _voxel_index(values: torch.Tensor, step: float) -> torch.Tensor:
    """Voxel index along one axis with ``reduce_points``' convention (voxels centred on
    multiples of ``step``): ``floor(v / step + 1/2)``, int64."""
    return torch.floor(values / step + 0.5).to(torch.int64)


def _voxel_keys(points: torch.Tensor, batch: torch.Tensor, grid) -> torch.Tensor:
    """One int64 id per (shower, voxel) with the voxel convention of ``reduce_points`` (voxels
    centred on the axis: index ``floor(x / dx + 1/2)``); ids are ranks, 0 .. V-1."""
    cols = [batch.to(torch.int64)]
    for axis, d in enumerate(grid):
        cols.append(_voxel_index(points[:, axis].to(torch.float64), d))
    key = torch.zeros_like(cols[0])
    span = 1
    for c in cols:
        c = c - c.min()
        r = int(c.max()) + 1
        if span * r >= 2 ** 62:  # far outliers: exact but slower
            return torch.unique(torch.stack(cols, 1), dim=0, return_inverse=True)[1]
        key = key * r + c
        span *= r
    return torch.unique(key, return_inverse=True)[1]


def measure_voxel_spread(showers, grid, *, r_edges=SPREAD_R_EDGES, z_edges=SPREAD_Z_EDGES,
                         slice_edges=None, by_voxel: bool = False, batch_size: int = 250,
                         progress: bool = True) -> tuple[torch.Tensor, dict]:
    """The within-voxel spread of ``grid`` measured on physics-frame showers finer than it.

    Args:
        showers: a :class:`~pcshower.data.Showers` batch, or an iterable of batches, in the
            physics frame and finer than ``grid`` (e.g. the training data before their last
            :func:`~pcshower.simulate.reduce_points`).
        grid: ``(dx, dy, dz)`` the model's training grid (R_M, R_M, X0).

    Every voxel's energy-weighted variance about its centroid is accumulated, weighted by the
    voxel's energy, in the bin of its centroid's radius and depth. Returns ``(table [R, Z, 2],
    info)``: the table holds ``sqrt(12 var)`` transversely (x and y pooled) and in depth, the
    side of the uniform box with that variance; bins no voxel fell in take the value of the
    nearest filled radius bin at that depth (or nearest depth). ``info`` holds the showers,
    voxels and points used and the energy per bin; with ``slice_edges`` (a model's depth-slice
    edges, X0, the last slice open) also ``slice_depth``: the energy-weighted mean depth of the
    voxel centroids (the training points) in each slice (the slice's middle where none fell).

    ``by_voxel``: bin each voxel by the radius of its centre instead of its centroid's (look
    the boxes up with ``spread_boxes(..., grid=grid)``). Near the axis the training centroids
    sit on a lattice (the central voxel's within 0.01 R_M of the axis, its neighbours' at
    0.20 R_M) and the radius bins between hold a few atypical voxels; a network that does not
    resolve the lattice puts a quarter of the energy there, where a centroid-keyed table gives
    those points the atypical, too small boxes (docs/models.md).
    """
    grid = tuple(float(g) for g in grid)
    if len(grid) != 3 or not all(math.isfinite(g) and g > 0 for g in grid):
        raise ValueError(f"grid must be three positive numbers (dx, dy, dz), got {grid!r}")
    nr, nz = len(r_edges) - 1, len(z_edges) - 1
    weight = torch.zeros(nr * nz, dtype=torch.float64)
    var_t = torch.zeros_like(weight)
    var_z = torch.zeros_like(weight)
    counts = {"showers": 0, "voxels": 0, "points": 0}
    if slice_edges is not None:
        slice_edges = torch.as_tensor(slice_edges, dtype=torch.float64)
        slice_e = torch.zeros(slice_edges.numel() - 1, dtype=torch.float64)
        slice_ez = torch.zeros_like(slice_e)
    batches = showers.split(batch_size) if hasattr(showers, "split") else showers
    for sh in tqdm(batches, desc="voxel spread", unit="batch", disable=not progress):
        if sh.frame != "physics":
            raise ValueError(f"the voxel spread is measured in the physics frame, got {sh.frame!r}")
        p = sh.points.to(torch.float64)
        if p.shape[0] == 0:
            continue
        e = p[:, 3]
        if not bool(torch.isfinite(p[:, :4]).all()) or bool((e < 0).any()):
            raise ValueError("showers for the voxel spread hold NaN/inf positions or negative "
                             "energies")
        inv = _voxel_keys(p, sh.batch, grid)
        v = int(inv.max()) + 1
        ev = torch.zeros(v, dtype=torch.float64).index_add_(0, inv, e)
        keep = ev > 0
        ew = ev.clamp_min(1e-300)
        mean = torch.zeros(v, 3, dtype=torch.float64).index_add_(0, inv, e[:, None] * p[:, :3])
        mean = mean / ew[:, None]
        d = p[:, :3] - mean[inv]
        var = torch.zeros(v, 3, dtype=torch.float64).index_add_(0, inv, e[:, None] * d * d)
        var = var / ew[:, None]
        ri, zi = _bins(mean, r_edges, z_edges, grid if by_voxel else None)
        cell = (ri * nz + zi)[keep]
        weight.index_add_(0, cell, ev[keep])
        var_t.index_add_(0, cell, ev[keep] * 0.5 * (var[keep, 0] + var[keep, 1]))
        var_z.index_add_(0, cell, ev[keep] * var[keep, 2])
        if slice_edges is not None:
            k = slice_index(mean[keep, 2], slice_edges)
            slice_e.index_add_(0, k, ev[keep])
            slice_ez.index_add_(0, k, ev[keep] * mean[keep, 2])
        counts["showers"] += len(sh)
        counts["voxels"] += int(keep.sum())
        counts["points"] += p.shape[0]
    if counts["voxels"] == 0:
        raise ValueError("no deposits to measure the voxel spread on")
    filled = (weight > 0).reshape(nr, nz)
    table = torch.stack([var_t, var_z], 1) / weight.clamp_min(1e-300)[:, None]
    table = (12.0 * table).sqrt().reshape(nr, nz, 2)
    table = _fill_empty(table, filled)
    info = dict(counts, grid=list(grid), energy_per_bin=weight.reshape(nr, nz).tolist())
    if slice_edges is not None:
        middle = 0.5 * (slice_edges[:-1] + slice_edges[1:])
        depth = torch.where(slice_e > 0, slice_ez / slice_e.clamp_min(1e-300), middle)
        info["slice_depth"] = depth.tolist()
    return table.to(torch.float32), info


def _fill_empty(table: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Empty bins take the nearest filled radius bin of their depth, or the nearest filled depth."""
    out = table.clone()
    nr, nz = filled.shape
    cols = [j for j in range(nz) if filled[:, j].any()]
    for j in range(nz):
        src = j if j in cols else min(cols, key=lambda c: abs(c - j))
        rows = torch.nonzero(filled[:, src]).flatten()
        for i in range(nr):
            if not filled[i, j]:
                near = int(rows[torch.argmin((rows - i).abs())])
                out[i, j] = table[near, src]
    return out
