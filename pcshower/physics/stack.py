"""Layered sampling stacks and their effective homogeneous medium.

The effective-medium rules are those of Grindhammer & Peters, "The parameterized simulation of
electromagnetic showers in homogeneous and sampling calorimeters" (hep-ex/0001020), eqs. 7-9:
with mass fractions w_i, Z_eff = sum w_i Z_i, 1/X0_eff = sum w_i / X0_i (in g/cm^2),
1/R_M,eff = (1/E_s) sum w_i E_c,i / X0_i and E_c,eff = X0_eff sum w_i E_c,i / X0_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pcshower.physics.materials import E_SCALE_MEV, Material, get_material

__all__ = ["Slab", "Stack"]


@dataclass(frozen=True)
class Slab:
    """One homogeneous slab of a stack, normal to the stack axis."""

    material: Material
    thickness_mm: float
    active: bool = False

    def __post_init__(self):
        object.__setattr__(self, "material", get_material(self.material))
        if not np.isfinite(self.thickness_mm) or self.thickness_mm <= 0:
            raise ValueError(f"slab of {self.material.name}: thickness must be a positive number "
                             f"of mm, got {self.thickness_mm}")


@dataclass(frozen=True)
class Stack:
    """A sequence of slabs along the stack axis z (z = 0 at the front face).

    Active slabs are the sensitive layers; they are numbered 0..num_layers-1 in order.
    """

    slabs: tuple[Slab, ...]
    name: str = "stack"

    def __post_init__(self):
        object.__setattr__(self, "slabs", tuple(self.slabs))
        if not self.slabs:
            raise ValueError(f"stack {self.name!r} is empty: give at least one slab")

    @classmethod
    def repeated(cls, pattern: Sequence[tuple], repeat: int, name: str = "stack") -> "Stack":
        """``pattern`` of ``(material, thickness_mm, active)`` repeated ``repeat`` times."""
        return cls(tuple(Slab(*s) for s in pattern) * int(repeat), name)

    def __add__(self, other: "Stack") -> "Stack":
        return Stack(self.slabs + other.slabs, f"{self.name}+{other.name}")

    # geometry along z ------------------------------------------------------------------
    @property
    def thickness_mm(self) -> np.ndarray:
        return np.array([s.thickness_mm for s in self.slabs])

    @property
    def z_edges_mm(self) -> np.ndarray:
        """``[S+1]`` slab boundaries in mm from the front face."""
        return np.concatenate([[0.0], np.cumsum(self.thickness_mm)])

    @property
    def total_thickness_mm(self) -> float:
        return float(self.thickness_mm.sum())

    @property
    def active_mask(self) -> np.ndarray:
        return np.array([s.active for s in self.slabs], dtype=bool)

    @property
    def num_layers(self) -> int:
        """Number of active (read-out) layers."""
        return int(self.active_mask.sum())

    @property
    def layer_of_slab(self) -> np.ndarray:
        """``[S]`` active-layer index of each slab, -1 for passive slabs."""
        idx = np.cumsum(self.active_mask) - 1
        return np.where(self.active_mask, idx, -1)

    @property
    def x0_edges(self) -> np.ndarray:
        """``[S+1]`` slab boundaries in radiation lengths."""
        x0 = np.array([s.material.x0_mm for s in self.slabs])
        return np.concatenate([[0.0], np.cumsum(self.thickness_mm / x0)])

    @property
    def total_x0(self) -> float:
        return float(self.x0_edges[-1])

    # the homogeneous equivalent ----------------------------------------------------------
    def _mass_fractions(self) -> np.ndarray:
        mass = np.array([s.material.density * s.thickness_mm for s in self.slabs])
        return mass / mass.sum()

    def effective_medium(self) -> Material:
        """The homogeneous medium with the stack's average shower properties."""
        w = self._mass_fractions()
        mats = [s.material for s in self.slabs]
        density = sum(s.material.density * s.thickness_mm for s in self.slabs) / self.total_thickness_mm
        inv_x0 = sum(wi / m.x0_g_cm2 for wi, m in zip(w, mats))  # cm^2/g
        x0_g = 1.0 / inv_x0
        ec = x0_g * sum(wi * m.ec_mev / m.x0_g_cm2 for wi, m in zip(w, mats))
        dedx = sum(wi * m.dedx_mip for wi, m in zip(w, mats))
        return Material(name=f"effective({self.name})", Z=float(sum(wi * m.Z for wi, m in zip(w, mats))),
                        A=float(sum(wi * m.A for wi, m in zip(w, mats))), density=float(density),
                        x0_mm=float(10.0 * x0_g / density), ec_mev=float(ec), dedx_mip=float(dedx))

    def mip_sampling_fraction(self) -> float:
        """Fraction of a minimum-ionising particle's energy loss deposited in active slabs."""
        loss = np.array([s.material.mip_mev_per_mm * s.thickness_mm for s in self.slabs])
        return float(loss[self.active_mask].sum() / loss.sum())

    def summary(self) -> dict:
        eff = self.effective_medium()
        return {"name": self.name, "slabs": len(self.slabs), "layers": self.num_layers,
                "thickness_mm": self.total_thickness_mm, "depth_x0": self.total_x0,
                "x0_eff_mm": eff.x0_mm, "rm_eff_mm": eff.rm_mm, "ec_eff_mev": eff.ec_mev,
                "Z_eff": eff.Z, "mip_sampling_fraction": self.mip_sampling_fraction(),
                "e_s_mev": E_SCALE_MEV}
