"""Recorded Geant4 layer response: files, the per-layer mean, its fluctuation, and its measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcshower import Showers
from pcshower.geometry import load_geometry
from pcshower.geometry.response import (LayerResponse, load_response, measure_layer_response,
                                        response_for_provenance, save_response)


def physics_showers(n=40, points=600, seed=0, length=23.5, energy=30.0):
    """Physics-frame showers entering ILD's barrel at normal incidence, all inside the stack:
    depths uniform over ``length`` X0 from a start that varies from shower to shower."""
    g = torch.Generator().manual_seed(seed)
    total = n * points
    x = torch.randn(total, generator=g) * 0.8
    y = torch.randn(total, generator=g) * 0.8
    start = (torch.rand(n, generator=g) * (24.0 - length)).repeat_interleave(points)
    z = torch.rand(total, generator=g) * length + 0.01 + start
    e = torch.rand(total, generator=g) / points * 2
    return Showers.from_counts(torch.stack([x, y, z, e], 1), [points] * n,
                               energy=torch.as_tensor(energy, dtype=torch.float64).expand(n),
                               theta=math.pi / 2, phi=0.0)


def per_layer(geo, hits):
    lay = torch.as_tensor(geo.cell_layer(hits.cell_id.to(torch.int64))).to(torch.int64)
    out = torch.zeros(len(hits), geo.num_layers, dtype=torch.float64)
    out.index_put_((hits.batch, lay), hits.energy.double(), accumulate=True)
    return out


def falling_rho(n_layers):
    return tuple(np.linspace(0.04, 0.008, n_layers).tolist())


def test_file_round_trip_and_clear_errors(tmp_path):
    r = LayerResponse("ild", ((0.03, 0.02), (0.02, 0.01)), (-2.0, 0.0, 3.0), 120.0, 0.001,
                      {"showers": 5})
    path = save_response(r, tmp_path / "ild.yaml")
    assert load_response(path) == r
    with pytest.raises(FileExistsError, match="overwrite"):
        save_response(r, path)
    (tmp_path / "bad.yaml").write_text("rho: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_response(tmp_path / "bad.yaml")
    (tmp_path / "other.yaml").write_text("stack: ild\nrho: [0.1]\n")
    with pytest.raises(ValueError, match="not a pcshower response file"):
        load_response(tmp_path / "other.yaml")
    (tmp_path / "extra.yaml").write_text("pcshower_response: 1\nstack: ild\nrho: [0.1]\n"
                                         "var_a_mev: 1\nvar_b: 0\nkappa: 3\n")
    with pytest.raises(ValueError, match="unknown key 'kappa'"):
        load_response(tmp_path / "extra.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_response(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="finite ratios"):
        LayerResponse("ild", (0.1, float("nan")))
    with pytest.raises(ValueError, match="3 increasing edges"):
        LayerResponse("ild", ((0.1, 0.2),), (0.0, 1.0))
    with pytest.raises(ValueError, match="var_a_mev must be a finite number >= 0"):
        LayerResponse("ild", (0.1,), var_a_mev=-1.0)


def test_provenance_of_recorded_deposits_is_found_at_any_depth():
    assert response_for_provenance({"physics_energy": "per-cell deposit"})
    assert response_for_provenance({"training": {"runs": [{"provenance": {
        "physics_energy": "per-cell deposit"}}]}})
    assert not response_for_provenance({"engine": "parametrised"})
    assert not response_for_provenance(None)


def test_mean_response_scales_every_layer_by_its_ratio_and_keeps_every_deposit():
    ild = load_geometry("ild")
    s = physics_showers()
    unit = LayerResponse("ild", (1.0,) * ild.num_layers)
    dep = ild.project(s, fluctuate=False, response=unit)
    total = torch.zeros(len(s), dtype=torch.float64).index_add_(0, s.batch, s.e.double()) * 30_000
    inside = per_layer(ild, dep).sum(1) + dep.outside_energy.double()
    # a unit response sees every deposit inside the stack in full (the sampling model would not)
    assert float((inside / total).min()) > 0.97 and float((inside / total).max()) <= 1 + 1e-6
    rho = falling_rho(ild.num_layers)
    vis = ild.project(s, fluctuate=False, response=LayerResponse("ild", rho))
    torch.testing.assert_close(per_layer(ild, vis), per_layer(ild, dep) * torch.tensor(rho).double(),
                               rtol=1e-5, atol=1e-6)
    # the equivalent-medium model differs: it is not what a recorded response asks for
    gflash = per_layer(ild, ild.project(s, fluctuate=False))
    assert not torch.allclose(gflash, per_layer(ild, vis), rtol=0.05)


def test_the_fluctuation_is_one_gamma_factor_per_shower():
    r = LayerResponse("x", (0.02, 0.01), var_a_mev=50.0, var_b=0.004)
    n = 20000
    batch = torch.arange(n).repeat_interleave(2)  # two deposits per shower, in layers 0 and 1
    deposited = torch.full((2 * n,), 100.0, dtype=torch.float64)  # 200 MeV a shower
    active = torch.tensor([0, 1]).repeat(n)
    out = r.visible(deposited, active, batch, n, generator=torch.Generator().manual_seed(3))
    pair = out.view(n, 2)
    torch.testing.assert_close(pair[:, 0], 2 * pair[:, 1])  # one draw per shower, both layers
    ratio = pair[:, 0] / (100.0 * 0.02)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(ratio.var()) == pytest.approx(50.0 / 200.0 + 0.004, rel=0.05)
    again = r.visible(deposited, active, batch, n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # same seed, same draws
    mean = r.visible(deposited, active, batch, n, fluctuate=False)
    torch.testing.assert_close(mean.view(n, 2)[0], torch.tensor([2.0, 1.0], dtype=torch.float64))
    none = r.visible(deposited, torch.full_like(active, -1), batch, n)
    assert float(none.abs().sum()) == 0.0  # outside every active layer: seen by none
    with pytest.raises(ValueError, match="has 2 layers"):
        r.visible(deposited, torch.full_like(active, 5), batch, n)


def test_layer_factors_move_energy_between_layers_and_keep_each_showers_total():
    r = LayerResponse("x", (0.02, 0.01, 0.01), layer_var_a_mev=20.0)
    n = 20000
    batch = torch.arange(n).repeat_interleave(3)
    active = torch.tensor([0, 1, 2]).repeat(n)
    deposited = torch.tensor([5.0, 400.0, 400.0], dtype=torch.float64).repeat(n)
    out = r.visible(deposited, active, batch, n, generator=torch.Generator().manual_seed(1))
    per = out.view(n, 3)
    torch.testing.assert_close(per.sum(1), torch.full((n,), 0.1 + 4.0 + 4.0, dtype=torch.float64))
    small = per[:, 0] / 0.1  # a 5 MeV layer: relative variance 20 / 5 = 4, log-normal, never 0
    assert float(small.min()) > 0 and float(small.mean()) == pytest.approx(1.0, abs=0.05)
    assert float(small.var()) == pytest.approx(4.0, rel=0.25)
    big = per[:, 1] / 4.0  # 400 MeV: 0.05, less what keeping the total takes away
    assert 0.02 < float(big.var()) < 0.05


def test_a_known_response_is_measured_back_from_the_two_frames():
    ild = load_geometry("ild")
    rho = falling_rho(ild.num_layers)
    truth = LayerResponse("ild", rho, var_a_mev=200.0, var_b=0.002, layer_var_a_mev=30.0)
    # 3-100 GeV: layer deposits of ~100 MeV to ~3 GeV, so both terms of the variance show
    phys = [physics_showers(n=200, seed=s, energy=torch.linspace(3.0, 100.0, 200)) for s in (1, 2, 3)]
    gen = torch.Generator().manual_seed(11)
    det = [ild.to_detector(p, generator=gen, response=truth) for p in phys]
    measured = measure_layer_response(phys, det, ild, tau_edges=(-1e3, 1e3))
    assert measured.provenance["showers"] == 600
    np.testing.assert_allclose(np.asarray(measured.rho)[:, 0], rho, rtol=0.04)
    # the fit gives the showers' totals the spread they were given, at every energy
    # the layer factors' scatter (keeping each total takes ~1/30 of it away in these showers)
    assert np.median(measured.layer_var_a_mev) == pytest.approx(30.0, rel=0.3)
    e_dep = np.array([3e3, 3e4, 1e5])  # MeV
    np.testing.assert_allclose(measured.var_a_mev / e_dep + measured.var_b,
                               200.0 / e_dep + 0.002, rtol=0.35)
    with pytest.raises(ValueError, match="not the same showers"):
        measure_layer_response(phys[:1], [ild.to_detector(physics_showers(n=59))], ild)
    with pytest.raises(ValueError, match="different numbers of showers"):
        measure_layer_response(phys, det[:2], ild)


def test_a_ratio_that_changes_with_shower_age_is_measured_back_and_applied_per_layer():
    ild = load_geometry("ild")
    edges = tuple(float(t) for t in np.arange(-6.0, 6.5, 2.0))
    centres = 0.5 * (np.asarray(edges[1:]) + np.asarray(edges[:-1]))
    # the deep, late part of a shower is sampled less, like Geant4's soft tail in tungsten
    table = np.outer(falling_rho(ild.num_layers), 1.0 - 0.04 * centres)
    truth = LayerResponse("ild", table, edges)
    phys = [physics_showers(n=100, seed=s, length=12.0) for s in (4, 5)]
    det = [ild.to_detector(p, fluctuate=False, response=truth) for p in phys]
    measured = measure_layer_response(phys, det, ild, tau_edges=edges, min_bin_pairs=10)
    # layers 16-22 (10-14 X0 deep) see every age of these 12 X0 long showers; the ratio is linear
    # in age, so a bin's energy-weighted ratio is the table's near the bin's centre
    np.testing.assert_allclose(np.asarray(measured.rho)[16:23, 1:-1], table[16:23, 1:-1], rtol=0.06)
    assert measured.var_a_mev + measured.var_b < 1e-3  # no fluctuation was given
    # a table without age bins, or no depths, cannot be confused with one that has them
    with pytest.raises(ValueError, match="depth_x0"):
        truth.visible(torch.ones(3), torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 1)
    # the same showers read with the per-layer mean differ from the age-resolved reading
    flat = measure_layer_response(phys, det, ild, tau_edges=(-1e3, 1e3))
    per_shower = [ild.project(p, fluctuate=False, response=r).energy.sum() for p in phys[:1]
                  for r in (measured, flat)]
    assert per_shower[0] == pytest.approx(float(per_shower[1]), rel=0.05)


def test_generate_reads_a_geant4_taught_model_with_the_stacks_measured_response(tmp_path):
    import copy
    import warnings

    from pcshower import generate
    from pcshower.geometry import response as response_module
    from pcshower.models.generate import load_default_model

    net = load_default_model()
    taught = copy.copy(net)
    taught.checkpoint_info = copy.deepcopy(net.checkpoint_info)
    taught.checkpoint_info["provenance"]["training_data"] = {"engine": "geant4",
                                                             "physics_energy": "per-cell deposit"}
    kw = dict(n=3, seed=4, steps=2, progress=False)
    plain = generate(40.0, 90.0, "ild", model=net, **kw)
    assert plain.metadata["layer_response"] == "equivalent-medium sampling model"
    shipped = response_module.shipped_response("ild")
    assert shipped is not None and shipped.stack == "ild" and len(shipped.tau_edges) > 2
    auto = generate(40.0, 90.0, "ild", model=taught, **kw)
    assert auto.metadata["layer_response"] == "Geant4 layer response shipped for ild"
    forced = generate(40.0, 90.0, "ild", model=taught, response="sampling", **kw)
    # the same network showers, read two ways: the sampling model sees fewer, fluctuated hits
    assert torch.equal(forced.hits.energy, plain.hits.energy)
    assert not torch.equal(auto.hits.energy, forced.hits.energy)
    path = save_response(LayerResponse("cld", (0.02,) * 40), tmp_path / "cld.yaml")
    with pytest.raises(ValueError, match="measured for the stack 'cld'"):
        generate(40.0, 90.0, "ild", model=taught, response=str(path), **kw)
    response_module._MISSING_WARNED.discard("odd")
    with pytest.warns(UserWarning, match="no measured Geant4 response for the stack 'odd'"):
        generate(40.0, 90.0, "odd", model=taught, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per stack and process
        generate(40.0, 90.0, "odd", model=taught, **kw)


def test_cli_measures_a_response_from_a_two_frame_production(tmp_path, capsys):
    from pcshower.cli import main
    from pcshower.io import write_parquet

    ild = load_geometry("ild")
    rho = falling_rho(ild.num_layers)
    phys = physics_showers(n=200, seed=8, energy=torch.linspace(10.0, 90.0, 200))
    det = ild.to_detector(phys, generator=torch.Generator().manual_seed(2),
                          response=LayerResponse("ild", rho, var_a_mev=100.0))
    meta = {"engine": "geant4", "physics_energy": "per-cell deposit", "stack": "ild",
            "geant4_tables": "approx-v2"}
    (tmp_path / "run" / "physics").mkdir(parents=True)
    (tmp_path / "run" / "detector").mkdir()
    write_parquet(tmp_path / "run" / "physics" / "shard-00000.parquet", phys, metadata=meta)
    write_parquet(tmp_path / "run" / "detector" / "shard-00000.parquet", det, metadata=meta)
    out = tmp_path / "ild.yaml"
    assert main(["tune", str(tmp_path / "run"), "--response", "--stack", "ild", "--out", str(out),
                 "--no-progress"]) == 0
    assert "Geant4 layer response of ild from 200 showers; visible/deposited" in capsys.readouterr().out
    measured = load_response(out)
    assert measured.provenance["geant4_tables"] == "approx-v2"
    # one age bin per shower's layer here (same development): compare the filled means
    np.testing.assert_allclose(np.asarray(measured.rho).max(1), rho, rtol=0.05)
    # a parametrised (equivalent-medium) physics frame is refused, with the reason
    (tmp_path / "run" / "physics" / "shard-00000.parquet").unlink()
    write_parquet(tmp_path / "run" / "physics" / "shard-00000.parquet", phys,
                  metadata={"engine": "parametrised", "stack": "ild"})
    assert main(["tune", str(tmp_path / "run"), "--response", "--stack", "ild", "--out",
                 str(tmp_path / "x.yaml"), "--no-progress"]) != 0
    assert "is not a Geant4 physics frame of per-cell deposits" in capsys.readouterr().err
    assert main(["tune", str(tmp_path / "run" / "physics"), "--response", "--stack", "ild",
                 "--out", str(tmp_path / "y.yaml"), "--no-progress"]) != 0
    assert "no physics/ and detector/ folders" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "y.yaml").exists()


def test_the_layer_scatter_is_fitted_per_layer_and_robust_to_rare_outliers():
    from pcshower.geometry.response import _layer_scale, _robust_var

    g = np.random.default_rng(0)
    bulk = np.exp(g.normal(-0.5 * np.log1p(0.2), np.sqrt(np.log1p(0.2)), 20000))
    assert _robust_var(bulk) == pytest.approx(0.2, rel=0.1)
    spiked = bulk.copy()
    spiked[:200] = 20.0  # 1 % of the pairs 20x the mean, as in ILD's last layers
    assert np.var(spiked) > 10 * 0.2 and _robust_var(spiked) == pytest.approx(0.2, rel=0.15)
    # a layer scattering 3x the all-layer form a / E + b at every deposit gets k = 3
    dep = g.uniform(50.0, 500.0, 20000)
    var = 3.0 * (20.0 / dep + 0.01)
    ratio = np.exp(g.normal(0.0, 1.0, dep.size) * np.sqrt(np.log1p(var)) - 0.5 * np.log1p(var))
    assert _layer_scale(dep, ratio, 20.0, 0.01) == pytest.approx(3.0, rel=0.15)
    # per-layer values reach visible(): a layer without scatter moves only by the renormalisation
    r = LayerResponse("x", (0.02, 0.02), layer_var_a_mev=(50.0, 0.0))
    n = 5000
    out = r.visible(torch.full((2 * n,), 100.0, dtype=torch.float64), torch.tensor([0, 1]).repeat(n),
                    torch.arange(n).repeat_interleave(2), n,
                    generator=torch.Generator().manual_seed(2)).view(n, 2)
    torch.testing.assert_close(out.sum(1), torch.full((n,), 4.0, dtype=torch.float64))
    assert r.layer_var_a_mev == (50.0, 0.0)
    with pytest.raises(ValueError, match="one per layer"):
        LayerResponse("x", (0.02, 0.02), layer_var_a_mev=(1.0, 2.0, 3.0))


def test_evaluate_reads_geant4_physics_frame_files_with_the_stacks_response():
    from pcshower.evaluate import sample_from_showers

    ild = load_geometry("ild")
    phys = physics_showers(n=20, seed=9)
    plain = sample_from_showers(phys, name="x", geometry=ild, progress=False)
    assert plain.settings["layer_response"] == "equivalent-medium sampling model"
    phys.metadata.update({"engine": "geant4", "physics_energy": "per-cell deposit"})
    recorded = sample_from_showers(phys, name="x", geometry=ild, progress=False)
    assert recorded.settings["layer_response"] == "Geant4 layer response shipped for ild"
    # the recorded reading keeps the hits the sampling model's second fluctuation would lose
    assert (float(recorded.observables.scalars["num_hits"].mean())
            > float(plain.observables.scalars["num_hits"].mean()))
