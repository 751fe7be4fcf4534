"""HDF5 exchange with the field: the CaloChallenge voxel format and CaloClouds-style padded points.

CaloChallenge 2022 (github.com/CaloChallenge/homepage): datasets ``incident_energies`` [N, 1]
and ``showers`` [N, n_voxels], both in MeV; voxel order is the geometry's (r fastest, then
alpha, then layer), which the geometry adapters produce.

CaloClouds (FLC-QU-hep/CaloClouds-2): ``events`` [N, 4, max_points] holding x, y, z, e per
point, zero-padded, and ``energy`` [N]. pcshower writes its own units (recorded as attributes)
plus ``num_points`` [N] and the other conditions, so its files round-trip exactly; reading a
file without ``num_points`` (CaloClouds' own) counts the points with e > 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from pcshower.data import Showers
from pcshower.io._atomic import atomic_path
from pcshower.units import DETECTOR_FRAME, DETECTOR_FRAME_UNITS, PHYSICS_FRAME_UNITS

__all__ = ["write_calochallenge", "read_calochallenge", "write_caloclouds", "read_caloclouds",
           "hdf5_kind"]


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None


def _require(f: h5py.File, path: Path, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if key not in f:
            raise ValueError(f"{path}: not a {what} file (no '{key}' dataset; found "
                             f"{sorted(f.keys())})")


def hdf5_kind(path: str | os.PathLike) -> str:
    """``"calochallenge"``, ``"caloclouds"`` or ``"unknown"`` by the datasets a file holds."""
    with _open(Path(path)) as f:
        if "showers" in f and "incident_energies" in f:
            return "calochallenge"
        if "events" in f and "energy" in f:
            return "caloclouds"
    return "unknown"


def write_calochallenge(path: str | os.PathLike, incident_energies_mev, showers_mev, *,
                        metadata: dict | None = None, compression: str | None = "gzip") -> Path:
    """Write a CaloChallenge file: ``incident_energies`` [N, 1] and ``showers`` [N, V] in MeV.

    ``showers_mev`` must already be in the geometry's CaloChallenge voxel order
    (``geometry.project(...).to_dense()`` of a CaloChallenge readout).
    """
    inc = np.asarray(incident_energies_mev, dtype=np.float64).reshape(-1, 1)
    vox = np.asarray(showers_mev.cpu().numpy() if isinstance(showers_mev, torch.Tensor)
                     else showers_mev, dtype=np.float64)
    if vox.ndim != 2 or vox.shape[0] != inc.shape[0]:
        raise ValueError(f"showers must be [N, n_voxels] with N = {inc.shape[0]} incident "
                         f"energies, got shape {vox.shape}")
    if not np.isfinite(vox).all() or (vox < 0).any():
        raise ValueError("voxel energies must be finite and non-negative")
    if not np.isfinite(inc).all() or (inc <= 0).any():
        raise ValueError("incident energies must be finite and positive (MeV)")
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("incident_energies", data=inc, compression=compression)
        f.create_dataset("showers", data=vox, compression=compression)
        if metadata:
            f.attrs["pcshower"] = json.dumps(metadata)
    return path


def read_calochallenge(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CaloChallenge file: ``(incident_energies_mev [N], showers_mev [N, V])``."""
    path = Path(path)
    with _open(path) as f:
        _require(f, path, ("incident_energies", "showers"), "CaloChallenge")
        inc = f["incident_energies"][:].reshape(-1)
        vox = f["showers"][:]
    if vox.ndim != 2 or vox.shape[0] != inc.shape[0]:
        raise ValueError(f"{path}: 'showers' has shape {vox.shape} for {inc.shape[0]} incident energies")
    for name, values in (("incident_energies", inc), ("showers", vox)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ValueError(f"{path}: '{name}' holds {bad} NaN or infinite values; the file is "
                             "damaged or was written from broken showers")
    if (inc <= 0).any():
        raise ValueError(f"{path}: 'incident_energies' holds {int((inc <= 0).sum())} values <= 0 "
                         "(MeV); CaloChallenge incident energies are positive")
    if (vox < 0).any():
        raise ValueError(f"{path}: 'showers' holds {int((vox < 0).sum())} negative voxel energies")
    return inc, vox


def write_caloclouds(path: str | os.PathLike, showers: Showers, *, max_points: int | None = None,
                     compression: str | None = "gzip") -> Path:
    """Write CaloClouds-style padded points: ``events`` [N, 4, max_points] (x, y, z, e),
    ``energy`` [N] in GeV, plus ``num_points``, ``theta``, ``phi``, ``particle``, ``position``.

    Extra point features beyond x, y, z, e are not part of this format and are refused.
    """
    if showers.num_features != 4:
        raise ValueError(f"the CaloClouds format holds x, y, z, e only; these showers have "
                         f"features {showers.feature_names}: drop the extras first")
    dense, _ = showers.to_dense(max_points=max_points)
    events = dense.permute(0, 2, 1).contiguous().cpu().numpy()
    arrays = showers.to_numpy()
    units = DETECTOR_FRAME_UNITS if showers.frame == DETECTOR_FRAME else PHYSICS_FRAME_UNITS
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("events", data=events, compression=compression)
        f.create_dataset("energy", data=arrays["energy"])
        f.create_dataset("num_points", data=showers.num_points.cpu().numpy())
        for key in ("theta", "phi", "particle", "position"):
            f.create_dataset(key, data=arrays[key])
        f.attrs["frame"] = showers.frame
        f.attrs["units"] = json.dumps({"points": units, "energy": "GeV"})
        f.attrs["geometry"] = showers.geometry or ""
        f.attrs["provenance"] = json.dumps(showers.metadata)
    return path


def read_caloclouds(path: str | os.PathLike, *, frame: str | None = None,
                    energy_scale: float = 1.0) -> Showers:
    """Read CaloClouds-style padded points into :class:`Showers`.

    Args:
        frame: frame of the points when the file does not say (CaloClouds' own files are
            detector-frame).
        energy_scale: multiplies point energies, e.g. 1000 for CaloClouds' files in GeV.
    """
    path = Path(path)
    with _open(path) as f:
        _require(f, path, ("events", "energy"), "CaloClouds-style")
        events = f["events"][:]
        energy = f["energy"][:].reshape(-1)
        if events.ndim != 3 or events.shape[1] != 4 or events.shape[0] != energy.shape[0]:
            raise ValueError(f"{path}: 'events' has shape {events.shape}, expected "
                             f"[{energy.shape[0]}, 4, max_points]")
        points_first = np.ascontiguousarray(events.transpose(0, 2, 1))
        if "num_points" in f:
            counts = f["num_points"][:].astype(np.int64)
            mask = np.arange(points_first.shape[1])[None, :] < counts[:, None]
        else:
            mask = points_first[:, :, 3] > 0
        extra = {k: f[k][:] for k in ("theta", "phi", "particle", "position") if k in f}
        attrs = dict(f.attrs)
    points = points_first[mask]
    if energy_scale != 1.0:
        points[:, 3] *= energy_scale
    file_frame = attrs.get("frame")
    provenance = json.loads(attrs["provenance"]) if "provenance" in attrs else {}
    try:
        return Showers.from_counts(torch.from_numpy(points), torch.from_numpy(mask.sum(axis=1)),
                                   torch.from_numpy(energy), frame=file_frame or frame or DETECTOR_FRAME,
                                   geometry=attrs.get("geometry") or None, metadata=provenance,
                                   **{k: torch.from_numpy(v) for k, v in extra.items()})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
