"""Point reduction: merge a shower's deposits on a virtual grid, conserving energy exactly.

CaloClouds (Buhmann et al., arXiv:2305.04847 and 2309.05704) trains on Geant4 steps merged on a
grid finer than the readout cells (6 x 6 per 5.088 mm ILD cell, per layer). ``reduce_points`` does
the same for any :class:`~pcshower.data.Showers` batch, in either frame: points of one shower
that fall in the same grid voxel become one point whose energy is the sum of theirs (accumulated in
float64) and whose position is their energy-weighted centroid (or the voxel centre). Voxels are
centred on the shower axis (x = y = 0). In the detector frame ``dz = None`` groups points by their
exact depth, i.e. per active layer for the simulator's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pcshower.data import Showers
from pcshower.units import DETECTOR_FRAME, PHYSICS_FRAME

__all__ = ["reduce_points", "GRID_PRESETS", "grid_for", "PolarGrid"]


@dataclass(frozen=True)
class PolarGrid:
    """A cylindrical grid about the shower axis with radial bins growing geometrically.

    Radial edges ``0, r0, r0 g, r0 g^2, ...`` (the innermost disc is one voxel), ``nphi``
    azimuthal sectors in every other ring, depth bins of ``dz``. Its voxels follow the falling
    density of a shower, so a coarse polar grid gives a few hundred points per shower where a
    Cartesian grid of the same core resolution gives thousands (tails fill many voxels).
    """

    r0: float
    growth: float
    nphi: int
    dz: float

    def __post_init__(self):
        for name in ("r0", "dz"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"PolarGrid {name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.growth) and self.growth > 1):
            raise ValueError(f"PolarGrid growth must be > 1, got {self.growth!r}")
        if int(self.nphi) != self.nphi or self.nphi < 1:
            raise ValueError(f"PolarGrid nphi must be a positive integer, got {self.nphi!r}")

#: Named grids per frame: ``(dx, dy, dz)`` in R_M, R_M, X0 (physics) or mm, mm, mm/None
#: (detector), or a :class:`PolarGrid` (R_M, X0).
#: Points per shower for each setting at 10/50/100 GeV are measured in docs/simulator.md.
GRID_PRESETS = {
    PHYSICS_FRAME: {
        "fine": (0.05, 0.05, 0.25),
        "medium": PolarGrid(r0=0.05, growth=1.5, nphi=8, dz=0.5),
        "coarse": PolarGrid(r0=0.1, growth=2.0, nphi=4, dz=1.0),
    },
    DETECTOR_FRAME: {
        # ILD cell 5.088 mm: CaloClouds' 6 x 6 sub-cells, 3 x 3 sub-cells, whole cells; per layer
        "fine": (5.088 / 6, 5.088 / 6, None),
        "medium": (5.088 / 3, 5.088 / 3, None),
        "coarse": (5.088, 5.088, None),
    },
}
DEFAULT_PRESET = {PHYSICS_FRAME: "medium", DETECTOR_FRAME: "fine"}


def grid_for(frame: str, grid=None) -> tuple:
    """Resolve ``grid`` (a preset name, a ``(dx, dy, dz)`` tuple, or None for the default)."""
    if frame not in GRID_PRESETS:
        raise ValueError(f"unknown frame {frame!r}; expected one of {tuple(GRID_PRESETS)}")
    if grid is None:
        grid = DEFAULT_PRESET[frame]
    if isinstance(grid, str):
        try:
            grid = GRID_PRESETS[frame][grid]
        except KeyError:
            raise ValueError(f"unknown grid preset {grid!r} for the {frame} frame; presets: "
                             f"{', '.join(GRID_PRESETS[frame])}, or give (dx, dy, dz)") from None
    if isinstance(grid, PolarGrid):
        return grid
    grid = tuple(grid)
    if len(grid) != 3:
        raise ValueError(f"grid must be (dx, dy, dz), got {grid!r}")
    for name, g in zip(("dx", "dy", "dz"), grid):
        if g is None and name == "dz":
            continue
        if g is None or not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0):
            raise ValueError(f"grid {name} must be a positive number{' or None' * (name == 'dz')}"
                             f", got {g!r}")
    return tuple(None if g is None else float(g) for g in grid)


def _dense_ids(values: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 ids of integer-valued bins (0 .. range-1)."""
    return values - values.min() if values.numel() else values


#: Depths closer than this (mm or X0) count as the same depth when ``dz`` is None.
SAME_DEPTH = 1e-4


def _rank(ids: torch.Tensor) -> torch.Tensor:
    """Rank of each non-negative id among the distinct ids (0 .. distinct-1), order kept.

    A compact id range uses an occupancy table (O(P + range)); a sparse one the sort of
    ``torch.unique``.
    """
    span = int(ids.max()) + 1 if ids.numel() else 1
    if span <= max(8 * ids.numel(), 1 << 20):
        occupied = torch.zeros(span, dtype=torch.bool, device=ids.device)
        occupied.index_fill_(0, ids, True)
        return (torch.cumsum(occupied, 0) - 1).index_select(0, ids)
    return torch.unique(ids, sorted=True, return_inverse=True)[1]


def reduce_points(showers: Showers, grid=None, *, position: str = "centroid") -> Showers:
    """Merge each shower's points that share a voxel of ``grid``; energy is conserved exactly.

    Args:
        showers: a batch in the physics or detector frame.
        grid: ``(dx, dy, dz)`` in the frame's units (R_M, R_M, X0 or mm, mm, mm; ``dz = None``
            merges only points at identical depth), a :class:`PolarGrid`, or a preset name of
            :data:`GRID_PRESETS` (``"fine"``, ``"medium"``, ``"coarse"``); default ``"medium"``
            (physics: polar, ~1.4k-3.3k points at 10-100 GeV; ``"coarse"`` gives a few hundred)
            or ``"fine"`` (detector: CaloClouds' 6 x 6 sub-cells of an ILD cell, per layer).
        position: ``"centroid"`` (energy-weighted mean position of the merged points; keeps the
            shower's energy-weighted first moments) or ``"center"`` (voxel centre).

    Returns:
        A new :class:`Showers` with the same conditions; extra features beyond x, y, z, e are
        energy-weighted means. ``metadata["reduction"]`` records the grid and the points per
        shower before and after.
    """
    if position not in ("centroid", "center"):
        raise ValueError(f"position must be 'centroid' or 'center', got {position!r}")
    grid = grid_for(showers.frame, grid)
    pts = showers.points
    dev = pts.device
    n_showers = len(showers)
    before = showers.num_points
    if pts.shape[0] == 0:
        out = showers._replace(metadata=dict(showers.metadata))
        out.metadata["reduction"] = _record(showers.frame, grid, position, before, before)
        return out
    batch = showers.batch
    xyz = pts[:, :3]
    ix, iy, iz, centers = _voxel_indices(xyz, pts[:, 2], grid)
    cols = [batch, _dense_ids(iy), _dense_ids(ix), _dense_ids(iz)]
    ranges = [max(n_showers, 1)] + [int(c.max()) + 1 for c in cols[1:]]
    total_range = math.prod(ranges)
    if total_range < 2 ** 62:
        key = cols[0]
        for c, r in zip(cols[1:], ranges[1:]):
            key = key * r + c
        inv = _rank(key)
    else:  # absurd ranges (far outliers): lexicographic unique rows, slower but exact
        _, inv = torch.unique(torch.stack(cols, dim=1), dim=0, sorted=True, return_inverse=True)
    n_out = int(inv.max()) + 1
    e64 = pts[:, 3].to(torch.float64)
    e_sum = torch.zeros(n_out, dtype=torch.float64, device=dev).index_add_(0, inv, e64)
    if bool((e_sum == 0).any()):  # voxels whose points all have zero energy: plain means
        count = torch.zeros(n_out, dtype=torch.float64, device=dev).index_add_(
            0, inv, torch.ones_like(e64))
        zero = (e_sum == 0)[inv]
        w = torch.where(zero, 1.0 / count[inv], e64 / torch.where(zero, 1.0, e_sum[inv]))
    else:
        w = e64 / e_sum.index_select(0, inv)
    w = w.to(pts.dtype)
    others = torch.cat([xyz, pts[:, 4:]], dim=1) if pts.shape[1] > 4 else xyz
    merged = torch.zeros((n_out, others.shape[1]), dtype=pts.dtype, device=dev).index_add_(
        0, inv, others * w[:, None])
    if position == "center":
        first = torch.full((n_out,), pts.shape[0], dtype=torch.int64, device=dev).scatter_reduce(
            0, inv, torch.arange(pts.shape[0], device=dev), reduce="amin")
        merged[:, :3] = centers(first).to(pts.dtype)
    new_points = torch.cat([merged[:, :3], e_sum[:, None].to(pts.dtype), merged[:, 3:]], dim=1)
    out_batch = torch.zeros(n_out, dtype=torch.int64, device=dev).scatter_(0, inv, batch)
    counts = torch.bincount(out_batch, minlength=n_showers)
    ptr = torch.zeros(n_showers + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=ptr[1:])
    out = showers._replace(points=new_points, ptr=ptr, metadata=dict(showers.metadata))
    out.metadata["reduction"] = _record(showers.frame, grid, position, before, counts)
    return out


def _turns(x: torch.Tensor, y: torch.Tensor, exact_octants: bool) -> torch.Tensor:
    """Azimuth measured from -pi, in turns [0, 1): ``(atan2(y, x) + pi) / 2 pi``.

    With ``exact_octants`` (sector counts dividing 8) a "diamond angle" is used instead: a
    monotonic function of the azimuth that equals it at every multiple of 45 degrees, so sector
    boundaries are exact, without the cost of atan2.
    """
    if not exact_octants:
        return (torch.atan2(y, x) + math.pi) / (2 * math.pi)
    u, v = -x, -y  # rotate by pi: the azimuth from -pi becomes the azimuth of (u, v) in [0, 2 pi)
    au, av = u.abs(), v.abs()
    frac = av / (au + av).clamp_min(1e-30)  # in [0, 1] within a quadrant, 0.5 on the diagonal
    d = torch.where(v >= 0, torch.where(u >= 0, frac, 2.0 - frac),
                    torch.where(u < 0, 2.0 + frac, 4.0 - frac))
    return (d / 4.0).remainder(1.0)


def _voxel_indices(x64: torch.Tensor, z_raw: torch.Tensor, grid):  # x64: the [P, 3] positions
    """Integer voxel coordinates of each point and a function giving voxel centres."""
    if isinstance(grid, PolarGrid):
        r = torch.hypot(x64[:, 0], x64[:, 1])
        ring = torch.where(r < grid.r0, torch.zeros_like(r),
                           1.0 + torch.floor(torch.log(r / grid.r0) / math.log(grid.growth)))
        ring = ring.to(torch.int64)
        sector = torch.floor(_turns(x64[:, 0], x64[:, 1], exact_octants=8 % grid.nphi == 0)
                             * grid.nphi).to(torch.int64).clamp(0, grid.nphi - 1)
        sector = torch.where(ring == 0, torch.zeros_like(sector), sector)
        iz = torch.floor(x64[:, 2] / grid.dz + 0.5).to(torch.int64)

        def centers(idx):
            rg, sc = ring[idx].to(torch.float64), sector[idx].to(torch.float64)
            lo = torch.where(rg == 0, torch.zeros_like(rg), grid.r0 * grid.growth ** (rg - 1))
            hi = grid.r0 * grid.growth ** rg
            rc = torch.where(rg == 0, torch.zeros_like(rg), 0.5 * (lo + hi))
            ang = (sc + 0.5) / grid.nphi * 2 * math.pi - math.pi
            return torch.stack([rc * torch.cos(ang), rc * torch.sin(ang),
                                iz[idx].to(torch.float64) * grid.dz], dim=1)

        return ring, sector, iz, centers
    dx, dy, dz = grid
    ix = torch.floor(x64[:, 0] / dx + 0.5).to(torch.int64)
    iy = torch.floor(x64[:, 1] / dy + 0.5).to(torch.int64)
    if dz is None:  # one bin per distinct depth (per active layer for the simulator)
        zq = torch.round(z_raw.to(torch.float64) / SAME_DEPTH).to(torch.int64)
        iz = _rank(zq - zq.min())
        zvals = torch.zeros(int(iz.max()) + 1, dtype=z_raw.dtype, device=z_raw.device)
        zvals[iz] = z_raw
    else:
        iz = torch.floor(x64[:, 2] / dz + 0.5).to(torch.int64)

    def centers(idx):
        z = zvals[iz[idx]].to(torch.float64) if dz is None else iz[idx].to(torch.float64) * dz
        return torch.stack([ix[idx].to(torch.float64) * dx, iy[idx].to(torch.float64) * dy, z],
                           dim=1)

    return ix, iy, iz, centers


def _grid_record(grid):
    if isinstance(grid, PolarGrid):
        return {"kind": "polar", "r0": grid.r0, "growth": grid.growth, "nphi": grid.nphi,
                "dz": grid.dz}
    return {"kind": "cartesian", "dx": grid[0], "dy": grid[1], "dz": grid[2]}


def _record(frame, grid, position, before, after) -> dict:
    b = before.to(torch.float64)
    a = after.to(torch.float64)
    return {"frame": frame, "grid": _grid_record(grid), "position": position,
            "points_before_mean": float(b.mean()) if b.numel() else 0.0,
            "points_after_mean": float(a.mean()) if a.numel() else 0.0,
            "points_before": int(b.sum()), "points_after": int(a.sum())}
