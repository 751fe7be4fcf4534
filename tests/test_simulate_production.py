"""Tests of the production loop and the ``pcshower simulate`` command."""

import json

import numpy as np
import pytest
import torch

from pcshower.cli import main
from pcshower.io import list_shards, read_metadata, read_parquet
from pcshower.physics import Stack
from pcshower.simulate.production import (RunConfig, parse_range, parse_stack_spec, produce,
                                          shard_conditions)

SPEC = "20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]"


def _produce(out, **kw):
    args = dict(n=25, energy=(1.0, 4.0), theta=(0.0, 30.0), stack=SPEC, shard_size=10, seed=3,
                workers=1, progress=False, grid="coarse")
    args.update(kw)
    return produce(out, **args)


def _same(a, b):
    assert torch.equal(a.points, b.points) and torch.equal(a.ptr, b.ptr)
    assert torch.equal(a.energy, b.energy) and torch.equal(a.theta, b.theta)


def test_stack_spec_is_the_ild_stack():
    ild = (Stack.repeated([("W", 2.1, False), ("Si", 0.5, True)], 20)
           + Stack.repeated([("W", 4.2, False), ("Si", 0.5, True)], 10))
    assert parse_stack_spec(SPEC).slabs == ild.slabs
    assert parse_stack_spec("[PbWO4:230:active]").num_layers == 1


@pytest.mark.parametrize("spec,match", [("20x[Unobtainium:2.1,Si:0.5:active]", "unknown material"),
                                        ("0x[W:2.1,Si:0.5:active]", "empty"),
                                        ("20x[W-2.1]", "cannot read slab"),
                                        ("W:2.1", "cannot read")])
def test_bad_stack_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_stack_spec(spec)


def test_ranges():
    assert parse_range("10:100", "energy") == (10.0, 100.0)
    assert parse_range("50", "energy") == (50.0, 50.0)
    for bad in ("10:1", "a:b", "1:2:3", "nan:5"):
        with pytest.raises(ValueError):
            parse_range(bad, "energy")


def test_conditions_are_deterministic_per_seed_and_shard():
    cfg = RunConfig(n=30, energy_gev=(10.0, 100.0), spectrum="log", theta_deg=(0.0, 40.0),
                    shard_size=10, seed=1)
    a, b = shard_conditions(cfg, 1), shard_conditions(cfg, 1)
    c = shard_conditions(cfg, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert (a[0] >= 10).all() and (a[0] <= 100).all() and (a[1] <= np.radians(40)).all()


def test_production_writes_shards_with_provenance_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    summary = _produce(full)
    points = (summary.pop("points_per_shower_before"), summary.pop("points_per_shower_after"))
    assert summary == {"directory": str(full), "shards": 3, "written": 3, "already_done": 0,
                       "showers": 25}
    assert points[0] > points[1] > 0
    assert [p.name for p in list_shards(full)] == ["shard-00000.parquet", "shard-00001.parquet",
                                                   "shard-00002.parquet"]
    ref = read_parquet(full)
    assert len(ref) == 25 and ref.frame == "physics"
    meta = read_metadata(full / "shard-00001.parquet")["provenance"]
    assert meta["generator"] == "pcshower-parametrised-gflash" and meta["shard"] == 1
    assert meta["seed"] == 3 and meta["run"]["n"] == 25 and meta["first_shower"] == 10
    assert json.loads((full / "_run.json").read_text())["pcshower_run"]["stack"] == SPEC
    # an interrupted run: one shard missing, plus a temporary left by a killed writer
    (full / "shard-00001.parquet").unlink()
    (full / ".shard-00001.parquet.tmp-123-abcdef12").write_bytes(b"partial")
    again = _produce(full)
    assert again["written"] == 1 and again["already_done"] == 2
    _same(read_parquet(full), ref)


def test_damaged_shards_are_made_again_and_the_directory_is_a_parquet_dataset(tmp_path, capsys):
    import pyarrow.parquet as pq

    full = tmp_path / "full"
    _produce(full)
    ref = read_parquet(full)
    # plain readers open the directory: the run record is skipped by its name
    assert pq.read_table(full).num_rows == 25
    shard = full / "shard-00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated after the fact
    again = _produce(full)
    assert again["written"] == 1 and again["already_done"] == 2
    assert "shard-00001.parquet is damaged" in capsys.readouterr().err
    _same(read_parquet(full), ref)
    # a run recorded under the former name resumes, and the record gets the new name
    (full / "_run.json").rename(full / "run.json")
    assert _produce(full)["already_done"] == 3
    assert (full / "_run.json").is_file() and not (full / "run.json").exists()


def test_shard_ranges_build_the_same_data_set_as_one_run(tmp_path):
    _produce(tmp_path / "whole")
    part = tmp_path / "parts"
    first = _produce(part, shards="0:1")
    assert first["written"] == 1 and first["range"] == (0, 1)
    assert [p.name for p in list_shards(part)] == ["shard-00000.parquet"]
    assert _produce(part, shards=(2, 3))["written"] == 1
    rest = _produce(part)  # the whole run: only the missing shard is made
    assert rest["written"] == 1 and rest["already_done"] == 2 and "range" not in rest
    _same(read_parquet(part), read_parquet(tmp_path / "whole"))
    for bad in ("3:4", "1:1", "a:b", "0:1:2", "-1:2"):
        with pytest.raises(ValueError, match="this run has 3 shards"):
            _produce(part, shards=bad)


def test_both_frames_record_the_same_showers(tmp_path):
    out = tmp_path / "both"
    _produce(out, frame="both", grid=None, n=12)
    with pytest.raises(FileNotFoundError, match="both frames: read .*physics or .*detector"):
        list_shards(out)
    assert json.loads((out / "_run.json").read_text())[
        "pcshower_run"]["frame"] == "both"
    phys, det = read_parquet(out / "physics"), read_parquet(out / "detector")
    assert (phys.frame, det.frame) == ("physics", "detector") and len(phys) == len(det) == 12
    assert torch.equal(phys.energy, det.energy) and torch.equal(phys.theta, det.theta)
    # the same spots as single-frame runs with the same seed (grid: each frame's default)
    _same(phys, read_parquet(_produce(tmp_path / "p", grid=None, n=12)["directory"]))
    _same(det, read_parquet(_produce(tmp_path / "d", frame="detector", grid=None,
                                     n=12)["directory"]))
    # a shard missing in one frame is made again in both
    (out / "detector" / "shard-00001.parquet").unlink()
    again = _produce(out, frame="both", grid=None, n=12)
    assert again["written"] == 1 and again["already_done"] == 1
    _same(read_parquet(out / "detector"), det)
    with pytest.raises(ValueError, match="grid preset"):
        _produce(tmp_path / "x", frame="both", grid=(0.1, 0.1, 0.1))


def test_different_run_into_same_directory_is_refused(tmp_path):
    _produce(tmp_path / "d", n=5)
    with pytest.raises(ValueError, match="different run.*seed"):
        _produce(tmp_path / "d", n=5, seed=4)


def test_two_workers_give_the_same_showers(tmp_path):
    _produce(tmp_path / "one", n=20, workers=1)
    _produce(tmp_path / "two", n=20, workers=2)
    _same(read_parquet(tmp_path / "one"), read_parquet(tmp_path / "two"))


def test_cli_simulate_detector_frame(tmp_path, capsys):
    out = tmp_path / "det"
    rc = main(["simulate", "--stack", SPEC, "--energy", "5:20", "--spectrum", "log", "--theta",
               "0:40", "--n", "6", "--shard-size", "4", "--frame", "detector", "--out", str(out),
               "--workers", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 showers in 2 shards" in printed and "after reduction" in printed
    s = read_parquet(out)
    assert s.frame == "detector" and len(s) == 6
    assert (s.energy >= 5).all() and (s.energy <= 20).all()
    assert read_metadata(out / "shard-00000.parquet")["provenance"]["reduction"]["grid"]["kind"] \
        == "cartesian"


@pytest.mark.parametrize("args,message", [
    (["--energy", "-5:10"], "positive"),
    (["--energy", "nan"], "finite"),
    (["--energy", "5000"], "1-1000 GeV"),
    (["--theta", "90"], "89"),
    (["--stack", "20x[Unobtainium:2.1,Si:0.5:active]"], "unknown material"),
    (["--stack", "0x[W:2.1,Si:0.5:active]"], "empty"),
    (["--particle", "neutron"], "electromagnetic"),
    (["--n", "0"], "positive number of showers"),
    (["--grid", "1,2"], "--grid"),
])
def test_cli_bad_input_fails_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    base = {"--stack": SPEC, "--energy": "10", "--theta": "0", "--n": "3"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["simulate", "--out", str(out), "--no-progress"]
    argv += [f"{flag}={value}" for flag, value in base.items()]  # '=' lets values start with '-' 
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pcshower simulate: error:" in err and message in err
    assert not out.exists()


def test_cli_geometry_name_with_global_angles(tmp_path):
    pytest.importorskip("pcshower.geometry")
    out = tmp_path / "ild"
    assert main(["simulate", "--stack", "ild", "--energy", "10", "--theta", "60:90", "--n", "3",
                 "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    s = read_parquet(out)
    assert (s.theta >= np.radians(60) - 1e-9).all()  # conditions recorded as given (global)
    assert read_metadata(out / "shard-00000.parquet")["provenance"]["angles"] == "global (ild)"
    bad = tmp_path / "bad"
    assert main(["simulate", "--stack", "ild", "--energy", "10", "--theta", "0", "--n", "3",
                 "--out", str(bad), "--no-progress"]) == 2
    assert not bad.exists()


def test_reduce_merges_a_data_set_on_a_coarser_grid_and_resumes(tmp_path, capsys):
    from pcshower.simulate.production import reduce_dataset

    fine = tmp_path / "fine"
    _produce(fine)  # three shards of physics-frame showers
    src = read_parquet(fine)
    out = tmp_path / "coarse"
    summary = reduce_dataset(fine, out, (0.5, 0.5, 1.0), progress=False)
    assert summary["written"] == 3 and summary["showers"] == 25
    assert summary["points_after"] < summary["points_before"]
    got = read_parquet(out)
    assert len(got) == 25 and torch.equal(got.energy, src.energy)
    # every shower's energy kept exactly (to float32 round-off), fewer points
    e_src = torch.zeros(25, dtype=torch.float64).index_add_(0, src.batch, src.points[:, 3].double())
    e_got = torch.zeros(25, dtype=torch.float64).index_add_(0, got.batch, got.points[:, 3].double())
    torch.testing.assert_close(e_got, e_src, rtol=1e-5, atol=1e-7)
    assert bool((got.num_points <= src.num_points).all()) and got.points.shape[0] < src.points.shape[0]
    meta = read_metadata(out / "shard-00001.parquet")["provenance"]
    assert meta["reduction"]["grid"] == {"kind": "cartesian", "dx": 0.5, "dy": 0.5, "dz": 1.0}
    assert meta["reduction"]["previous"] == read_metadata(fine / "shard-00001.parquet")[
        "provenance"]["reduction"]
    assert meta["shard"] == 1  # the source's provenance is kept
    # resumes: a missing shard is made again, the others kept
    (out / "shard-00002.parquet").unlink()
    again = reduce_dataset(fine, out, (0.5, 0.5, 1.0), progress=False)
    assert again["written"] == 1 and again["kept"] == 2
    # another grid into the same directory is refused; the CLI says so and writes nothing
    assert main(["reduce", str(fine), "--grid", "1,1,2", "--out", str(out), "--no-progress"]) == 2
    assert "reduced on grid" in capsys.readouterr().err
    assert main(["reduce", str(fine), "--grid", "1,1,2", "--out", str(fine), "--no-progress"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["reduce", str(fine), "--grid", "1,1,2", "--out", str(tmp_path / "c2"),
                 "--no-progress"]) == 0
    assert "25 showers in 3 file(s)" in capsys.readouterr().out


def test_reduce_writes_the_flat_layout_for_training(tmp_path):
    """`pcshower reduce --layout flat` gives the same showers as the list layout, a points
    table per shard, and a data set the training stream reads."""
    from pcshower.data.stream import dataset_units, read_unit
    from pcshower.io import points_path

    fine = tmp_path / "fine"
    _produce(fine)
    assert main(["reduce", str(fine), "--grid", "0.5,0.5,1", "--out", str(tmp_path / "list"),
                 "--no-progress"]) == 0
    assert main(["reduce", str(fine), "--grid", "0.5,0.5,1", "--out", str(tmp_path / "flat"),
                 "--layout", "flat", "--compression", "lz4", "--no-progress"]) == 0
    a, b = read_parquet(tmp_path / "list"), read_parquet(tmp_path / "flat")
    assert torch.equal(a.points, b.points) and torch.equal(a.ptr, b.ptr)
    assert torch.equal(a.energy, b.energy)
    assert points_path(tmp_path / "flat" / "shard-00000.parquet").exists()
    units = dataset_units(tmp_path / "flat")
    assert sum(u.rows for u in units) == 25 and len(read_unit(units[0])) == units[0].rows
    # resumes like the list layout: complete shards are kept
    assert main(["reduce", str(fine), "--grid", "0.5,0.5,1", "--out", str(tmp_path / "flat"),
                 "--layout", "flat", "--no-progress"]) == 0
