"""Bad input gets a clear error before any work, never silently wrong output: the hardening
battery, run through the API and the CLI (exit code, the message's key words, no file left).

Cases of the battery tested beside the code they concern: the CaloChallenge default incidence
and a loud warning when energy misses the readout (test_generate.py), mismatched frames and
geometries in evaluate (test_evaluate_cli.py), a non-finite training loss (test_train.py),
damaged shards made again and the shard directory read as a Parquet data set
(test_simulate_production.py), stale temporaries of dead writers (test_io.py), generate keeping
existing files unless --overwrite (test_generate.py), the oblique placement
(test_oblique_placement.py)."""

import math

import pytest

from pcshower.cli import main
from pcshower.models.generate import generate


@pytest.mark.parametrize("kwargs, words", [
    ({"n": 2.5}, "n must be >= 1 and a whole number, got 2.5"),
    ({"n": 0}, "n must be >= 1 and a whole number"),
    ({"n": True}, "n must be >= 1 and a whole number"),
    ({"steps": 0}, "steps must be >= 1 and a whole number, got 0"),
    ({"steps": 1.5}, "steps must be >= 1 and a whole number"),
    ({"batch_size": 0}, "batch_size must be >= 1 and a whole number, got 0"),
    ({"seed": 2 ** 64}, "seed must be an integer in [0, 2**64)"),
    ({"seed": -1}, "seed must be an integer in [0, 2**64)"),
])
def test_generate_rejects_non_positive_or_fractional_counts(kwargs, words):
    args = {"n": 1, **kwargs}
    with pytest.raises(ValueError) as err:
        generate(50.0, 90.0, "ild", **args)
    assert words in str(err.value)


@pytest.mark.parametrize("angle, phi, words", [
    (math.nan, 0.0, "angle (theta) must be a finite number"),
    (90.0, math.nan, "phi must be a finite number"),
    (math.inf, 0.0, "angle (theta) must be a finite number"),
])
def test_generate_rejects_nan_angles(angle, phi, words):
    with pytest.raises(ValueError) as err:
        generate(50.0, angle, "ild", n=1, phi=phi)
    assert words in str(err.value)


@pytest.mark.parametrize("flag, value, words", [
    ("--steps", "0", "steps must be >= 1 and a whole number, got 0"),
    ("--batch-size", "0", "batch_size must be >= 1 and a whole number, got 0"),
    ("--threads", "0", "--threads must be >= 1, got 0"),
])
def test_cli_generate_refuses_zero_steps_and_batches(tmp_path, capsys, flag, value, words):
    out = tmp_path / "s.parquet"
    rc = main(["generate", "--geometry", "ild", "--energy", "50", "--theta", "90", "--n", "2",
               "--out", str(out), "--no-progress", flag, value])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no output file, no temporary left


no_cuda = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cli_generate_on_cuda_without_cuda_says_so(tmp_path, capsys, device):
    out = tmp_path / "s.parquet"
    rc = main(["generate", "--geometry", "ild", "--energy", "50", "--theta", "90", "--n", "1",
               "--out", str(out), "--no-progress", "--device", device])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot use CUDA" in err and "--device cpu" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_unknown_device_name():
    from pcshower.units import resolve_device

    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"


# ---------------------------------------------------------------- training configs
@pytest.mark.parametrize("text, words", [
    ("", "is empty; it needs at least a 'train:' section"),
    ("model: {}\n", "has no 'train:' section"),
    ("train:\n\tsteps: 3\n", "not valid YAML at line 2"),
    ("train: {batch_showers: 0}\n", "train.batch_showers must be a whole number >= 1, got 0"),
    ("train: {steps: fifty}\n", "train.steps must be a whole number >= 1, got 'fifty'"),
    ("train: {lr: .nan}\n", "train.lr must be a number in (0, inf]"),
    ("train: {parts: [flow, pointz]}\n", "train.parts must be a non-empty list"),
    ("train: {}\nmodel: {epic: {hidden: -32}}\n", "epic.hidden must be a whole number >= 1, got -32"),
    ("train: {}\nmodel: {epic: {layers: 0}}\n", "epic.layers must be a whole number >= 1, got 0"),
])
def test_cli_train_refuses_bad_configs_before_work(tmp_path, capsys, text, words):
    from pcshower.models.train import load_config

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as err:
        load_config(cfg)
    assert words in str(err.value) and str(cfg) in str(err.value)
    rc = main(["train", "--config", str(cfg), "--data", str(tmp_path / "nothing.parquet"),
               "--out", str(tmp_path / "run")])
    assert rc == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_binary_config_names_the_file(tmp_path):
    from pcshower.models.train import load_config

    cfg = tmp_path / "bin.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="bin.yaml is not a text"):
        load_config(cfg)


# ---------------------------------------------------------------- files that lie
def test_info_refuses_a_calochallenge_file_full_of_nan(tmp_path, capsys):
    import h5py
    import numpy as np

    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as f:
        f["incident_energies"] = np.full((3, 1), 5e4)
        f["showers"] = np.full((3, 368), np.nan)
    assert main(["info", str(path)]) == 2
    assert "'showers' holds 1104 NaN or infinite values" in capsys.readouterr().err


def test_parquet_metadata_claiming_other_units_is_refused(tmp_path, showers):
    import json

    import pyarrow.parquet as pq

    from pcshower.io import read_parquet, write_parquet

    path = write_parquet(tmp_path / "s.parquet", showers)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"pcshower"])
    meta["units"]["points"]["x"] = "cm"
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           b"pcshower": json.dumps(meta).encode()})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="metadata says points is in .*'cm'.*convert"):
        read_parquet(path)


def test_directories_and_binary_files_are_named_as_such(tmp_path):
    from pcshower.geometry import load_geometry
    from pcshower.models.checkpoint import load_model

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a directory; name a YAML file"):
        load_geometry(tmp_path / "run")
    with pytest.raises(ValueError, match=r"is a directory \(a training run\? its model is RUN/model.pt\)"):
        load_model(tmp_path / "run")
    binary = tmp_path / "det.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match="det.yaml is not a text"):
        load_geometry(binary)


@pytest.mark.parametrize("theta, words", [("200", "--theta 200 degrees: the polar angle must lie in [0, 180]"),
                                          ("-5:30", "--theta -5:30 degrees")])
def test_cli_simulate_angles_are_checked_in_degrees(tmp_path, capsys, theta, words):
    out = tmp_path / "sim"
    assert main(["simulate", "--energy", "10", f"--theta={theta}", "--n", "2", "--out", str(out),
                 "--no-progress"]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_training_seed_beyond_64_bits_is_refused(tmp_path):
    from pcshower.models.train import load_config

    with pytest.raises(ValueError, match=r"train.seed must be a whole number in \[0, 2\*\*64\)"):
        load_config({"train": {"seed": 2 ** 64}})


@pytest.mark.parametrize("command", [
    ["simulate", "--energy", "10", "--theta", "60", "--n", "2", "--no-progress", "--out", "{ro}/sim"],
    ["train", "--config", "configs/tiny.yaml", "--data", "nothing.parquet", "--out", "{ro}/run"],
    ["project", "nothing.parquet", "--geometry", "ild", "--out", "{ro}/hits.parquet"],
    ["convert", "nothing.parquet", "{ro}/x.h5"],
    ["geometry", "show", "ild", "--png", "{ro}/ild.png"],
    ["evaluate", "a.parquet", "b.parquet", "--out", "{ro}/report"],
])
def test_writing_into_a_read_only_folder_is_one_line_before_work(tmp_path, capsys, monkeypatch,
                                                                 command):
    import os
    from pathlib import Path

    from pcshower.io import _atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real = os.access
    monkeypatch.setattr(_atomic.os, "access",  # root may write anywhere: judge by the mode
                        lambda p, mode: False if Path(p) == ro else real(p, mode))
    try:
        rc = main([a.format(ro=ro) for a in command])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "cannot write in" in err and "Traceback" not in err and err.count("\n") == 1
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_particles_outside_the_models_record_are_refused():
    from pcshower.models.checkpoint import load_model
    from pcshower.models.generate import default_model_path

    with pytest.raises(ValueError, match="trained on photon only, not pi"):
        generate(50.0, 90.0, "ild", n=1, particle="pion")
    with pytest.raises(ValueError, match="trained on photon only, not electron"):
        generate(50.0, 90.0, "ild", n=1, particle=11)
    net = load_model(default_model_path())
    info = dict(net.checkpoint_info)
    info["provenance"] = {k: v for k, v in info["provenance"].items() if k != "particles"}
    net.checkpoint_info = info
    with pytest.raises(ValueError, match="does not record which particles"):
        generate(50.0, 90.0, None, n=1, model=net)
    with pytest.warns(UserWarning, match="does not record which particles"):
        generate(50.0, 90.0, None, n=1, model=net, allow_extrapolation=True, seed=1, steps=1)


def test_a_nan_thickness_says_it_is_not_finite(tmp_path, capsys):
    from importlib.resources import files

    text = (files("pcshower") / "geometries" / "ild.yaml").read_text()
    import re

    bad = re.sub(r"thickness_mm: [0-9.]+", "thickness_mm: .nan", text, count=1)
    assert bad != text
    (tmp_path / "nan.yaml").write_text(bad)
    assert main(["geometry", "show", str(tmp_path / "nan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "thickness_mm: expected a finite" in err and "got nan" in err
    assert "got a number" not in err


@pytest.mark.parametrize("seed", [str(2 ** 70), "-1", "x"])
@pytest.mark.parametrize("command", [
    ["generate", "--energy", "50", "--out", "{tmp}/g.parquet"],
    ["simulate", "--energy", "10", "--theta", "90", "--n", "2", "--out", "{tmp}/sim"],
    ["project", "a.parquet", "--geometry", "ild", "--out", "{tmp}/h.parquet"],
    ["evaluate", "a.parquet", "b.parquet", "--out", "{tmp}/report"],
])
def test_seeds_out_of_range_name_the_option(tmp_path, capsys, command, seed):
    with pytest.raises(SystemExit) as exit_:
        main([a.format(tmp=tmp_path) for a in command] + ["--seed", seed])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --seed:" in err and "Overflow" not in err
    assert not list(tmp_path.iterdir())


def test_an_evaluate_seed_fits_the_classifier(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "a.parquet", "b.parquet", "--seed", str(2 ** 32)])
    assert "[0, 4294967294)" in capsys.readouterr().err


def test_project_and_convert_keep_existing_files_unless_overwrite(tmp_path, capsys, showers):
    from pcshower.io import write_parquet

    src = tmp_path / "det.parquet"
    write_parquet(src, showers._replace(geometry="ild"))
    for command, out in ((["project", str(src), "--geometry", "ild", "--out"], "hits.parquet"),
                         (["convert", str(src)], "copy.parquet")):
        target = tmp_path / out
        target.write_bytes(b"keep me")
        assert main(command + [str(target)]) == 2
        assert "exists; pass --overwrite" in capsys.readouterr().err
        assert target.read_bytes() == b"keep me"
        assert main(command + [str(target), "--overwrite"]) == 0
        assert target.read_bytes() != b"keep me"
    capsys.readouterr()
    # pcshower info reads the hits file project wrote
    assert main(["info", str(tmp_path / "hits.parquet")]) == 0
    out = capsys.readouterr().out
    assert "cell hits" in out and "hit_cells_per_shower" in out


def test_the_cli_names_its_own_flag_for_extrapolation(tmp_path, capsys):
    assert main(["generate", "--energy", "50", "--particle", "pion", "--out",
                 str(tmp_path / "g.parquet"), "--no-progress"]) == 2
    assert "--allow-extrapolation" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
