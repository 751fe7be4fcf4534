"""`pcshower.generate` and `pcshower generate`: reproducibility, ranges, geometry, files, shipped model."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pcshower
from pcshower.cli import main
from pcshower.data import Showers
from pcshower.models.checkpoint import load_model
from pcshower.models.generate import default_model_path, generate
from pcshower.models.model import DEFAULT_MODEL_CONFIG, merge_config
from pcshower.models.train import load_config, train

TINY = {"slices": {"num": 6, "z_max_x0": 24.0}, "flow": {"transforms": 1, "hidden": [16]},
        "epic": {"point_dim": 8, "global_dim": 4, "hidden": 16, "layers": 1}, "steps": 3}


def toy_showers(n: int, seed: int = 0) -> Showers:
    g = torch.Generator().manual_seed(seed)
    energy = 10 + 90 * torch.rand(n, generator=g, dtype=torch.float64)
    theta = torch.deg2rad(30 + 60 * torch.rand(n, generator=g, dtype=torch.float64))
    counts = 15 + torch.randint(0, 10, (n,), generator=g)
    p = int(counts.sum())
    batch = torch.repeat_interleave(torch.arange(n), counts)
    e = torch.rand(p, generator=g) + 0.1
    e = e / torch.zeros(n).index_add_(0, batch, e)[batch]
    pts = torch.stack([torch.randn(p, generator=g) * 0.5, torch.randn(p, generator=g) * 0.5,
                       torch.rand(p, generator=g) * 20, e], 1)
    return Showers.from_counts(pts, counts, energy=energy, theta=theta)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    train({"model": TINY, "train": {"steps": 10, "batch_showers": 8, "flow_batch": 32,
                                    "checkpoint_every": 100}}, toy_showers(60), out, progress=False)
    yield out / "model.pt"
    torch.set_num_threads(before)


def test_seed_gives_identical_showers(tiny_model):
    kw = dict(geometry=None, n=5, model=tiny_model, device="cpu")
    a, b = generate(50, 60, seed=7, **kw), generate(50, 60, seed=7, **kw)
    assert torch.equal(a.points, b.points) and torch.equal(a.ptr, b.ptr)
    c = generate(50, 60, seed=8, **kw)
    assert not (torch.equal(a.ptr, c.ptr) and torch.equal(a.points, c.points))
    assert a.frame == "physics" and a.hits is None and a.metadata["seed"] == 7


def test_conditions_broadcast_in_degrees(tiny_model):
    s = generate([20, 40, 80], 45, None, 2, phi=[0, 90, 180], model=tiny_model, seed=0)
    assert len(s) == 6
    assert torch.allclose(s.energy, torch.tensor([20, 20, 40, 40, 80, 80], dtype=torch.float64))
    assert torch.allclose(s.theta, torch.full((6,), 45.0, dtype=torch.float64).deg2rad())
    assert torch.allclose(s.phi[2:4], torch.full((2,), 90.0, dtype=torch.float64).deg2rad())
    assert (s.particle == 22).all()
    # energies of each shower are positive and the physics-frame depth within the slices
    assert (s.e >= 0).all() and (s.z >= 0).all() and (s.z <= 24).all()
    # batching does not change the number of showers, and each batch is reproducible
    t = generate([20, 40, 80], 45, None, 2, phi=[0, 90, 180], model=tiny_model, seed=0,
                 batch_size=4)
    assert len(t) == 6


def test_out_of_range_conditions(tiny_model):
    with pytest.raises(ValueError, match=r"energy 500 GeV is outside the range .* \[10\.\d*, 9\d\.\d*\] GeV"):
        generate(500, 60, None, model=tiny_model)
    with pytest.raises(ValueError, match=r"angle \(theta\) 10 deg is outside"):
        generate(50, 10, None, model=tiny_model)
    with pytest.warns(UserWarning, match="extrapolating"):
        generate(500, 60, None, model=tiny_model, allow_extrapolation=True, seed=0)
    with pytest.raises(ValueError, match="trained on photon only, not pi"):
        generate(50, 60, None, model=tiny_model, particle="pi+")
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(50, 60, None, 0, model=tiny_model)


def test_generate_on_ild_cells(tiny_model):
    s = generate(50, 90, "ild", 3, model=tiny_model, seed=3)
    assert s.frame == "detector" and s.geometry == "ild"
    hits = s.hits
    assert len(hits) == 3 and hits.geometry == "ild"
    # the cell hits hold exactly the visible energy of the detector-frame points
    per_shower = torch.zeros(3, dtype=torch.float64).index_add_(0, hits.batch, hits.energy.double())
    points = torch.zeros(3, dtype=torch.float64).index_add_(0, s.batch, s.e.double())
    assert torch.allclose(per_shower, points, rtol=1e-5)
    # visible energy: a few percent of 50 GeV in the Si-W sampling calorimeter
    assert ((points > 0.1e3) & (points < 5e3)).all(), points
    again = generate(50, 90, "ild", 3, model=tiny_model, seed=3)
    assert torch.equal(again.hits.cell_id, hits.cell_id) and torch.equal(again.hits.energy, hits.energy)


@pytest.mark.parametrize("geometry, position", [("allegro", None), ("ild", [1804.8, 300.0, 200.0]),
                                                ("cld", [[2150.0, 0.0, 0.0], [0.0, 0.0, 0.0]])])
def test_generate_inclined_and_explicit_positions_in_the_detector_frame(tiny_model, geometry, position):
    # two passes (3 + 1 showers): each is placed and projected on its own, hits concatenated
    s = generate([50, 60], 90, geometry, 2, position=position, model=tiny_model, seed=4, batch_size=3)
    assert s.frame == "detector" and s.geometry == geometry and s.metadata["geometry"] == geometry
    if position is not None:
        expected = torch.as_tensor(position, dtype=torch.float64).expand(2, 3).repeat_interleave(2, 0)
        assert torch.equal(s.position, expected)
    # the attached hits are the projection of the returned points, and hold all their energy
    again = pcshower.load_geometry(geometry).project(s)
    assert torch.equal(again.cell_id, s.hits.cell_id) and torch.equal(again.energy, s.hits.energy)
    assert s.hits.outside_points.tolist() == [0] * 4 and (s.hits.num_hits > 0).all()
    points = torch.zeros(4, dtype=torch.float64).index_add_(0, s.batch, s.e.double())
    hits = torch.zeros(4, dtype=torch.float64).index_add_(0, s.hits.batch, s.hits.energy.double())
    assert torch.allclose(hits, points, rtol=1e-5)


def test_cli_generate_parquet_and_calochallenge(tiny_model, tmp_path, capsys):
    from pcshower.io import read_calochallenge, read_hits_parquet, read_parquet

    out = tmp_path / "gen.parquet"
    # written pass by pass (3 + 3 showers) into one file each
    code = main(["generate", "--geometry", "ild", "--energy", "20:80", "--theta", "40:80",
                 "--n", "6", "--out", str(out), "--model", str(tiny_model), "--no-progress",
                 "--batch-size", "3", "--seed", "7"])
    assert code == 0
    s = read_parquet(out)
    assert len(s) == 6 and s.frame == "detector"
    assert (s.energy >= 20).all() and (s.energy <= 80).all()
    hits, cond = read_hits_parquet(tmp_path / "gen_hits.parquet")
    assert len(hits) == 6 and torch.allclose(cond["energy"], s.energy)
    # the same showers as one generate() call with that seed and batch size
    rng = np.random.default_rng(7)
    e, t = rng.uniform(20, 80, 6), rng.uniform(40, 80, 6)
    ref = generate(e, t, "ild", 1, phi=np.full(6, 0.0), model=tiny_model, seed=7, batch_size=3)
    assert torch.equal(ref.ptr, s.ptr) and torch.allclose(ref.points, s.points)
    assert torch.equal(ref.hits.cell_id, hits.cell_id) and torch.allclose(ref.hits.energy, hits.energy)
    h5 = tmp_path / "gen.h5"
    # the default angle is the geometry's normal incidence (0 deg here): the showers hit the
    # readout (the tiny model saw other angles: extrapolation)
    assert main(["generate", "--geometry", "calochallenge_ds2", "--energy", "50", "--n", "4",
                 "--out", str(h5), "--model", str(tiny_model), "--no-progress",
                 "--allow-extrapolation"]) == 0
    data = read_calochallenge(h5)
    inc, vox = data
    assert tuple(vox.shape) == (4, 6480) and float(inc[0]) == pytest.approx(50000.0)
    assert (vox.sum(1) > 0).all()
    capsys.readouterr()
    assert main(["generate", "--energy", "500", "--n", "1", "--out", str(tmp_path / "x.parquet"),
                 "--model", str(tiny_model), "--no-progress"]) == 2
    assert "outside the range the model was trained on" in capsys.readouterr().err
    assert main(["generate", "--energy", "5:1", "--out", str(tmp_path / "y.parquet")]) == 2


def test_cli_generate_threads_sets_torch_threads(tiny_model, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--geometry", "ild", "--energy", "50", "--theta", "90", "--n",
                     "1", "--out", str(tmp_path / "g.parquet"), "--model", str(tiny_model),
                     "--no-progress", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["generate", "--geometry", "ild", "--energy", "50", "--theta", "90", "--n",
                     "2", "--out", str(tmp_path / "sharded"), "--model", str(tiny_model),
                     "--no-progress", "--threads", "2", "--shard-size", "1"]) == 2
        assert "--workers" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_cli_generate_keeps_existing_files_unless_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "gen.parquet"
    args = ["generate", "--geometry", "ild", "--energy", "50", "--theta", "60", "--n", "2",
            "--out", str(out), "--model", str(tiny_model), "--no-progress"]
    assert main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(args + ["--seed", "3"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    # the hits file alone is protected too
    out.unlink()
    assert main(args) == 2 and not out.exists()
    assert main(args + ["--seed", "3", "--overwrite"]) == 0 and out.read_bytes() != before


def test_cli_generate_into_a_read_only_folder_fails_before_work(tiny_model, tmp_path, capsys,
                                                                monkeypatch):
    import os

    from pcshower.io import _atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: let the check see the folder's mode
        real = os.access
        monkeypatch.setattr(_atomic.os, "access",
                            lambda p, mode: False if Path(p) == ro else real(p, mode))
    try:
        rc = main(["generate", "--energy", "50", "--theta", "60", "--n", "1", "--out",
                   str(ro / "sub" / "gen.parquet"), "--model", str(tiny_model), "--no-progress"])
        assert rc == 1
        err = capsys.readouterr().err
        assert "cannot write in" in err and "Traceback" not in err
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_shipped_default_model_generates():
    path = default_model_path()
    assert path.is_file(), f"the default model {path} is not shipped"
    assert path.stat().st_size <= 10 * 1024 ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = pcshower.generate(energy=50, angle=90, geometry="ild", n=2, seed=0, steps=2)
    assert len(s) == 2 and s.hits is not None and s.hits.num_hits.min() > 0


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_training_config(path):
    cfg = load_config(path)
    assert cfg["train"]["steps"] > 0


def test_the_default_recipe_describes_the_shipped_model():
    """configs/default_flow.yaml (whose flow the shipped file carries) gives the shipped model's
    config, up to the split settings that `pcshower fit-split --factor 4 --snap-depth` adds."""
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = load_model(default_model_path()).config
    for name in ("default_flow.yaml", "default_points.yaml"):
        recipe = merge_config(DEFAULT_MODEL_CONFIG, load_config(root / name)["model"])
        if name == "default_points.yaml":  # its flow settings are unused: combine takes the flow run's
            for key in ("flow", "fraction_eps", "fraction_dequantize"):
                recipe[key] = shipped[key]
        recipe["split"].update(factor=4, spread=True, snap_depth=True)
        assert recipe == shipped, name


def test_sample_reports_every_network_call(tiny_model):
    from pcshower.models.samplers import network_calls

    net = load_model(tiny_model)
    seen = []
    net.sample([50.0, 60.0], [1.0, 1.2], [0.0, 0.0], steps=3, sampler="heun",
               generator=torch.Generator().manual_seed(0), on_call=lambda: seen.append(1))
    assert len(seen) == network_calls("heun", 3) == 5
    assert network_calls("euler", 3) == 3
    with pytest.raises(ValueError, match="unknown sampler"):
        network_calls("rk4", 3)


def test_calochallenge_geometry_gets_normal_incidence_and_grazing_angles_are_refused(tmp_path):
    import h5py

    from pcshower.cli import main
    from pcshower.models.generate import normal_incidence_deg

    assert normal_incidence_deg("calochallenge_ds2") == 0.0 and normal_incidence_deg("ild") == 90.0
    out = tmp_path / "ds2.h5"
    assert main(["generate", "--geometry", "calochallenge_ds2", "--energy", "50", "--n", "2",
                 "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    with h5py.File(out) as f:
        voxels = f["showers"][:]
    assert voxels.shape == (2, 6480) and (voxels.sum(1) > 300.0).all()  # ~1.3 GeV seen of 50
    # a direction along the face misses the readout: a clear error, no file
    bad = tmp_path / "bad.h5"
    assert main(["generate", "--geometry", "calochallenge_ds2", "--theta", "90", "--energy", "50",
                 "--n", "1", "--out", str(bad), "--no-progress"]) == 2
    assert not bad.exists()
    # 70 deg to the normal is the model's 20 deg: outside what it saw, said in those words
    with pytest.raises(ValueError, match="90 deg minus the 70 deg incidence"):
        pcshower.generate(energy=50, angle=70, geometry="calochallenge_ds2", steps=2, seed=1)


def test_most_energy_missing_the_readout_is_a_loud_warning(tmp_path):
    from pcshower.geometry import load_geometry
    from pcshower.models.generate import _project

    path = tmp_path / "small.yaml"
    path.write_text("""
name: small_plane
source: test
stack:
  - repeat: 30
    slabs: [{material: W, thickness_mm: 2.1}, {material: Si, thickness_mm: 0.5, active: true}]
readout: {kind: planar, cell_size_mm: 5.0}
placement:
  plane: {distance_mm: 0.0, half_width_mm: [50.0, 50.0]}
""")
    geom = load_geometry(path)
    showers = pcshower.generate(energy=50, angle=90, geometry=None, n=2, seed=1)
    showers = showers._replace(theta=torch.zeros(2, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        near = _project(showers, geom, torch.Generator().manual_seed(1)).hits  # on the plane
    assert float(near.outside_energy.sum()) < 0.2 * 100_000  # leakage of an 18 X0 stack
    # impact points 1 m off the plane: all of it misses, loudly
    far = showers._replace(position=torch.tensor([[1000.0, 0.0, 0.0]] * 2, dtype=torch.float64))
    with pytest.warns(UserWarning, match="misses the readout of small_plane"):
        hits = _project(far, geom, torch.Generator().manual_seed(1)).hits
    assert float(hits.outside_energy.sum()) > 0.5 * 100_000 * 0.9


def test_the_model_angle_is_the_incidence_at_the_given_position():
    """With ``position`` the model's angle (90 deg minus the incidence) is taken on the face the
    shower enters there, not at the default impact point: a photon at phi = -70 deg aimed at the
    middle of ILD's stave 0 (phi 0) meets it 70 deg off the normal, beyond the shipped model's
    60 deg, and is refused; the same direction at its own default impact (stave 7, 25 deg off)
    is accepted."""
    geom = pcshower.load_geometry("ild")
    centre = geom.default_impact(torch.tensor([np.pi / 2]), torch.tensor([0.0]))[0].numpy()
    local, _ = geom.local_direction(torch.tensor([np.pi / 2]), torch.tensor([np.radians(-70.0)]),
                                    torch.as_tensor(centre)[None])
    assert abs(np.degrees(float(local[0])) - 70.0) < 1e-6
    with pytest.raises(ValueError, match="outside the range the model was trained on"):
        generate(50.0, 90.0, "ild", phi=-70.0, position=centre, seed=1, steps=1)
    shower = generate(50.0, 90.0, "ild", phi=-70.0, seed=1, steps=1)
    assert len(shower) == 1 and shower.points.shape[0] > 0


def test_a_small_job_runs_in_several_passes_so_its_progress_moves(tiny_model):
    from pcshower.models.generate import default_batch_size, generate_batches

    assert [default_batch_size(n) for n in (1, 40, 200, 2560, 10 ** 6)] == [16, 16, 20, 256, 256]
    parts = list(generate_batches(50, 90, "ild", 40, seed=3, model=tiny_model))
    assert [len(p) for p in parts] == [16, 16, 8]
