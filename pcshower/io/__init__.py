"""Reading and writing showers: native Parquet (files and shard directories) and HDF5 exchange."""

from __future__ import annotations

import os
from pathlib import Path

from pcshower.io.hdf5 import (hdf5_kind, read_calochallenge, read_caloclouds, write_calochallenge,
                              write_caloclouds)
from pcshower.io.parquet import (FORMAT_VERSION, LAYOUTS, ParquetBatchWriter, count_showers,
                                 iter_parquet, list_shards, points_path, read_hits_parquet,
                                 read_metadata, read_parquet, shard_name, write_hits_parquet,
                                 write_parquet)

__all__ = [
    "FORMAT_VERSION", "write_parquet", "read_parquet", "iter_parquet", "read_metadata",
    "ParquetBatchWriter", "LAYOUTS", "points_path",
    "list_shards", "shard_name", "count_showers", "write_hits_parquet", "read_hits_parquet",
    "write_calochallenge", "read_calochallenge", "write_caloclouds", "read_caloclouds",
    "hdf5_kind", "read_showers", "write_showers", "HDF5_SUFFIXES",
]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def is_hdf5(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in HDF5_SUFFIXES


def read_showers(path: str | os.PathLike):
    """Point clouds from a Parquet file/directory or a CaloClouds-style HDF5 file."""
    if is_hdf5(path):
        kind = hdf5_kind(path)
        if kind == "calochallenge":
            raise ValueError(f"{path}: a CaloChallenge voxel file holds no point clouds; read it "
                             "with pcshower.io.read_calochallenge")
        return read_caloclouds(path)
    return read_parquet(path)


def write_showers(path: str | os.PathLike, showers, **kwargs) -> Path:
    """Write point clouds as Parquet (``.parquet``) or CaloClouds-style HDF5 (``.h5``/``.hdf5``)."""
    if is_hdf5(path):
        return write_caloclouds(path, showers, **kwargs)
    if Path(path).suffix.lower() != ".parquet":
        raise ValueError(f"{path}: unknown output format; use a .parquet or .h5/.hdf5 file name")
    return write_parquet(path, showers, **kwargs)
