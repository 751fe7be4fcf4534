"""`Showers`: the ragged batch of calorimeter point clouds that every part of pcshower passes around.

Points of all showers are stored flat, ``points [P, F]``, with CSR offsets ``ptr [B+1]`` as in
PyTorch Geometric's ``Batch.ptr``: the points of shower ``i`` are ``points[ptr[i]:ptr[i+1]]``.
Per-shower conditions sit beside them as tensors of length ``B``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pcshower.units import FRAMES, PHYSICS_FRAME, particle_code

__all__ = ["Showers", "DEFAULT_FEATURES", "CONDITION_FIELDS"]

DEFAULT_FEATURES = ("x", "y", "z", "e")
#: The per-shower conditions, their trailing shape and dtype.
CONDITION_FIELDS = {
    "energy": ((), torch.float64),  # incident energy [GeV]
    "theta": ((), torch.float64),  # polar angle of the incident direction [rad]
    "phi": ((), torch.float64),  # azimuth of the incident direction [rad]
    "particle": ((), torch.int64),  # PDG code
    "position": ((3,), torch.float64),  # impact point [mm]
}


def _as_tensor(value, dtype, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=device if device is not None else value.device)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


@dataclass(eq=False)
class Showers:
    """A batch of ``B`` showers with ``P`` points in total.

    Args:
        points: ``[P, F]`` float tensor; the first four features are x, y, z, e. In the detector
            frame they are mm, mm, mm, MeV; in the physics frame R_M, R_M, X0 and the fraction of
            the incident energy (see :mod:`pcshower.units`).
        ptr: ``[B+1]`` int64 offsets, ``ptr[0] == 0``, non-decreasing, ``ptr[-1] == P``.
        energy: ``[B]`` incident energy in GeV.
        theta, phi: ``[B]`` polar angle and azimuth of the incident direction, radians.
        particle: ``[B]`` PDG codes (names such as ``"photon"`` are accepted).
        position: ``[B, 3]`` impact point in mm.
        feature_names: names of the ``F`` point features.
        frame: ``"physics"`` or ``"detector"``.
        geometry: name of the geometry the points belong to (detector frame), if any.
        metadata: free-form provenance carried to files (generator, seed, …).

    Construction validates everything and raises ``ValueError`` naming the shower and field.
    """

    points: torch.Tensor
    ptr: torch.Tensor
    energy: torch.Tensor
    theta: torch.Tensor | None = None
    phi: torch.Tensor | None = None
    particle: Any = None
    position: torch.Tensor | None = None
    feature_names: tuple[str, ...] = DEFAULT_FEATURES
    frame: str = PHYSICS_FRAME
    geometry: str | None = None
    metadata: dict = field(default_factory=dict)
    validate: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        points = self.points
        if not isinstance(points, torch.Tensor):
            points = torch.as_tensor(np.asarray(points, dtype=np.float32))
        if not points.is_floating_point():
            points = points.float()
        device = points.device
        self.points = points
        self.ptr = _as_tensor(self.ptr, torch.int64, device)
        n = self.ptr.numel() - 1
        if n < 0:
            raise ValueError("ptr must have at least one entry (ptr = [0] for an empty batch)")
        self.energy = _broadcast(self.energy, n, "energy", device)
        self.theta = _broadcast(0.0 if self.theta is None else self.theta, n, "theta", device)
        self.phi = _broadcast(0.0 if self.phi is None else self.phi, n, "phi", device)
        particle = 22 if self.particle is None else self.particle
        if isinstance(particle, str):
            particle = particle_code(particle)
        elif isinstance(particle, (list, tuple, np.ndarray)) and len(particle) and isinstance(
                np.asarray(particle).flat[0], str):
            particle = [particle_code(p) for p in particle]
        self.particle = _broadcast(particle, n, "particle", device)
        self.position = _broadcast(0.0 if self.position is None else self.position, n,
                                   "position", device)
        self.feature_names = tuple(self.feature_names)
        if self.validate:
            self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_list(cls, clouds: Sequence, energy, **kwargs) -> "Showers":
        """Build from a list of ``[n_i, F]`` arrays or tensors (one per shower)."""
        tensors = [torch.as_tensor(np.asarray(c, dtype=np.float32)) if not isinstance(c, torch.Tensor)
                   else c.float() for c in clouds]
        width = len(kwargs.get("feature_names", DEFAULT_FEATURES))
        for i, t in enumerate(tensors):
            if t.ndim != 2 or t.shape[1] != width:
                raise ValueError(f"shower {i}: points have shape {tuple(t.shape)}, "
                                 f"expected [n, {width}] for features "
                                 f"{kwargs.get('feature_names', DEFAULT_FEATURES)}")
        counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        ptr = torch.zeros(len(tensors) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=ptr[1:])
        points = torch.cat(tensors) if tensors else torch.zeros(0, width)
        return cls(points=points, ptr=ptr, energy=energy, **kwargs)

    @classmethod
    def from_counts(cls, points, counts, energy, **kwargs) -> "Showers":
        """Build from flat points and per-shower point counts."""
        counts = _as_tensor(counts, torch.int64)
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        return cls(points=points, ptr=ptr, energy=energy, **kwargs)

    @classmethod
    def empty(cls, feature_names=DEFAULT_FEATURES, **kwargs) -> "Showers":
        return cls(points=torch.zeros(0, len(feature_names)), ptr=torch.zeros(1, dtype=torch.int64),
                   energy=torch.zeros(0), feature_names=feature_names, **kwargs)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        self._validate_structure()
        self._validate_point_values()

    def _validate_structure(self) -> None:
        """Shapes, offsets and conditions; not the point values (see _validate_point_values)."""
        p, ptr = self.points, self.ptr
        if p.ndim != 2:
            raise ValueError(f"points must be 2-D [P, F], got shape {tuple(p.shape)}")
        if p.shape[1] != len(self.feature_names):
            raise ValueError(f"points have {p.shape[1]} features but feature_names has "
                             f"{len(self.feature_names)}: {self.feature_names}")
        if self.feature_names[:4] != DEFAULT_FEATURES:
            raise ValueError(f"the first four features must be {DEFAULT_FEATURES}, "
                             f"got {self.feature_names[:4]}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if ptr.ndim != 1:
            raise ValueError(f"ptr must be 1-D, got shape {tuple(ptr.shape)}")
        if ptr[0].item() != 0:
            raise ValueError(f"ptr must start at 0, got ptr[0] = {ptr[0].item()}")
        steps = ptr[1:] - ptr[:-1]
        if (steps < 0).any():
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(f"shower {i}: ptr is not monotone (ptr[{i}] = {ptr[i].item()} > "
                             f"ptr[{i + 1}] = {ptr[i + 1].item()})")
        if ptr[-1].item() != p.shape[0]:
            raise ValueError(f"ptr ends at {ptr[-1].item()} but there are {p.shape[0]} points")
        self._validate_conditions()

    def _validate_point_values(self) -> None:
        """No NaN or infinite point feature, no negative point energy."""
        p = self.points
        # cheap reductions first (no [P, F] temporaries); the exact search only on failure
        if p.numel() and not torch.isfinite(p.sum(dim=0)).all() and (bad := ~torch.isfinite(p)).any():
            row, col = (int(v) for v in torch.nonzero(bad)[0])
            kind = "NaN" if torch.isnan(p[row, col]) else "infinite value"
            raise ValueError(f"shower {self._shower_of(row)}: {kind} in point feature "
                             f"{self.feature_names[col]!r} (point {row})")
        if p.shape[0] and p[:, 3].min() < 0:
            neg = p[:, 3] < 0
            row = int(torch.nonzero(neg)[0])
            raise ValueError(f"shower {self._shower_of(row)}: negative energy "
                             f"{p[row, 3].item():g} in point feature 'e' (point {row})")

    def _validate_conditions(self) -> None:
        for name in ("energy", "theta", "phi", "position"):
            value = getattr(self, name)
            bad = ~torch.isfinite(value)
            if bad.ndim > 1:
                bad = bad.any(dim=1)
            if bad.any():
                i = int(torch.nonzero(bad)[0])
                raise ValueError(f"shower {i}: condition {name!r} is not finite ({value[i].tolist()})")
        if (self.energy <= 0).any():
            i = int(torch.nonzero(self.energy <= 0)[0])
            raise ValueError(f"shower {i}: condition 'energy' must be > 0 GeV, got "
                             f"{self.energy[i].item():g}")
        out = (self.theta < 0) | (self.theta > np.pi)
        if out.any():
            i = int(torch.nonzero(out)[0])
            raise ValueError(f"shower {i}: condition 'theta' = {self.theta[i].item():g} rad is "
                             f"outside [0, pi] (angles are radians inside pcshower)")

    def _shower_of(self, point_index: int) -> int:
        return int(torch.searchsorted(self.ptr, torch.tensor([point_index], device=self.ptr.device),
                                      right=True)[0]) - 1

    # ------------------------------------------------------------------ sizes and views
    def __len__(self) -> int:
        return self.ptr.numel() - 1

    @property
    def num_showers(self) -> int:
        return len(self)

    @property
    def num_points(self) -> torch.Tensor:
        """``[B]`` number of points of each shower."""
        return self.ptr[1:] - self.ptr[:-1]

    @property
    def total_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.points.shape[1])

    @property
    def device(self) -> torch.device:
        return self.points.device

    @property
    def batch(self) -> torch.Tensor:
        """``[P]`` index of the shower each point belongs to (PyG's ``batch`` vector)."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), self.num_points)

    def feature(self, name: str) -> torch.Tensor:
        try:
            return self.points[:, self.feature_names.index(name)]
        except ValueError:
            raise KeyError(f"no point feature {name!r}; features are {self.feature_names}") from None

    x = property(lambda self: self.points[:, 0])
    y = property(lambda self: self.points[:, 1])
    z = property(lambda self: self.points[:, 2])
    e = property(lambda self: self.points[:, 3])

    def shower(self, i: int) -> torch.Tensor:
        """Points ``[n_i, F]`` of shower ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shower index {i} out of range for {n} showers")
        i %= n
        return self.points[int(self.ptr[i]):int(self.ptr[i + 1])]

    def conditions(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in CONDITION_FIELDS}

    def _replace(self, **changes) -> "Showers":
        fields = dict(points=self.points, ptr=self.ptr, **self.conditions(),
                      feature_names=self.feature_names, frame=self.frame, geometry=self.geometry,
                      metadata=dict(self.metadata), validate=False)
        fields.update(changes)
        return Showers(**fields)

    def __getitem__(self, index) -> "Showers":
        """Select showers by an int, a slice, an index array or a boolean mask."""
        n = len(self)
        if isinstance(index, (int, np.integer)):
            if not -n <= index < n:
                raise IndexError(f"shower index {index} out of range for {n} showers")
            index = slice(int(index) % n, int(index) % n + 1)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                stop = max(start, stop)
                a, b = int(self.ptr[start]), int(self.ptr[stop])
                cond = {k: v[start:stop] for k, v in self.conditions().items()}
                return self._replace(points=self.points[a:b], ptr=self.ptr[start:stop + 1] - a,
                                     **cond)
            index = torch.arange(start, stop, step)
        index = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index,
                                device=self.device)
        if index.dtype == torch.bool:
            if index.numel() != n:
                raise IndexError(f"boolean mask has {index.numel()} entries for {n} showers")
            index = torch.nonzero(index).flatten()
        index = index.long()
        if index.numel() and (index.min() < -n or index.max() >= n):
            raise IndexError(f"shower index out of range for {n} showers")
        index = index % max(n, 1)
        counts = self.num_points[index]
        starts = self.ptr[:-1][index]
        ptr = torch.zeros(index.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        # point rows: for each selected shower, start + arange(count), without a Python loop
        offsets = torch.arange(int(ptr[-1]), device=self.device) - torch.repeat_interleave(
            ptr[:-1], counts)
        rows = torch.repeat_interleave(starts, counts) + offsets
        cond = {k: v[index] for k, v in self.conditions().items()}
        return self._replace(points=self.points[rows], ptr=ptr, **cond)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def split(self, size: int | Sequence[int]) -> list["Showers"]:
        """Split into consecutive batches: of ``size`` showers each, or of the given sizes."""
        if isinstance(size, int):
            if size <= 0:
                raise ValueError(f"split size must be positive, got {size}")
            bounds = list(range(0, len(self), size)) + [len(self)]
        else:
            if sum(size) != len(self):
                raise ValueError(f"split sizes add up to {sum(size)}, not {len(self)} showers")
            bounds = [0, *np.cumsum(size).tolist()]
        return [self[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a or len(self) == 0]

    @staticmethod
    def concat(batches: Iterable["Showers"]) -> "Showers":
        """Concatenate batches with the same features and frame into one."""
        batches = list(batches)
        if not batches:
            raise ValueError("cannot concatenate an empty list of Showers")
        first = batches[0]
        for k, b in enumerate(batches[1:], 1):
            if b.feature_names != first.feature_names:
                raise ValueError(f"batch {k} has features {b.feature_names}, "
                                 f"batch 0 has {first.feature_names}")
            if b.frame != first.frame:
                raise ValueError(f"batch {k} is in the {b.frame} frame, batch 0 in the {first.frame} frame")
        counts = torch.cat([b.num_points for b in batches])
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=first.device)
        torch.cumsum(counts, 0, out=ptr[1:])
        cond = {k: torch.cat([getattr(b, k) for b in batches]) for k in CONDITION_FIELDS}
        return first._replace(points=torch.cat([b.points for b in batches]), ptr=ptr, **cond)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Showers":
        """Move to a device (and optionally cast the point features)."""
        cond = {k: v.to(device) for k, v in self.conditions().items()}
        return self._replace(points=self.points.to(device=device, dtype=dtype),
                             ptr=self.ptr.to(device), **cond)

    def with_points(self, points: torch.Tensor, feature_names=None, **changes) -> "Showers":
        """Same showers and conditions with new per-point features (same ``ptr``)."""
        return Showers(points=points, ptr=self.ptr, **self.conditions(),
                       feature_names=feature_names or self.feature_names, frame=self.frame,
                       geometry=self.geometry, metadata=dict(self.metadata),
                       **{"validate": True, **changes})

    # ------------------------------------------------------------------ conversions
    def to_numpy(self) -> dict[str, np.ndarray]:
        """Flat numpy arrays: ``points``, ``ptr`` and one array per condition."""
        out = {"points": self.points.detach().cpu().numpy(), "ptr": self.ptr.cpu().numpy()}
        out.update({k: v.detach().cpu().numpy() for k, v in self.conditions().items()})
        return out

    def to_dense(self, max_points: int | None = None, pad_value: float = 0.0):
        """Padded ``[B, N, F]`` tensor and boolean mask ``[B, N]`` (True where a point is real).

        ``N`` is the largest shower unless ``max_points`` is given; longer showers are then
        an error, not silently truncated.
        """
        counts = self.num_points
        longest = int(counts.max()) if len(self) else 0
        n = longest if max_points is None else int(max_points)
        if longest > n:
            i = int(torch.argmax(counts))
            raise ValueError(f"shower {i} has {longest} points, more than max_points={n}")
        b = len(self)
        dense = self.points.new_full((b, n, self.num_features), pad_value)
        mask = torch.zeros(b, n, dtype=torch.bool, device=self.device)
        col = torch.arange(self.total_points, device=self.device) - torch.repeat_interleave(
            self.ptr[:-1], counts)
        row = self.batch
        dense[row, col] = self.points
        mask[row, col] = True
        return dense, mask

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor, energy, **kwargs) -> "Showers":
        """Inverse of :meth:`to_dense` (points kept in row order where ``mask`` is True)."""
        counts = mask.sum(dim=1)
        return cls.from_counts(dense[mask], counts, energy, **kwargs)

    def to_pyg(self):
        """A ``torch_geometric.data.Batch``: node features ``x = points``, ``pos = xyz``, and the
        conditions as graph-level attributes (``energy``, ``theta``, ``phi``, ``particle``,
        ``position``)."""
        from torch_geometric.data import Batch

        batch = Batch(x=self.points, pos=self.points[:, :3], batch=self.batch, ptr=self.ptr,
                      **self.conditions())
        batch._num_graphs = len(self)
        return batch

    @classmethod
    def from_pyg(cls, batch, **kwargs) -> "Showers":
        """From a PyG ``Batch`` made by :meth:`to_pyg` or ``Batch.from_data_list`` of ``Data``
        with ``x`` (points) and per-graph ``energy`` (and optionally the other conditions)."""
        ptr = getattr(batch, "ptr", None)
        if ptr is None:
            counts = torch.bincount(batch.batch, minlength=batch.num_graphs)
            ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=ptr[1:])
        cond = {k: getattr(batch, k) for k in CONDITION_FIELDS if getattr(batch, k, None) is not None}
        if "position" in cond:
            cond["position"] = cond["position"].reshape(-1, 3)
        cond.update(kwargs)
        return cls(points=batch.x, ptr=ptr, **cond)

    def __repr__(self) -> str:
        return (f"Showers(showers={len(self)}, points={self.total_points}, "
                f"features={list(self.feature_names)}, frame={self.frame!r}, "
                f"geometry={self.geometry!r}, device={self.device})")


def _broadcast(value, n: int, name: str, device) -> torch.Tensor:
    shape, dtype = CONDITION_FIELDS[name]
    t = _as_tensor(value, dtype, device)
    if t.ndim == 0 or (t.shape == shape):
        return t.expand(n, *shape).clone()
    if t.shape[0] != n or tuple(t.shape[1:]) != shape:
        raise ValueError(f"condition {name!r} has shape {tuple(t.shape)}, expected "
                         f"{(n, *shape)} for {n} showers (or one value for all)")
    return t
