"""Deliberate, known distortions of showers, to show what the validation metrics can detect.

A validation suite is only trusted once it has been seen to flag known defects at the size a
model might make them: an energy scale off by 2 %, showers 5 % too wide, a dead layer. These
functions apply exactly such defects to a reference sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pcshower.data import CellHits, Showers

__all__ = ["scale_energy", "scale_transverse", "drop_layers"]


def scale_energy(showers: Showers, factor: float) -> Showers:
    """Every point energy times ``factor`` (the visible energy scales with it)."""
    pts = showers.points.clone()
    pts[:, 3] *= float(factor)
    return showers.with_points(pts)


def scale_transverse(showers: Showers, factor: float) -> Showers:
    """Transverse coordinates x, y times ``factor`` about the shower axis: in the physics frame
    and in a simulator's stack-local detector frame the axis enters at x = y = 0."""
    pts = showers.points.clone()
    pts[:, :2] *= float(factor)
    return showers.with_points(pts)


def drop_layers(geometry, layers: Iterable[int]) -> Callable[[CellHits], CellHits]:
    """A hits transform removing every hit in the given readout ``layers`` (dead layers), for
    ``sample_from_showers(..., transform_hits=...)``."""
    dead = torch.as_tensor(sorted(set(int(k) for k in layers)), dtype=torch.int64)
    if dead.numel() and (int(dead.min()) < 0 or int(dead.max()) >= geometry.num_layers):
        raise ValueError(f"layers must lie in [0, {geometry.num_layers}) for {geometry.name}, "
                         f"got {dead.tolist()}")

    def transform(hits: CellHits) -> CellHits:
        keep = ~torch.isin(torch.as_tensor(geometry.cell_layer(hits.cell_id)), dead)
        counts = torch.bincount(hits.batch[keep], minlength=len(hits))
        ptr = torch.zeros(len(hits) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=ptr[1:])
        return CellHits(hits.cell_id[keep], hits.energy[keep], ptr, hits.num_cells,
                        hits.geometry, hits.outside_energy, hits.outside_points,
                        dict(hits.metadata))

    return transform
