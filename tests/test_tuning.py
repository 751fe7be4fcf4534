"""Tests of the parametrised engine's tunes to Geant4 (pcshower.simulate.tuning, pcshower tune)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from pcshower.physics.stack import Stack
from pcshower.simulate import gflash, tuning
from pcshower.simulate.api import resolve_stack
from pcshower.simulate.parametrised import simulate_parametrised
from pcshower.simulate.reduce import reduce_points

ILD, _, _ = resolve_stack("ild")


def _start(stack=ILD):
    return tuning._as_parametrisation(tuning._published_for(stack.effective_medium().Z), "start")


def _showers(par, n=400, seed=3):
    rng = np.random.default_rng(seed)
    e = rng.uniform(10, 100, n)
    th = np.radians(rng.uniform(0, 60, n))
    both = simulate_parametrised(e, th, 0.0, 22, ILD, seed, "both", tune=par)
    return e, th, reduce_points(both["physics"], "fine"), reduce_points(both["detector"], "fine")


def _mean_ln_t(par, energy_gev=50.0):
    medium = ILD.effective_medium()
    mu_t = gflash.longitudinal_parameters(torch.tensor([energy_gev], dtype=torch.float64),
                                          medium.Z, medium.ec_mev, par)[0]
    return float(mu_t[0])


def test_published_coefficients_with_z_folded_in_are_the_published_model():
    start, Z = _start(), ILD.effective_medium().Z
    e = torch.tensor([10.0, 90.0], dtype=torch.float64)
    for a, b in zip(gflash.longitudinal_parameters(e, Z, 8.0, start),
                    gflash.longitudinal_parameters(e, Z, 8.0, gflash.PUBLISHED)):
        torch.testing.assert_close(a, b)
    tau = torch.linspace(0.1, 3.0, 7, dtype=torch.float64)
    for a, b in zip(gflash.radial_parameters(tau, torch.full((7,), 30.0), Z, par=start),
                    gflash.radial_parameters(tau, torch.full((7,), 30.0), Z)):
        torch.testing.assert_close(a, b)


def test_longitudinal_fit_recovers_known_coefficients_and_is_reproducible():
    truth = replace(_start(), t_max=(-1.4, 1.0), pair_length_x0=0.9, sampling=(0.9, 0.0, 0.08))
    e, th, _, det = _showers(truth)
    v = tuning.layer_energies(det.points.numpy(), det.ptr.numpy(), ILD)
    data = (e, th, v)
    fitted, stats = tuning.fit_longitudinal(data, ILD, _start(), steps=150)
    assert stats["chi2_per_term"] < 0.3 * stats["chi2_per_term_published"]
    # the depth of the maximum at 50 GeV, the conversion depth and the sampling scale
    assert math.exp(_mean_ln_t(fitted)) == pytest.approx(math.exp(_mean_ln_t(truth)), rel=0.04)
    assert fitted.pair_length_x0 == pytest.approx(0.9, rel=0.15)
    assert fitted.sampling[0] == pytest.approx(0.9, rel=0.02)
    # the published start is far from it: the fit moved
    assert abs(math.exp(_mean_ln_t(_start())) - math.exp(_mean_ln_t(truth))) > 0.4
    again, _ = tuning.fit_longitudinal(data, ILD, _start(), steps=150)
    assert again == fitted  # same data, same seed: the same coefficients


def test_radial_fit_moves_towards_a_narrower_core():
    truth = replace(_start(), r_core=(0.012, 0.0016, 0.06, 0.0))
    e, th, _, det = _showers(truth, n=300)
    data = (e, th, np.zeros_like(th), det.points.numpy(), det.ptr.numpy())
    fitted, stats = tuning.fit_radial(data, ILD, _start(),
                                      steps=40, showers_per_bin=80)
    assert stats["chi2"] < 0.5 * stats["chi2_published"]
    tau = torch.tensor([1.0], dtype=torch.float64)
    r_fit = gflash.radial_parameters(tau, torch.tensor([50.0]), 1.0, par=fitted)[0]
    r_pub = gflash.radial_parameters(tau, torch.tensor([50.0]), 1.0, par=_start())[0]
    r_true = gflash.radial_parameters(tau, torch.tensor([50.0]), 1.0, par=truth)[0]
    assert abs(float(r_fit - r_true)) < 0.5 * abs(float(r_pub - r_true))


def test_tuned_sampling_scale_reaches_the_detector_frame():
    e, th = np.full(200, 20.0), np.full(200, math.radians(40.0))
    pub = simulate_parametrised(e, th, 0.0, 22, ILD, 5, "detector", tune="published")
    half = simulate_parametrised(e, th, 0.0, 22, ILD, 5, "detector",
                                 tune=replace(gflash.PUBLISHED, sampling=(0.5, 0.0, 0.0)))
    ratio = float(half.points[:, 3].double().sum() / pub.points[:, 3].double().sum())
    assert ratio == pytest.approx(0.5, rel=0.02)
    assert pub.metadata["parametrisation"] == "published"


def _record(tmp_path, stack=ILD):
    prov = {"engine": "geant4", "generator": "geant4-approximate-lowenergy",
            "geant4_version": "geant4-11-04-patch-01", "geant4_physics": "G4EmStandardPhysics_option1",
            "stack": stack.name, "showers": 1000}
    path = tuning.write_tune(tmp_path / "t.yaml", _start(stack), stack, prov, {"seed": 0})
    return path, yaml.safe_load(path.read_text())


def test_tune_files_round_trip_and_bad_files_name_file_and_key(tmp_path):
    path, record = _record(tmp_path)
    par, back = tuning.load_tune(path)
    assert tuning._values_of(par) == tuning._values_of(_start())
    assert back["provenance"]["geant4_version"] == "geant4-11-04-patch-01"
    assert tuning.parametrisation_for(ILD, str(path)).t_max == _start().t_max

    def broken(edit, match):
        bad = yaml.safe_load(path.read_text())
        edit(bad)
        target = tmp_path / "bad.yaml"
        target.write_text(yaml.safe_dump(bad))
        with pytest.raises(tuning.TuneError, match=match) as err:
            tuning.parametrisation_for(ILD, str(target))
        assert "bad.yaml" in str(err.value)

    broken(lambda r: r["parametrisation"].pop("rho"), "missing key 'parametrisation.rho'")
    broken(lambda r: r["parametrisation"].update(alpha=[1.0, 2.0]), "parametrisation.alpha.*3")
    broken(lambda r: r["parametrisation"].update(rho=[float("nan"), 0.0]), "finite")
    broken(lambda r: r["provenance"].update(engine="parametrised"), "provenance.engine")
    broken(lambda r: r["provenance"].pop("geant4_version"), "provenance.geant4_version")
    broken(lambda r: r.update(pcshower_tune=99), "format 99")
    broken(lambda r: r["stack_summary"].update(layers=31), "layers")
    (tmp_path / "junk.yaml").write_text("a: [1,\n")
    with pytest.raises(tuning.TuneError, match="junk.yaml: not valid YAML"):
        tuning.load_tune(tmp_path / "junk.yaml")
    with pytest.raises(tuning.TuneError, match="not a file"):
        tuning.parametrisation_for(ILD, str(tmp_path / "missing.yaml"))


def test_a_stack_without_a_tune_falls_back_with_one_notice(capsys):
    stack = Stack.repeated([("W", 3.5, False), ("Si", 0.5, True)], 20, name="untuned-test")
    assert tuning.parametrisation_for(stack, "auto") is gflash.PUBLISHED
    assert tuning.parametrisation_for(stack, "auto") is gflash.PUBLISHED
    err = capsys.readouterr().err
    assert err.count("no Geant4 tune for stack 'untuned-test'") == 1
    assert tuning.parametrisation_for(stack, "published") is gflash.PUBLISHED


def test_shipped_tunes_load_and_match_their_stacks():
    files = sorted(tuning.TUNES_DIR.glob("*.yaml"))
    assert files, "pcshower ships at least the ILD tune"
    for path in files:
        stack, _, _ = resolve_stack(path.stem)
        par, record = tuning.load_tune(path)
        assert tuning.parametrisation_for(stack, "auto") == par
        assert record["provenance"]["engine"] == "geant4" and record["provenance"]["showers"] >= 1000


def test_tune_command_on_parametrised_showers_is_refused(tmp_path, capsys):
    from pcshower.cli import main

    out = tmp_path / "p"
    assert main(["simulate", "--stack", "ild", "--energy", "10:20", "--theta", "60:90", "--n", "12",
                 "--frame", "detector", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["tune", str(out), "--out", str(tmp_path / "t.yaml"), "--no-progress"]) == 2
    assert "tunes are fitted to Geant4 showers" in capsys.readouterr().err
    assert main(["simulate", "--engine", "geant4", "--tune", "published", "--energy", "10",
                 "--theta", "90", "--n", "1", "--out", str(tmp_path / "g")]) == 2
    assert "drop it for --engine geant4" in capsys.readouterr().err
    assert not (tmp_path / "t.yaml").exists()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("geant4_pybind"),
                    reason="geant4-pybind is not installed")
def test_tune_command_fits_geant4_showers_and_simulate_uses_the_file(tmp_path, capsys):
    from pcshower.cli import main
    from pcshower.io import read_parquet

    g4 = tmp_path / "g4"
    assert main(["simulate", "--engine", "geant4", "--stack", "ild", "--energy", "4:8", "--theta",
                 "60:90", "--n", "24", "--shard-size", "12", "--frame", "both", "--seed", "4",
                 "--out", str(g4), "--no-progress", "--workers", "1"]) == 0
    tune = tmp_path / "ild.yaml"
    assert main(["tune", str(g4), "--out", str(tune), "--steps", "5,3", "--no-progress"]) == 0
    assert "tune of ild from 24 Geant4 showers" in capsys.readouterr().out
    par, record = tuning.load_tune(tune)
    prov = record["provenance"]
    assert prov["engine"] == "geant4" and prov["showers"] == 24 and prov["run_seed"] == 4
    assert prov["geant4_physics"] == "G4EmStandardPhysics_option1" and prov["geant4_version"]
    # the same data and seed give the same file's coefficients
    again = tmp_path / "again.yaml"
    assert main(["tune", str(g4), "--out", str(again), "--steps", "5,3", "--no-progress"]) == 0
    assert tuning.load_tune(again)[0] == par
    capsys.readouterr()
    assert main(["tune", str(g4), "--out", str(tune), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # an existing file is kept
    out = tmp_path / "p"
    assert main(["simulate", "--stack", "ild", "--tune", str(tune), "--energy", "10", "--theta",
                 "90", "--n", "3", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert read_parquet(out).metadata["parametrisation"].startswith("geant4-tune:ild")


def test_fluctuation_fit_recovers_kappa():
    rng = np.random.default_rng(8)
    e, th = rng.uniform(10, 30, 400), np.zeros(400)
    truth = replace(_start(), crossing_rms=2.5)
    det = simulate_parametrised(e, th, 0.0, 22, ILD, 21, "detector", tune=truth)
    v = tuning.layer_energies(det.points.numpy(), det.ptr.numpy(), ILD)
    kappa, stats = tuning.fit_crossing_rms((e, th, np.zeros(400), v), ILD, _start(),
                                           max_showers=400, seed=5)
    assert kappa == pytest.approx(2.5, abs=0.6)
    assert min(stats["cost"]) < stats["cost"][tuning.KAPPA_GRID.index(1.0)]
