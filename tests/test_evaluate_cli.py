"""Tests of ``pcshower evaluate``: Parquet points, Parquet hits and CaloChallenge HDF5 inputs."""

import json
import math

import numpy as np
import pytest
import torch

from pcshower import Showers
from pcshower.cli import main
from pcshower.evaluate.distortions import drop_layers, scale_energy, scale_transverse
from pcshower.io import write_calochallenge, write_hits_parquet, write_parquet

FAST = ["--no-classifier", "--no-network", "--no-distances", "--n-boot", "3"]


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch, one_thread):
    monkeypatch.setenv("PCSHOWER_KEOPS", "0")


def toy(n, seed, points=40, energy_scale=1.0):
    """Physics-frame toy showers (depth ~ Gamma(4, 0.5) X0, radius ~ Gamma(2, 2) R_M)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.full((n,), points)
    total = n * points
    torch.manual_seed(seed)
    z = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(0.5)).sample((total,))
    r = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(2.0)).sample((total,))
    a = torch.rand(total, generator=g) * 2 * math.pi
    e = torch.full((total,), 0.9 / points) * (1 + 0.05 * torch.randn(total, generator=g))
    pts = torch.stack([r * torch.cos(a), r * torch.sin(a), z, e.clamp_min(0) * energy_scale], 1)
    return Showers.from_counts(pts, counts, 10 + 40 * torch.rand(n, generator=g, dtype=torch.float64),
                               metadata={"generator": "test", "seed": seed})


def test_parquet_points_report(tmp_path, capsys):
    write_parquet(tmp_path / "ref.parquet", toy(200, 1))
    write_parquet(tmp_path / "gen.parquet", toy(200, 2, energy_scale=1.05))
    code = main(["evaluate", str(tmp_path / "gen.parquet"), str(tmp_path / "ref.parquet"),
                 "--out", str(tmp_path / "rep"), "--energy-bins", "10,30,50", *FAST])
    assert code == 0
    assert "report:" in capsys.readouterr().out
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert data["level"] == "points" and data["n_generated"] == 200
    assert data["observables"]["visible_energy"]["w1"]["ratio"] > 3
    assert [c["energy_gev"] for c in data["conditional"]] == [[10, 30], [30, 50]]
    assert (tmp_path / "rep" / "index.html").exists()


def test_calochallenge_voxels_with_their_geometry(tmp_path):
    from pcshower.geometry import load_geometry

    geo = load_geometry("calochallenge_ds1_photons")
    for name, seed in (("ref", 1), ("gen", 2)):
        s = toy(150, seed, points=60)
        vox = geo.project(s, dense=True, generator=torch.Generator().manual_seed(seed))
        write_calochallenge(tmp_path / f"{name}.h5", s.energy.numpy() * 1000, vox)
    code = main(["evaluate", str(tmp_path / "gen.h5"), str(tmp_path / "ref.h5"), "--geometry",
                 "calochallenge_ds1_photons", "--out", str(tmp_path / "rep"), *FAST])
    assert code == 0
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert data["level"] == "cells" and data["settings"]["threshold_mev"] == pytest.approx(0.01515)
    assert len(data["observables"]) > 20 and data["summary"]["w1_ratio_median"] < 2


def test_hits_against_points_compares_the_common_observables(tmp_path):
    from pcshower.geometry import load_geometry

    geo = load_geometry("calochallenge_ds1_photons")
    ref, gen = toy(150, 1, points=60), toy(150, 2, points=60)
    write_parquet(tmp_path / "ref.parquet", ref)
    hits = drop_layers(geo, [2])(geo.project(gen, generator=torch.Generator().manual_seed(2)))
    write_hits_parquet(tmp_path / "gen_hits.parquet", hits, gen)
    code = main(["evaluate", str(tmp_path / "gen_hits.parquet"), str(tmp_path / "ref.parquet"),
                 "--geometry", "calochallenge_ds1_photons", "--out", str(tmp_path / "rep"), *FAST])
    assert code == 0
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert "num_points" in data["not_compared"]
    assert data["observables"]["layer_energy[2]"]["w1"]["ratio"] > 10


def test_user_errors_are_one_clear_line(tmp_path, capsys):
    write_parquet(tmp_path / "ref.parquet", toy(20, 1))
    s = toy(20, 2)
    vox = np.ones((20, 368))
    write_calochallenge(tmp_path / "cc.h5", s.energy.numpy() * 1000, vox)
    cases = [
        ([str(tmp_path / "missing.parquet"), str(tmp_path / "ref.parquet")], "no such file"),
        ([str(tmp_path / "cc.h5"), str(tmp_path / "ref.parquet")], "give --geometry"),
        ([str(tmp_path / "ref.parquet"), str(tmp_path / "ref.parquet"), "--energy-bins", "5,1"],
         "increasing"),
        ([str(tmp_path / "cc.h5"), str(tmp_path / "ref.parquet"), "--geometry", "ild"],
         "pick the matching --geometry"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--out", str(tmp_path / "x"), *FAST]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_distortions_do_what_they_say():
    s = toy(5, 1)
    assert torch.allclose(scale_energy(s, 1.02).e, s.e * 1.02)
    assert torch.allclose(scale_transverse(s, 1.05).points[:, :2], s.points[:, :2] * 1.05)
    assert torch.equal(scale_transverse(s, 1.05).z, s.z)


def test_mismatched_frames_and_geometries_are_refused(tmp_path, capsys):
    phys = toy(20, 1)
    write_parquet(tmp_path / "phys.parquet", phys)
    det = toy(20, 2)._replace(frame="detector", geometry="ild")
    write_parquet(tmp_path / "det.parquet", det)
    write_parquet(tmp_path / "det_cld.parquet", det._replace(geometry="cld"))
    cases = [
        (["phys.parquet", "det.parquet"], "holds physics-frame points and"),
        (["det.parquet", "det_cld.parquet"], "is for geometry 'ild' and"),
        (["det_cld.parquet", "phys.parquet", "--geometry", "ild"], "points of geometry 'cld', not --geometry 'ild'"),
    ]
    for args, message in cases:
        rc = main(["evaluate", *[str(tmp_path / a) if a.endswith(".parquet") else a for a in args],
                   "--out", str(tmp_path / "x"), *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()
