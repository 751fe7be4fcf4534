"""Parquet and HDF5 formats: exact round trips, streaming, atomic writes, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pcshower import CellHits, Showers, io
from pcshower.cli import main
from tests.conftest import make_showers
from tests.test_showers import assert_same


def test_parquet_roundtrip_bit_exact(tmp_path, showers):
    path = io.write_parquet(tmp_path / "s.parquet", showers, metadata={"seed": 7})
    back = io.read_parquet(path)
    assert_same(back, showers)
    assert back.frame == showers.frame and back.feature_names == showers.feature_names
    meta = io.read_metadata(path)
    assert meta["format_version"] == io.FORMAT_VERSION
    assert meta["provenance"]["seed"] == 7 and meta["provenance"]["generator"] == "test"
    assert meta["provenance"]["pcshower_version"]
    assert meta["units"]["points"]["e"] == "MeV"
    assert meta["num_showers"] == len(showers)


def test_extra_features_roundtrip(tmp_path):
    s = make_showers(extra_features=("time",), frame="physics")
    back = io.read_parquet(io.write_parquet(tmp_path / "t.parquet", s))
    assert back.feature_names == ("x", "y", "z", "e", "time")
    assert_same(back, s)
    assert io.read_metadata(tmp_path / "t.parquet")["units"]["points"]["z"] == "X0"


def test_readable_without_pcshower(tmp_path, showers):
    """pyarrow and pandas alone see one row per shower with list columns."""
    import pandas as pd

    path = io.write_parquet(tmp_path / "s.parquet", showers)
    table = pq.read_table(path)
    assert table.num_rows == len(showers)
    for name in ("x", "y", "z", "e"):
        field_type = table.schema.field(name).type
        assert pa.types.is_list(field_type) and field_type.value_type == pa.float32()
    frame = pd.read_parquet(path)
    i = 3
    np.testing.assert_array_equal(np.asarray(frame["e"][i], dtype=np.float32),
                                  showers.shower(i)[:, 3].numpy())
    np.testing.assert_array_equal(frame["energy"].to_numpy(), showers.energy.numpy())
    meta = json.loads(table.schema.metadata[b"pcshower"])
    assert meta["frame"] == "detector"


def test_sharded_directory_streaming(tmp_path):
    parts = [make_showers(n=n, seed=i) for i, n in enumerate([13, 0, 21, 8])]
    for i, part in enumerate(parts):
        if len(part):
            io.write_parquet(tmp_path / io.shard_name(i), part, row_group_size=5)
    (tmp_path / f".{io.shard_name(9)}.tmp-123").write_bytes(b"half a file")  # skipped
    full = Showers.concat([p for p in parts if len(p)])
    assert_same(io.read_parquet(tmp_path), full)
    batches = list(io.iter_parquet(tmp_path, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 10, 10, 2]
    assert_same(Showers.concat(batches), full)
    assert io.count_showers(tmp_path) == len(full)
    first = list(io.iter_parquet(tmp_path, batch_size=10, max_showers=25))
    assert [len(b) for b in first] == [10, 10, 5]
    assert_same(Showers.concat(first), full[:25])
    assert list(io.iter_parquet(tmp_path, batch_size=10, max_showers=0)) == []


def test_truncated_and_foreign_files(tmp_path, showers):
    path = io.write_parquet(tmp_path / "s.parquet", showers)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.parquet: not a readable Parquet file"):
        io.read_parquet(cut)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pq.read_table(path).replace_schema_metadata({}), foreign)
    with pytest.raises(ValueError, match="foreign.parquet: not a pcshower file"):
        io.read_parquet(foreign)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"pcshower"])
    meta["format_version"] = "9.0"
    future = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata({b"pcshower": json.dumps(meta)}), future)
    with pytest.raises(ValueError, match="future.parquet: pcshower format version 9.0"):
        io.read_parquet(future)
    with pytest.raises(FileNotFoundError):
        io.read_parquet(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="expected 'showers'"):
        io.write_hits_parquet(tmp_path / "h.parquet", CellHits.from_dense(torch.ones(2, 3)))
        io.read_parquet(tmp_path / "h.parquet")


_SLOW_WRITER = """
import sys, time, torch, pyarrow.parquet as pq
from pcshower import io
from tests.conftest import make_showers
real = pq.write_table
def slow(table, where, **kw):
    open(where, "wb").write(b"PAR1 partial bytes")  # what a writer has put down so far
    print("writing", flush=True)
    time.sleep(60)
    real(table, where, **kw)
pq.write_table = slow
io.parquet.pq.write_table = slow
io.write_parquet(sys.argv[1], make_showers())
"""


def test_killed_writer_leaves_no_file(tmp_path):
    target = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)],
                            stdout=subprocess.PIPE, cwd=Path(__file__).parents[1], text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(".out.parquet.tmp-") for p in leftovers)
    with pytest.raises(FileNotFoundError):  # the temp file is not taken for a shard
        io.list_shards(tmp_path)


def test_failed_write_cleans_up(tmp_path, showers, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.parquet.pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        io.write_parquet(tmp_path / "s.parquet", showers)
    assert list(tmp_path.iterdir()) == []


def test_hits_parquet_roundtrip(tmp_path, showers):
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(len(showers), 50, generator=g) * (torch.rand(len(showers), 50, generator=g) > 0.7)
    hits = CellHits.from_dense(dense, geometry="ild", outside_energy=torch.arange(len(showers)) * 1.5)
    path = io.write_hits_parquet(tmp_path / "h.parquet", hits, showers, metadata={"seed": 1})
    back, cond = io.read_hits_parquet(path)
    assert torch.equal(back.cell_id, hits.cell_id) and torch.equal(back.energy, hits.energy)
    assert torch.equal(back.ptr, hits.ptr) and back.num_cells == 50 and back.geometry == "ild"
    assert torch.equal(back.outside_energy, hits.outside_energy.double())
    assert torch.equal(back.to_dense(), dense)
    assert torch.equal(cond["energy"], showers.energy)
    assert torch.equal(cond["position"], showers.position)


def test_calochallenge_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    inc = rng.uniform(1e3, 1e6, 12)
    vox = rng.exponential(10.0, (12, 368)) * (rng.random((12, 368)) > 0.5)
    path = io.write_calochallenge(tmp_path / "cc.h5", inc, vox)
    with h5py.File(path) as f:
        assert f["incident_energies"].shape == (12, 1) and f["showers"].shape == (12, 368)
    back_inc, back_vox = io.read_calochallenge(path)
    np.testing.assert_array_equal(back_inc, inc)
    np.testing.assert_array_equal(back_vox, vox)
    assert io.hdf5_kind(path) == "calochallenge"
    with pytest.raises(ValueError, match="non-negative"):
        io.write_calochallenge(tmp_path / "bad.h5", inc, -vox - 1)
    with pytest.raises(ValueError, match=r"\[N, n_voxels\]"):
        io.write_calochallenge(tmp_path / "bad.h5", inc[:3], vox)
    assert not (tmp_path / "bad.h5").exists()


def test_caloclouds_roundtrip(tmp_path, showers):
    path = io.write_caloclouds(tmp_path / "cc.h5", showers)
    with h5py.File(path) as f:
        assert f["events"].shape == (len(showers), 4, int(showers.num_points.max()))
    assert_same(io.read_caloclouds(path), showers)
    # a file as CaloClouds writes it: no num_points, energies in GeV, padding = zero energy
    events = np.zeros((2, 4, 5), dtype=np.float32)
    events[0, :, :3] = [[1, 2, 3], [0, 1, 2], [5, 5, 5], [0.001, 0.002, 0.003]]
    events[1, :, :1] = [[4], [3], [2], [0.005]]
    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f["events"], f["energy"] = events, np.array([10.0, 20.0])
    theirs = io.read_caloclouds(tmp_path / "theirs.h5", energy_scale=1000)
    assert theirs.num_points.tolist() == [3, 1]
    np.testing.assert_allclose(theirs.e.numpy(), [1, 2, 3, 5], rtol=1e-6)
    with pytest.raises(ValueError, match="holds x, y, z, e only"):
        io.write_caloclouds(tmp_path / "x.h5", make_showers(extra_features=("t",)))


def test_hdf5_errors(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(ValueError, match="other.h5: not a CaloChallenge file"):
        io.read_calochallenge(tmp_path / "other.h5")
    with pytest.raises(ValueError, match="other.h5: not a CaloClouds-style file"):
        io.read_caloclouds(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="junk.h5: not a readable HDF5 file"):
        io.read_caloclouds(tmp_path / "junk.h5")


def test_cli_info_and_convert(tmp_path, showers, capsys):
    src = io.write_parquet(tmp_path / "s.parquet", showers)
    assert main(["info", str(src), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    counts = showers.num_points.numpy()
    assert summary["showers"] == len(showers)
    assert summary["points_per_shower_min_median_max"] == [int(counts.min()), float(np.median(counts)),
                                                           int(counts.max())]
    assert summary["provenance"]["generator"] == "test"
    assert main(["convert", str(src), str(tmp_path / "s.h5")]) == 0
    assert main(["convert", str(tmp_path / "s.h5"), str(tmp_path / "back.parquet")]) == 0
    assert_same(io.read_parquet(tmp_path / "back.parquet"), showers)
    assert main(["info", str(tmp_path / "s.h5")]) == 0
    assert "CaloClouds-style HDF5" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing.parquet")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "out.csv")]) == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pcshower.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "info" in out and "convert" in out


def test_batch_writer_appends_atomically_and_cleans_up(tmp_path):
    parts = [make_showers(n=n, seed=i) for i, n in enumerate([7, 5, 9])]
    path = tmp_path / "b.parquet"
    with io.ParquetBatchWriter(path, "showers", metadata={"seed": 3}, row_group_size=4) as w:
        for p in parts:
            w.write(p)
            assert not path.exists()  # only complete files appear under the name
    full = Showers.concat(parts)
    assert_same(io.read_parquet(path), full)
    assert io.read_metadata(path)["provenance"]["seed"] == 3
    assert [len(b) for b in io.iter_parquet(path, batch_size=4)] == [4, 4, 4, 4, 4, 1]
    # an error inside leaves neither the file nor a temporary behind
    with pytest.raises(RuntimeError, match="boom"):
        with io.ParquetBatchWriter(tmp_path / "c.parquet") as w:
            w.write(parts[0])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.parquet"]
    with pytest.raises(ValueError, match="no batch"):
        io.ParquetBatchWriter(tmp_path / "d.parquet").close()
    with pytest.raises(ValueError, match="kind"):
        io.ParquetBatchWriter(tmp_path / "e.parquet", "cells")
    # hits, with their showers' conditions
    hits = [CellHits(cell_id=torch.tensor([1, 5, 2]), energy=torch.tensor([0.5, 1.0, 2.0]),
                     ptr=torch.tensor([0, 2, 3]), num_cells=10, geometry="toy"),
            CellHits(cell_id=torch.tensor([9]), energy=torch.tensor([3.0]),
                     ptr=torch.tensor([0, 0, 1]), num_cells=10, geometry="toy")]
    conds = [make_showers(n=2, seed=5), make_showers(n=2, seed=6)]
    with io.ParquetBatchWriter(tmp_path / "h.parquet", "hits") as w:
        for h, c in zip(hits, conds):
            w.write(h, c)
    back, cond = io.read_hits_parquet(tmp_path / "h.parquet")
    assert back.cell_id.tolist() == [1, 5, 2, 9] and back.ptr.tolist() == [0, 2, 3, 3, 4]
    assert torch.allclose(cond["energy"], torch.cat([c.energy for c in conds]).to(cond["energy"].dtype))


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from pcshower.io._atomic import _HOST, atomic_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)  # that process has exited
    target = tmp_path / "a.parquet"
    stale_old = tmp_path / f".a.parquet.tmp-{pid}-0123abcd"            # former name, no host
    stale = tmp_path / f".a.parquet.tmp-{_HOST}.{pid}-0123abce"
    live = tmp_path / f".a.parquet.tmp-{_HOST}.{os.getpid()}-0123abcf"  # a live writer's
    other_host = tmp_path / f".a.parquet.tmp-otherhost.{pid}-0123abc0"  # maybe live elsewhere
    other_file = tmp_path / f".b.parquet.tmp-{pid}-0123abc1"
    for f in (stale_old, stale, live, other_host, other_file):
        f.write_bytes(b"partial")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert not stale_old.exists() and not stale.exists()
    assert live.exists() and other_host.exists() and other_file.exists()


def test_arrow_columns_from_numpy_keep_values_of_any_byte_order():
    import numpy as np

    from pcshower.io.parquet import _arrow

    for dtype in ("<f8", ">f8", "<f4", ">f4"):
        assert _arrow(np.array([1.5, 2.5, -3.0], dtype=dtype)).to_pylist() == [1.5, 2.5, -3.0]
    for dtype in (">i4", "<i8"):
        assert _arrow(np.array([1, 2, -3], dtype=dtype)).to_pylist() == [1, 2, -3]
    assert _arrow(np.array([True, False])).to_pylist() == [True, False]


def test_flat_layout_roundtrip_streams_and_reads_without_pcshower(tmp_path):
    """The flat layout holds the same showers: bit-exact, by row group, in shard directories
    (whose points tables are not shards), and as two plain tables pandas can join."""
    import pandas as pd

    s = make_showers(n=23, extra_features=("time",), frame="physics")
    path = io.write_parquet(tmp_path / "shard-00000.parquet", s, row_group_size=5, layout="flat",
                            metadata={"seed": 3})
    assert io.points_path(path).name == "shard-00000.points.parquet" and io.points_path(path).exists()
    back = io.read_parquet(path)
    assert_same(back, s)
    assert back.feature_names == s.feature_names and back.metadata["seed"] == 3
    assert [len(b) for b in io.iter_parquet(tmp_path, batch_size=10)] == [10, 10, 3]
    assert_same(Showers.concat(list(io.iter_parquet(tmp_path, batch_size=7))), s)
    assert io.list_shards(tmp_path) == [path] and io.count_showers(tmp_path) == 23
    meta = io.read_metadata(path)
    assert meta["layout"] == "flat" and meta["num_showers"] == 23
    # the streaming training data reads the same units
    from pcshower.data.stream import dataset_units, read_unit
    units = dataset_units(tmp_path)
    assert [u.rows for u in units] == [5, 5, 5, 5, 3]
    assert_same(read_unit(units[2]), s[10:15])
    # without pcshower: one row per shower, one row per point, joined by 'shower'
    rows = pd.read_parquet(path)
    points = pd.read_parquet(io.points_path(path))
    assert not any(pa.types.is_list(f.type) for f in pq.read_schema(path))
    np.testing.assert_array_equal(rows["n_points"].to_numpy(), s.num_points.numpy())
    np.testing.assert_array_equal(points["shower"].to_numpy(),
                                  np.repeat(np.arange(23), s.num_points.numpy()))
    np.testing.assert_array_equal(points["time"].to_numpy(), s.points[:, 4].numpy())
    np.testing.assert_array_equal(rows["energy"].to_numpy(), s.energy.numpy())


def test_flat_layout_damaged_pairs_are_errors(tmp_path, showers):
    path = io.write_parquet(tmp_path / "a.parquet", showers, layout="flat")
    points = io.points_path(path)
    with pytest.raises(ValueError, match="points table of a flat-layout file: read .*a.parquet"):
        io.read_parquet(points)
    # a points table from another write of the same name
    other = io.write_parquet(tmp_path / "b.parquet", showers, layout="flat")
    saved = points.read_bytes()
    points.write_bytes(io.points_path(other).read_bytes())
    with pytest.raises(ValueError, match="a.points.parquet: is not the points table written with"):
        io.read_parquet(path)
    points.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match="a.points.parquet: not a readable Parquet file"):
        io.read_parquet(path)
    points.unlink()
    with pytest.raises(ValueError, match="its points table a.points.parquet is missing"):
        io.read_parquet(path)
    with pytest.raises(ValueError, match="unknown Parquet layout 'columns'"):
        io.write_parquet(tmp_path / "c.parquet", showers, layout="columns")
    with pytest.raises(ValueError, match="flat layout is for showers files"):
        io.ParquetBatchWriter(tmp_path / "h.parquet", "hits", layout="flat")


def test_flat_layout_bad_values_named_and_failed_writes_leave_nothing(tmp_path, showers,
                                                                      monkeypatch):
    """Point values are checked column-wise on reading; a bad one is named as for the list
    layout. A writer that fails leaves neither file of the pair."""
    path = io.write_parquet(tmp_path / "a.parquet", showers, layout="flat")
    table = pq.read_table(io.points_path(path))
    e = table.column("e").to_numpy().copy()
    e[5] = -1.0
    bad = table.set_column(table.schema.get_field_index("e"), "e", pa.array(e))
    pq.write_table(bad, io.points_path(path))
    with pytest.raises(ValueError, match=r"a.parquet: shower \d+: negative energy -1 in point "
                                         r"feature 'e' \(point 5\)"):
        io.read_parquet(path)
    with io.ParquetBatchWriter(tmp_path / "w.parquet", layout="flat") as writer:
        writer.write(showers[:7])
        writer.write(showers[7:])
    assert_same(io.read_parquet(tmp_path / "w.parquet"), showers)
    with pytest.raises(RuntimeError, match="disk full"):
        with io.ParquetBatchWriter(tmp_path / "x.parquet", layout="flat") as writer:
            writer.write(showers)
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "a.points.parquet",
                                                          "w.parquet", "w.points.parquet"]


def test_cli_convert_to_flat_layout(tmp_path, showers, capsys):
    src = io.write_parquet(tmp_path / "s.parquet", showers)
    assert main(["convert", str(src), str(tmp_path / "f.parquet"), "--layout", "flat",
                 "--compression", "lz4"]) == 0
    assert_same(io.read_parquet(tmp_path / "f.parquet"), showers)
    assert pq.ParquetFile(tmp_path / "f.points.parquet").metadata.row_group(0).column(1) \
        .compression == "LZ4"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "f.parquet"), "--json"]) == 0
    assert "flat layout" in json.loads(capsys.readouterr().out)["format"]
    with pytest.raises(SystemExit, match="Parquet output only"):
        main(["convert", str(src), str(tmp_path / "f.h5"), "--layout", "flat"])
