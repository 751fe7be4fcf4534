"""pcshower's native on-disk format: Parquet files (and directories of shards) of showers or cell hits.

Layout of a showers file (one row per shower):

- one ``list<float32>`` column per point feature (``x``, ``y``, ``z``, ``e`` and any extras),
- scalar condition columns ``energy`` [GeV], ``theta``, ``phi`` [rad], ``particle`` [PDG],
  ``position_x``, ``position_y``, ``position_z`` [mm],
- schema metadata under the key ``pcshower``: JSON with ``format``, ``format_version``,
  ``kind`` ("showers" or "hits"), ``frame``, ``units``, ``feature_names``, ``geometry`` and
  ``provenance`` (generator, pcshower version, seed, …).

Plain ``pyarrow.parquet``, pandas, polars and DuckDB read these files without pcshower.

The **flat layout** (``layout="flat"``), for reading speed, splits a showers file in two:
``NAME.parquet`` keeps one row per shower (the conditions and ``n_points``, no list columns)
and ``NAME.points.parquet`` holds one row per point (``shower``, the shower's row in
``NAME.parquet``, then the point features as plain ``float32`` columns), with row group ``g``
of the points holding exactly the points of row group ``g`` of the showers. Plain columns are
decoded without Parquet's per-value repetition levels, which is what limits ``list<float>``
reading (docs/benchmarks.md, "Parquet"). The points file is written first and the showers file
last, so the showers file appearing is what commits the pair; both carry the same ``pair``
token, checked on reading.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pcshower.data import CellHits, Showers
from pcshower.io._atomic import TMP_MARKER, atomic_path
from pcshower.units import DETECTOR_FRAME_UNITS, FRAMES, PHYSICS_FRAME, PHYSICS_FRAME_UNITS

__all__ = [
    "ParquetBatchWriter",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "write_parquet",
    "read_parquet",
    "iter_parquet",
    "read_metadata",
    "write_hits_parquet",
    "read_hits_parquet",
    "list_shards",
    "shard_name",
    "count_showers",
    "LAYOUTS",
    "points_path",
    "read_showers_table",
]

FORMAT_NAME = "pcshower"
#: Major version changes break readers; minor versions only add optional fields.
FORMAT_VERSION = "1.0"
_META_KEY = b"pcshower"
_POSITION_COLUMNS = ("position_x", "position_y", "position_z")
#: Default showers per row group: the unit of streaming reads.
ROW_GROUP_SHOWERS = 2048
#: Layouts of a showers file: point lists in the shower rows, or a separate flat points table.
LAYOUTS = ("list", "flat")
#: Suffix of the points table of a flat-layout file (``NAME.parquet`` -> ``NAME.points.parquet``).
POINTS_SUFFIX = ".points.parquet"


def points_path(path: str | os.PathLike) -> Path:
    """The points table that belongs to the flat-layout showers file ``path``."""
    path = Path(path)
    stem = path.name[:-len(".parquet")] if path.name.endswith(".parquet") else path.name
    return path.with_name(stem + POINTS_SUFFIX)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Parquet layout {layout!r}; choose one of {LAYOUTS}")
    return layout


def shard_name(index: int) -> str:
    """File name of shard ``index`` in a sharded dataset directory."""
    return f"shard-{int(index):05d}.parquet"


def list_shards(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a dataset: ``path`` itself, or the sorted shards of a directory
    (temporary files of interrupted writes are skipped)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet")
                       if TMP_MARKER not in p.name and not p.name.startswith(".")
                       and not p.name.endswith(POINTS_SUFFIX))
        if not files:
            frames = [f for f in ("physics", "detector") if (path / f).is_dir()]
            if frames:
                raise FileNotFoundError(f"{path} holds a production in both frames: read "
                                        + " or ".join(str(path / f) for f in frames))
            raise FileNotFoundError(f"{path}: directory holds no .parquet shards")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.name.endswith(POINTS_SUFFIX):
        main = path.with_name(path.name[:-len(POINTS_SUFFIX)] + ".parquet")
        raise ValueError(f"{path} is the points table of a flat-layout file: read {main}")
    return [path]


def _base_metadata(kind: str, frame: str, geometry: str | None, metadata: dict | None) -> dict:
    from pcshower import __version__

    provenance = {"pcshower_version": __version__}
    provenance.update(metadata or {})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "frame": frame,
        "geometry": geometry,
        "units": {
            "points": PHYSICS_FRAME_UNITS if frame == PHYSICS_FRAME else DETECTOR_FRAME_UNITS,
            "energy": "GeV", "theta": "rad", "phi": "rad", "position": "mm",
            "hit_energy": "MeV",
        },
        "provenance": provenance,
    }


def _arrow(values: np.ndarray) -> pa.Array:
    """A numeric NumPy array as an Arrow array over the same memory. (``pa.array`` on a NumPy
    array imports pandas, 0.4 s of a short ``pcshower generate``.)"""
    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_ or values.ndim != 1 or values.dtype.kind not in "iuf":
        return pa.array(values)
    values = values.astype(values.dtype.newbyteorder("="), copy=False)  # Arrow is native-endian
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def _list_column(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(_arrow(offsets.astype(np.int32, copy=False)), _arrow(values))


def _large_safe_offsets(ptr: np.ndarray) -> np.ndarray:
    if ptr[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{ptr[-1]} points in one table exceed Parquet list offsets; "
                         "write the showers in smaller shards")
    return ptr


def _condition_columns(conditions: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    cols = {name: _arrow(conditions[name]) for name in ("energy", "theta", "phi", "particle")}
    for k, name in enumerate(_POSITION_COLUMNS):
        cols[name] = _arrow(conditions["position"][:, k])
    return cols


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns to dictionary-encode: never pays for the continuous per-point values and costs
    write time; it still serves the repetitive scalar conditions (particle, fixed angles) and
    the flat layout's ``shower`` column (runs of one value per shower)."""
    if b'"kind": "points"' in (schema.metadata or {}).get(_META_KEY, b""):
        return ["shower"]
    return [f.name for f in schema if not pa.types.is_list(f.type)]


def _write_table(path, table: pa.Table, row_group_size: int, compression: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression=compression,
                       use_dictionary=_dictionary_columns(table.schema))
    return path


def write_parquet(path: str | os.PathLike, showers: Showers, *, metadata: dict | None = None,
                  row_group_size: int = ROW_GROUP_SHOWERS, compression: str = "zstd",
                  layout: str = "list") -> Path:
    """Write ``showers`` to one Parquet file, atomically (temp file + rename).

    Args:
        metadata: provenance to record (``generator``, ``seed``, …); merged over
            ``showers.metadata``. The pcshower version is added automatically.
        row_group_size: showers per row group, the unit of :func:`iter_parquet`.
        layout: ``"list"`` (one row per shower, point lists) or ``"flat"`` (a showers table
            plus ``NAME.points.parquet`` with one row per point; faster to read, see the module
            docstring). ``compression="lz4"`` or ``"none"`` reads faster still than zstd.
    """
    if _check_layout(layout) == "flat":
        with ParquetBatchWriter(path, "showers", metadata=metadata, row_group_size=row_group_size,
                                compression=compression, layout="flat") as writer:
            writer.write(showers)
        return Path(path)
    return _write_table(path, _showers_table(showers, metadata), row_group_size, compression)


def _showers_meta(showers: Showers, metadata: dict | None) -> dict:
    meta = _base_metadata("showers", showers.frame, showers.geometry,
                          {**showers.metadata, **(metadata or {})})
    meta["feature_names"] = list(showers.feature_names)
    return meta


def _with_meta(columns: dict, meta: dict) -> pa.Table:
    return pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def _showers_table(showers: Showers, metadata: dict | None) -> pa.Table:
    arrays = showers.to_numpy()
    ptr = _large_safe_offsets(arrays["ptr"])
    columns = {name: _list_column(np.ascontiguousarray(arrays["points"][:, k]), ptr)
               for k, name in enumerate(showers.feature_names)}
    columns.update(_condition_columns(arrays))
    return _with_meta(columns, _showers_meta(showers, metadata))


def _flat_tables(showers: Showers, metadata: dict | None, first_row: int, pair: str,
                 points_file: str) -> tuple[pa.Table, pa.Table]:
    """The showers table and the points table of a flat-layout batch whose first shower is row
    ``first_row`` of the file."""
    arrays = showers.to_numpy()
    counts = np.diff(arrays["ptr"])
    if len(counts) and counts.max() > np.iinfo(np.int32).max:
        raise ValueError(f"a shower of {counts.max()} points exceeds the flat layout's int32 counts")
    rows = {"n_points": _arrow(counts.astype(np.int32))}
    rows.update(_condition_columns(arrays))
    meta = _showers_meta(showers, metadata)
    meta.update(layout="flat", points_file=points_file, pair=pair)
    shower = np.repeat(np.arange(first_row, first_row + len(counts), dtype=np.int32), counts)
    points = {"shower": _arrow(shower)}
    points.update({name: _arrow(np.ascontiguousarray(arrays["points"][:, k]))
                   for k, name in enumerate(showers.feature_names)})
    points_meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "points",
                   "pair": pair, "feature_names": list(showers.feature_names)}
    return _with_meta(rows, meta), _with_meta(points, points_meta)


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file (truncated or corrupt?): {err}") from None


def _check_metadata(path: Path, schema: pa.Schema, kind: str) -> dict:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not a pcshower file (no 'pcshower' schema metadata); "
                         "write showers with pcshower.io.write_parquet")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: pcshower metadata is not valid JSON: {err}") from None
    major = str(meta.get("format_version", "0")).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise ValueError(f"{path}: pcshower format version {meta.get('format_version')} cannot be "
                         f"read by this pcshower (format {FORMAT_VERSION}); upgrade pcshower")
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: holds {meta.get('kind')!r} rows, expected {kind!r} "
                         f"(use read_{'hits_' if kind == 'hits' else ''}parquet)")
    frame = meta.get("frame")
    if frame not in FRAMES:
        raise ValueError(f"{path}: metadata frame {frame!r} is not one of {FRAMES}")
    expected = _base_metadata(kind, frame, None, None)["units"]
    units = meta.get("units") or {}
    for key, want in expected.items():
        if key in units and units[key] != want:
            raise ValueError(f"{path}: metadata says {key} is in {units[key]!r}, but pcshower "
                             f"{frame}-frame files hold {want!r}; convert the values and the "
                             "metadata to pcshower's units first")
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The pcshower metadata (frame, units, provenance, …) of a file or a dataset's first shard,
    with ``num_showers`` counted over all shards."""
    files = list_shards(path)
    pf = _open(files[0])
    raw = (pf.schema_arrow.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{files[0]}: not a pcshower file (no 'pcshower' schema metadata)")
    meta = json.loads(raw)
    meta["num_showers"] = sum(_open(f).metadata.num_rows for f in files)
    meta["num_files"] = len(files)
    return meta


def count_showers(path: str | os.PathLike) -> int:
    return sum(_open(f).metadata.num_rows for f in list_shards(path))


def _column(table: pa.Table, name: str) -> torch.Tensor:
    """A scalar column as a (writable, owned) tensor."""
    return torch.from_numpy(np.array(table.column(name).to_numpy()))


def _flat_list(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Values and offsets [n+1] of a list column, whatever its chunking and slicing."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    start, stop = int(offsets[0]), int(offsets[-1])
    return values[start:stop], (offsets - start).astype(np.int64)


def _table_to_showers(path: Path, table: pa.Table, meta: dict) -> Showers:
    names = tuple(meta.get("feature_names", ("x", "y", "z", "e")))
    missing = [n for n in (*names, "energy", "theta", "phi", "particle", *_POSITION_COLUMNS)
               if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    feats, ptr = [], None
    for name in names:
        values, offsets = _flat_list(table.column(name))
        if ptr is None:
            ptr = offsets
        elif not np.array_equal(offsets, ptr):
            raise ValueError(f"{path}: column {name!r} has a different number of points per "
                             "shower than column 'x'")
        feats.append(values)
    return _build_showers(path, names, [feats], ptr, table, meta)


def _build_showers(path: Path, names: tuple[str, ...], parts, ptr: np.ndarray, table: pa.Table,
                   meta: dict) -> Showers:
    """``Showers`` from point columns (``parts``: per row group, one 1-D array per feature),
    offsets and the conditions table. The point values are checked on the contiguous columns
    (one pass each, no strided reads of ``[P, F]``); Showers' own check, which names the culprit,
    runs only when they fail."""
    points = torch.empty((int(ptr[-1]), len(names)), dtype=torch.float32)
    start, values_ok = 0, True
    for arrays in parts:
        with warnings.catch_warnings():  # Arrow's buffers are read-only; they are only read
            warnings.simplefilter("ignore", UserWarning)
            columns = [torch.from_numpy(np.asarray(a)) for a in arrays]
        values_ok = values_ok and bool(torch.isfinite(torch.stack([c.sum() for c in columns])).all())
        if len(columns[3]):
            values_ok = values_ok and columns[3].min().item() >= 0
        stop = start + len(columns[0])
        if stop > len(points):
            raise ValueError(f"{path}: more point values than the offsets count ({len(points)})")
        torch.stack(columns, dim=1, out=points[start:stop])
        start = stop
    if start != len(points):
        raise ValueError(f"{path}: {start} point values where the offsets count {len(points)}")
    try:
        showers = Showers(points=points, ptr=torch.from_numpy(ptr), **_conditions(table),
                          feature_names=names, frame=meta.get("frame", PHYSICS_FRAME),
                          geometry=meta.get("geometry"), metadata=dict(meta.get("provenance", {})),
                          validate=False)
        showers._validate_structure()
        if not values_ok:
            showers._validate_point_values()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return showers


def _conditions(table: pa.Table) -> dict[str, torch.Tensor]:
    cond = {k: _column(table, k) for k in ("energy", "theta", "phi", "particle")}
    cond["position"] = torch.stack([_column(table, n) for n in _POSITION_COLUMNS], dim=1)
    return cond


def _read_table(path: Path, pf: pq.ParquetFile, row_groups=None, columns=None) -> pa.Table:
    try:
        if row_groups is None:
            return pf.read(columns=columns)
        return pf.read_row_groups(row_groups, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: cannot read data (truncated or corrupt?): {err}") from None


def read_showers_table(path: Path, pf: pq.ParquetFile, meta: dict, row_groups=None) -> Showers:
    """The showers of ``row_groups`` (all when ``None``) of one file, either layout."""
    table = _read_table(path, pf, row_groups)
    if meta.get("layout", "list") == "list":
        return _table_to_showers(path, table, meta)
    return _flat_to_showers(path, pf, table, meta, row_groups)


def _open_points(path: Path, pf: pq.ParquetFile, meta: dict) -> tuple[Path, pq.ParquetFile]:
    ppath = path.with_name(str(meta.get("points_file") or points_path(path).name))
    if not ppath.exists():
        raise ValueError(f"{path}: its points table {ppath.name} is missing (the flat layout keeps "
                         "the points beside the showers file); copy both files, or rewrite them")
    ppf = _open(ppath)
    try:
        pmeta = json.loads((ppf.schema_arrow.metadata or {}).get(_META_KEY, b"{}"))
    except json.JSONDecodeError:
        pmeta = {}
    if pmeta.get("kind") != "points" or pmeta.get("pair") != meta.get("pair"):
        raise ValueError(f"{ppath}: is not the points table written with {path.name} (its 'pair' "
                         "token differs: one of the two files was replaced); rewrite both")
    if ppf.metadata.num_row_groups != pf.metadata.num_row_groups:
        raise ValueError(f"{ppath}: {ppf.metadata.num_row_groups} row groups, but {path.name} has "
                         f"{pf.metadata.num_row_groups}; the pair is damaged, rewrite it")
    return ppath, ppf


def _flat_to_showers(path: Path, pf: pq.ParquetFile, table: pa.Table, meta: dict,
                     row_groups) -> Showers:
    names = tuple(meta.get("feature_names", ("x", "y", "z", "e")))
    missing = [n for n in ("n_points", "energy", "theta", "phi", "particle", *_POSITION_COLUMNS)
               if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    counts = table.column("n_points").to_numpy().astype(np.int64)
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    ppath, ppf = _open_points(path, pf, meta)
    missing = [n for n in names if n not in ppf.schema_arrow.names]
    if missing:
        raise ValueError(f"{ppath}: missing point column(s) {missing}")
    ptable = _read_table(ppath, ppf, row_groups, columns=list(names))
    if ptable.num_rows != ptr[-1]:
        raise ValueError(f"{ppath}: holds {ptable.num_rows} points where {path.name} counts "
                         f"{ptr[-1]}; the pair is damaged, rewrite it")
    columns = [ptable.column(name) for name in names]
    if len({tuple(len(c) for c in col.chunks) for col in columns}) != 1:  # unequal chunking
        columns = [pa.chunked_array([col.combine_chunks()]) for col in columns]
    parts = ([c.to_numpy(zero_copy_only=False) for c in chunks]
             for chunks in zip(*(col.chunks for col in columns)))  # one per row group
    return _build_showers(path, names, parts, ptr, table, meta)


def read_parquet(path: str | os.PathLike) -> Showers:
    """Read a showers file, or every shard of a dataset directory, into one :class:`Showers`."""
    parts = list(iter_parquet(path, batch_size=None))
    return Showers.concat(parts) if len(parts) > 1 else parts[0]


def iter_parquet(path: str | os.PathLike, batch_size: int | None = None,
                 max_showers: int | None = None) -> Iterator[Showers]:
    """Stream a file or dataset directory as :class:`Showers` batches, reading one row group at a
    time (``batch_size=None``: one batch per file) so memory stays bounded by a row group.

    With ``batch_size``, row groups are regrouped into batches of exactly ``batch_size`` showers
    (the last one may be smaller). With ``max_showers``, the stream stops after that many
    showers (the last batch is cut).
    """
    if max_showers is not None and max_showers < 0:
        raise ValueError(f"max_showers must be >= 0, got {max_showers}")
    left = math.inf if max_showers is None else int(max_showers)
    for batch in _iter_parquet(path, batch_size):
        if left <= 0:
            return
        if len(batch) > left:
            batch = batch[:left]
        left -= len(batch)
        yield batch


def _iter_parquet(path, batch_size):
    pending: list[Showers] = []
    held = 0
    for file in list_shards(path):
        pf = _open(file)
        meta = _check_metadata(file, pf.schema_arrow, "showers")
        if batch_size is None:
            yield read_showers_table(file, pf, meta)
            continue
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # row groups that fill a batch together are read in one call (no concatenation copy)
        groups, rows = [], 0
        for g in range(pf.metadata.num_row_groups):
            groups.append(g)
            rows += pf.metadata.row_group(g).num_rows
            if held + rows < batch_size and g + 1 < pf.metadata.num_row_groups:
                continue
            part = read_showers_table(file, pf, meta, groups)
            groups, rows = [], 0
            pending.append(part)
            held += len(part)
            while held >= batch_size:
                merged = pending[0] if len(pending) == 1 else Showers.concat(pending)
                yield merged[:batch_size]
                rest = merged[batch_size:]
                pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if pending and held:
        yield Showers.concat(pending)


def write_hits_parquet(path: str | os.PathLike, hits: CellHits, conditions: Showers | dict | None = None,
                       *, metadata: dict | None = None, row_group_size: int = ROW_GROUP_SHOWERS,
                       compression: str = "zstd") -> Path:
    """Write cell hits (one row per shower: ``cell_id`` and ``energy`` [MeV] list columns,
    ``outside_energy``/``outside_points``, and the showers' conditions when given)."""
    return _write_table(path, _hits_table(hits, conditions, metadata), row_group_size, compression)


def _hits_table(hits: CellHits, conditions, metadata: dict | None) -> pa.Table:
    arrays = hits.to_numpy()
    ptr = _large_safe_offsets(arrays["ptr"])
    columns = {"cell_id": _list_column(arrays["cell_id"].astype(np.int64), ptr),
               "energy_mev": _list_column(arrays["energy"].astype(np.float32), ptr),
               "outside_energy": _arrow(arrays["outside_energy"]),
               "outside_points": _arrow(arrays["outside_points"])}
    if conditions is not None:
        cond = conditions.to_numpy() if isinstance(conditions, Showers) else conditions
        if len(cond["energy"]) != len(hits):
            raise ValueError(f"{len(hits)} showers of hits but {len(cond['energy'])} conditions")
        columns.update(_condition_columns(cond))
    meta = _base_metadata("hits", "detector", hits.geometry, {**hits.metadata, **(metadata or {})})
    meta["num_cells"] = int(hits.num_cells)
    return pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


class ParquetBatchWriter:
    """Write showers (``kind="showers"``) or cell hits (``kind="hits"``) batch by batch into one
    Parquet file, so a long generation never holds more than a batch. The file is written under
    a hidden temporary name and appears under ``path`` only when the writer is closed without
    error (use it as a context manager); schema and metadata are the first batch's.

    ``write(batch, conditions=None)``: a :class:`Showers` batch, or :class:`CellHits` with the
    showers (or condition dict) they belong to.
    """

    def __init__(self, path: str | os.PathLike, kind: str = "showers", *, metadata: dict | None = None,
                 row_group_size: int = ROW_GROUP_SHOWERS, compression: str = "zstd",
                 layout: str = "list"):
        if kind not in ("showers", "hits"):
            raise ValueError(f"kind must be 'showers' or 'hits', got {kind!r}")
        if _check_layout(layout) == "flat" and kind != "showers":
            raise ValueError("the flat layout is for showers files; cell hits are written as lists")
        self.path, self.kind, self.metadata = Path(path), kind, metadata
        self.row_group_size, self.compression = int(row_group_size), compression
        self.layout = layout
        self._parts = [_Part(self.path)]
        if layout == "flat":
            import uuid

            self._pair = uuid.uuid4().hex
            self._parts.append(_Part(points_path(self.path)))
        self.rows = 0

    def write(self, batch, conditions=None) -> None:
        if self.layout == "flat":
            self._write_flat(batch)
            return
        if self.kind == "showers":
            table = _showers_table(batch, self.metadata)
        else:
            table = _hits_table(batch, conditions, self.metadata)
        self._parts[0].write(table, self.row_group_size, self.compression)
        self.rows += table.num_rows

    def _write_flat(self, showers: Showers) -> None:
        """Row groups of the two tables stay aligned: each chunk of ``row_group_size`` showers
        becomes one row group of each (an empty one for showers without points)."""
        for a in range(0, len(showers), self.row_group_size):
            chunk = showers[a:a + self.row_group_size]
            rows, points = _flat_tables(chunk, self.metadata, self.rows, self._pair,
                                        self._parts[1].path.name)
            self._parts[0].write(rows, max(rows.num_rows, 1), self.compression)
            self._parts[1].write(points, max(points.num_rows, 1), self.compression)
            self.rows += rows.num_rows

    def close(self) -> Path:
        """Finish the file and move it to ``path`` (atomic). In the flat layout the points table
        is moved first, so a showers file never appears without its points."""
        if self._parts[0].writer is None:
            self.abort(ValueError("no batch"))
            raise ValueError(f"{self.path}: no batch was written")
        for part in reversed(self._parts):
            part.close()
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the temporary files; nothing appears under ``path``."""
        for part in self._parts:
            part.abort(exc or RuntimeError("aborted"))

    def __enter__(self) -> "ParquetBatchWriter":
        return self

    def __exit__(self, typ, value, tb) -> bool:
        if typ is None:
            self.close()
        else:
            self.abort(value)
        return False


class _Part:
    """One Parquet file being written under a temporary name (see :func:`atomic_path`)."""

    def __init__(self, path: Path):
        self.path = path
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self.writer = None
        self._schema = None

    def write(self, table: pa.Table, row_group_size: int, compression: str = "zstd") -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._tmp, table.schema, compression=compression,
                                           use_dictionary=_dictionary_columns(table.schema))
            self._schema = table.schema
        else:
            if not table.schema.remove_metadata().equals(self._schema.remove_metadata()):
                raise ValueError(f"{self.path}: a batch has columns {table.schema.names}, the first "
                                 f"had {self._schema.names}")
            table = table.replace_schema_metadata(self._schema.metadata)
        self.writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> None:
        self.writer.close()
        self._atomic.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        if self.writer is not None:
            self.writer.close()
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)


def read_hits_parquet(path: str | os.PathLike) -> tuple[CellHits, dict[str, torch.Tensor] | None]:
    """Read cell hits (all shards of a directory); returns ``(hits, conditions or None)``."""
    hits_parts, cond_parts = [], []
    for file in list_shards(path):
        pf = _open(file)
        meta = _check_metadata(file, pf.schema_arrow, "hits")
        table = _read_table(file, pf)
        cells, ptr = _flat_list(table.column("cell_id"))
        energy, _ = _flat_list(table.column("energy_mev"))
        hits_parts.append(CellHits(
            cell_id=torch.from_numpy(cells.astype(np.int64)), energy=torch.from_numpy(energy.copy()),
            ptr=torch.from_numpy(ptr), num_cells=int(meta["num_cells"]),
            geometry=meta.get("geometry"),
            outside_energy=_column(table, "outside_energy"),
            outside_points=_column(table, "outside_points"),
            metadata=dict(meta.get("provenance", {}))))
        if "energy" in table.column_names:
            cond_parts.append(_conditions(table))
    hits = hits_parts[0] if len(hits_parts) == 1 else _concat_hits(hits_parts)
    conditions = None
    if cond_parts and len(cond_parts) == len(hits_parts):
        conditions = {k: torch.cat([c[k] for c in cond_parts]) for k in cond_parts[0]}
    return hits, conditions


def _concat_hits(parts: list[CellHits]) -> CellHits:
    counts = torch.cat([p.num_hits for p in parts])
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return CellHits(cell_id=torch.cat([p.cell_id for p in parts]),
                    energy=torch.cat([p.energy for p in parts]), ptr=ptr,
                    num_cells=parts[0].num_cells, geometry=parts[0].geometry,
                    outside_energy=torch.cat([p.outside_energy for p in parts]),
                    outside_points=torch.cat([p.outside_points for p in parts]),
                    metadata=dict(parts[0].metadata))
