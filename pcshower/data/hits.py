"""`CellHits`: energies summed per readout cell, ragged per shower (the output of a geometry)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["CellHits"]


@dataclass(eq=False)
class CellHits:
    """Sparse cell hits of ``B`` showers in one readout.

    Args:
        cell_id: ``[H]`` int64 cell index in the geometry's flat cell numbering.
        energy: ``[H]`` deposited (visible) energy per cell in MeV.
        ptr: ``[B+1]`` offsets: the hits of shower ``i`` are ``[ptr[i], ptr[i+1])``.
        num_cells: number of cells of the readout (for :meth:`to_dense`).
        geometry: geometry name.
        outside_energy: ``[B]`` energy (MeV) of points that fell outside the readout.
        outside_points: ``[B]`` number of such points.
    """

    cell_id: torch.Tensor
    energy: torch.Tensor
    ptr: torch.Tensor
    num_cells: int
    geometry: str | None = None
    outside_energy: torch.Tensor | None = None
    outside_points: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.ptr.numel() - 1
        if self.cell_id.shape != self.energy.shape:
            raise ValueError(f"cell_id {tuple(self.cell_id.shape)} and energy "
                             f"{tuple(self.energy.shape)} differ in shape")
        if int(self.ptr[-1]) != self.cell_id.numel():
            raise ValueError(f"ptr ends at {int(self.ptr[-1])} but there are {self.cell_id.numel()} hits")
        if self.outside_energy is None:
            self.outside_energy = torch.zeros(n, dtype=self.energy.dtype, device=self.energy.device)
        if self.outside_points is None:
            self.outside_points = torch.zeros(n, dtype=torch.int64, device=self.energy.device)

    def __len__(self) -> int:
        return self.ptr.numel() - 1

    @property
    def num_hits(self) -> torch.Tensor:
        return self.ptr[1:] - self.ptr[:-1]

    @property
    def batch(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self), device=self.ptr.device), self.num_hits)

    def to_dense(self) -> torch.Tensor:
        """``[B, num_cells]`` dense energies (MeV)."""
        dense = self.energy.new_zeros(len(self), self.num_cells)
        dense.index_put_((self.batch, self.cell_id), self.energy, accumulate=True)
        return dense

    @classmethod
    def from_dense(cls, dense: torch.Tensor, **kwargs) -> "CellHits":
        nz = dense != 0
        counts = nz.sum(dim=1)
        ptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        cells = torch.nonzero(nz)[:, 1]
        return cls(cell_id=cells, energy=dense[nz], ptr=ptr, num_cells=dense.shape[1], **kwargs)

    @staticmethod
    def concat(parts) -> "CellHits":
        """Concatenate the hits of consecutive batches of showers in one readout."""
        parts = list(parts)
        if not parts:
            raise ValueError("cannot concatenate an empty list of CellHits")
        first = parts[0]
        for k, h in enumerate(parts[1:], 1):
            if h.num_cells != first.num_cells or h.geometry != first.geometry:
                raise ValueError(f"hits batch {k} is for {h.geometry!r} ({h.num_cells} cells), "
                                 f"batch 0 for {first.geometry!r} ({first.num_cells} cells)")
        counts = torch.cat([h.num_hits for h in parts])
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=first.ptr.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        return CellHits(torch.cat([h.cell_id for h in parts]), torch.cat([h.energy for h in parts]),
                        ptr, first.num_cells, first.geometry,
                        torch.cat([h.outside_energy for h in parts]),
                        torch.cat([h.outside_points for h in parts]), dict(first.metadata))

    def to(self, device) -> "CellHits":
        return CellHits(self.cell_id.to(device), self.energy.to(device), self.ptr.to(device),
                        self.num_cells, self.geometry, self.outside_energy.to(device),
                        self.outside_points.to(device), dict(self.metadata))

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {"cell_id": self.cell_id.cpu().numpy(), "energy": self.energy.cpu().numpy(),
                "ptr": self.ptr.cpu().numpy(), "outside_energy": self.outside_energy.cpu().numpy(),
                "outside_points": self.outside_points.cpu().numpy()}
