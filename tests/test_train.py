"""Training: a tiny model memorises tiny data, runs are reproducible, and --resume after a kill
continues bit-exactly."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pcshower.data import Showers
from pcshower.models.checkpoint import load_model, read_checkpoint
from pcshower.models.model import ShowerModel
from pcshower.models.train import load_config, train

TINY_MODEL = {"slices": {"num": 4, "z_max_x0": 10.0}, "flow": {"transforms": 1, "hidden": [16]},
              "epic": {"point_dim": 16, "global_dim": 8, "hidden": 32, "layers": 2}, "steps": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_showers(n: int, seed: int = 0) -> Showers:
    """Physics-frame toy showers: Gamma longitudinal profile, exponential radial profile."""
    g = torch.Generator().manual_seed(seed)
    energy = 10 + 90 * torch.rand(n, generator=g, dtype=torch.float64)
    theta = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    counts = (20 * (energy / 50) ** 0.5).round().long() + torch.randint(0, 5, (n,), generator=g)
    p = int(counts.sum())
    batch = torch.repeat_interleave(torch.arange(n), counts)
    depth = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(1.0)).sample((p,))
    r = -torch.log(torch.rand(p, generator=g)) * 0.7
    a = torch.rand(p, generator=g) * 6.2832
    e = torch.rand(p, generator=g) + 0.1
    e = e / torch.zeros(n).index_add_(0, batch, e)[batch] * 0.9
    pts = torch.stack([r * a.cos(), r * a.sin(), depth * 1.5, e], 1)
    return Showers.from_counts(pts, counts, energy=energy, theta=theta)


def test_tiny_model_memorises_tiny_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 8
    counts = torch.tensor([1, 2, 1, 3, 2, 1, 2, 1])
    base = torch.stack([torch.randn(n, generator=g), torch.randn(n, generator=g),
                        torch.rand(n, generator=g) * 10, torch.rand(n, generator=g) * 0.3 + 0.05], 1)
    showers = Showers.from_counts(torch.repeat_interleave(base, counts, 0), counts,
                                  energy=torch.linspace(10, 100, n), theta=1.0)
    model_cfg = {**TINY_MODEL, "epic": {"point_dim": 32, "global_dim": 8, "hidden": 64, "layers": 2},
                 "edm": {"p_mean": 0.5, "p_std": 1.0}}
    cfg = {"model": model_cfg,
           "train": {"steps": 400, "batch_showers": 8, "flow_batch": 8, "checkpoint_every": 1000,
                     "log_every": 1, "lr": 3e-3, "warmup": 10, "val_fraction": 0,
                     "ema_decay": 0.9, "min_lr_fraction": 0.05, "grad_clip": 10.0}}

    def loss(model):
        cond = model.condition(showers.energy, showers.theta, showers.phi)
        with torch.no_grad():  # fixed noise draws at noise levels >= sigma_data
            return sum(float(model.point_loss(showers, cond, torch.Generator().manual_seed(5), s))
                       for s in (1.0, 2.0, 5.0)) / 3

    torch.manual_seed(0)  # the same initial weights as the training run
    untrained = ShowerModel(model_cfg)
    untrained.fit_normalization(showers)
    train(cfg, showers, tmp_path / "run", progress=False)
    trained = load_model(tmp_path / "run" / "model.pt")
    assert loss(trained) < loss(untrained) / 10
    with open(tmp_path / "run" / "log.csv") as f:
        flow = [float(r["flow_loss"]) for r in csv.DictReader(f)]
    assert sum(flow[-20:]) / 20 < sum(flow[:5]) / 5 - 1.0  # NLL per feature fell by > 1 nat


def test_same_seed_same_weights_and_metrics(tmp_path):
    showers = toy_showers(40)
    cfg = {"model": TINY_MODEL, "train": {"steps": 12, "batch_showers": 8, "flow_batch": 16,
                                          "checkpoint_every": 100, "warmup": 2, "seed": 3}}
    train(cfg, showers, tmp_path / "a", progress=False)
    train(cfg, showers, tmp_path / "b", progress=False)
    a, b = (read_checkpoint(tmp_path / r / "model.pt") for r in "ab")
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["metrics"]["val_point_loss"] == b["metrics"]["val_point_loss"]
    cfg["train"]["seed"] = 4
    train(cfg, showers, tmp_path / "c", progress=False)
    c = read_checkpoint(tmp_path / "c" / "model.pt")
    assert not all(torch.equal(a["weights"][k], c["weights"][k]) for k in a["weights"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown train key 'stepz'"):
        load_config({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown model config key 'epik'"):
        load_config({"model": {"epik": {}}})
    showers = toy_showers(10)
    cfg = {"model": TINY_MODEL, "train": {"steps": 2, "checkpoint_every": 1}}
    train(cfg, showers, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(cfg, showers, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="physics frame"):
        train(cfg, showers._replace(frame="detector"), tmp_path / "s", progress=False)


def _cli(*args):
    return [sys.executable, "-m", "pcshower.cli", *map(str, args)]


def test_resume_after_kill_is_bit_exact(tmp_path):
    from pcshower.io import write_parquet

    write_parquet(tmp_path / "data.parquet", toy_showers(60))
    steps = 150
    cfg = {"model": TINY_MODEL,
           "train": {"steps": steps, "batch_showers": 8, "flow_batch": 16, "checkpoint_every": 5,
                     "log_every": 5, "warmup": 5, "threads": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    common = ["train", "--config", tmp_path / "cfg.yaml", "--data", tmp_path / "data.parquet",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # an uninterrupted run
    subprocess.run(_cli(*common, "--out", tmp_path / "full"), check=True, env=env)
    # a run killed (SIGKILL, no clean-up) once it has written a checkpoint
    proc = subprocess.Popen(_cli(*common, "--out", tmp_path / "killed"), env=env)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(last)["training_state"]["step"]
    assert killed_at < steps, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.pt").exists()
    subprocess.run(_cli(*common, "--out", tmp_path / "killed", "--resume"), check=True, env=env)
    full = read_checkpoint(tmp_path / "full" / "model.pt")
    resumed = read_checkpoint(tmp_path / "killed" / "model.pt")
    for key, value in full["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key
    assert full["metrics"]["val_point_loss"] == resumed["metrics"]["val_point_loss"]
    with open(tmp_path / "full" / "log.csv") as f1, open(tmp_path / "killed" / "log.csv") as f2:
        a, b = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_flow_only_stage_keeps_the_point_network(tmp_path):
    showers = toy_showers(40)
    cfg = {"model": TINY_MODEL, "train": {"steps": 6, "batch_showers": 8, "flow_batch": 16,
                                          "checkpoint_every": 100, "warmup": 2}}
    train(cfg, showers, tmp_path / "one", progress=False)
    model2 = {**TINY_MODEL, "flow": {"transforms": 2, "hidden": [16], "passes": 2}}
    cfg2 = {"model": model2, "train": {**cfg["train"], "parts": ["flow"]}}
    train(cfg2, showers, tmp_path / "two", progress=False, init_from=tmp_path / "one" / "model.pt")
    one, two = (read_checkpoint(tmp_path / r / "model.pt") for r in ("one", "two"))
    for k, v in one["weights"].items():
        if k.startswith("points_net."):
            assert torch.equal(v, two["weights"][k]), k
    for k, v in one["normalization"].items():
        assert torch.equal(v, two["normalization"][k]), k
    assert two["provenance"]["init_from"]["sha256"] == one["sha256"]
    assert load_model(tmp_path / "two" / "model.pt").config["flow"]["passes"] == 2
    # a new flow with ring features: its shape statistics are measured on the data (they cannot
    # come from the init checkpoint), the point network's and the conditions' are copied
    cfg3 = {"model": {**TINY_MODEL, "rings": [0.5, 1.0]}, "train": {**cfg["train"], "parts": ["flow"]}}
    train(cfg3, showers, tmp_path / "three", progress=False, init_from=tmp_path / "one" / "model.pt")
    three = read_checkpoint(tmp_path / "three" / "model.pt")
    assert three["normalization"]["shape_mean"].numel() == one["normalization"]["shape_mean"].numel() + 3
    for k in ("point_mean", "point_std", "cond_stats", "ranges"):
        assert torch.equal(one["normalization"][k], three["normalization"][k]), k
    ringed = load_model(tmp_path / "three" / "model.pt")
    s = ringed.sample(torch.tensor([50.0, 20.0]), torch.tensor([1.2, 1.0]), torch.zeros(2), steps=1,
                      generator=torch.Generator().manual_seed(0))
    assert len(s) == 2 and bool(torch.isfinite(s.points).all())
    with pytest.raises(ValueError, match="add 'flow' to train.parts"):  # new features, no flow
        train({**cfg3, "train": {**cfg3["train"], "parts": ["points"]}}, showers, tmp_path / "four",
              progress=False, init_from=tmp_path / "one" / "model.pt")
    # centred slices: as many flow features as before, but other ones, so neither the flow nor
    # its shape statistics are copied (a flow trained on the old features is no start)
    cfg5 = {"model": {**TINY_MODEL, "slices": {**TINY_MODEL["slices"], "centred": True}},
            "train": {**cfg["train"], "parts": ["flow"], "steps": 1}}
    train(cfg5, showers, tmp_path / "five", progress=False, init_from=tmp_path / "one" / "model.pt")
    five = read_checkpoint(tmp_path / "five" / "model.pt")
    assert five["provenance"]["init_from"]["new_shape_features"] == ["slices"]
    assert five["normalization"]["shape_mean"].shape == one["normalization"]["shape_mean"].shape
    assert not torch.equal(five["normalization"]["shape_mean"], one["normalization"]["shape_mean"])
    # the same step from scratch (same seed): identical flow, so nothing of the old one was kept
    train(cfg5, showers, tmp_path / "six", progress=False)
    six = read_checkpoint(tmp_path / "six" / "model.pt")
    for k in (k for k in six["weights"] if k.startswith("flow.")):
        assert torch.equal(five["weights"][k], six["weights"][k]), k
    assert torch.equal(five["normalization"]["shape_std"], six["normalization"]["shape_std"])
    for k, v in one["weights"].items():
        if k.startswith("points_net."):
            assert torch.equal(v, five["weights"][k]), k
    with pytest.raises(ValueError, match="train.parts"):
        train({"model": TINY_MODEL, "train": {"parts": ["decoder"]}}, showers, tmp_path / "x",
              progress=False)


def _two_depth_showers(n: int, seed: int = 0) -> Showers:
    """Showers at one energy and angle, half of them starting shallow (depth ~2 X0) and half deep
    (~7 X0): only the shape tells them apart."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.full((n,), 12)
    deep = (torch.arange(n) % 2).repeat_interleave(counts)
    p = int(counts.sum())
    z = 2.0 + 5.0 * deep + 0.4 * torch.randn(p, generator=g)
    xy = 0.5 * torch.randn(p, 2, generator=g)
    e = torch.full((p,), 0.9 / 12)
    return Showers.from_counts(torch.cat([xy, z[:, None], e[:, None]], 1), counts,
                               energy=50.0, theta=1.0)


def test_shape_conditioned_network_follows_the_given_shape(tmp_path):
    showers = _two_depth_showers(40)
    shape = ShowerModel(TINY_MODEL).codec.measure(showers.points, showers.batch, len(showers))
    deep_shape, shallow_shape = (type(shape)(*(None if v is None else v[i:i + 1].repeat_interleave(
        8, 0) for v in vars(shape).values())) for i in (1, 0))
    depth = {}
    for width in (0, 4):
        model_cfg = {**TINY_MODEL, "epic": {**TINY_MODEL["epic"], "shape_embed": width},
                     "edm": {"p_mean": 0.0, "p_std": 1.2}}
        cfg = {"model": model_cfg, "train": {"steps": 300, "batch_showers": 8, "flow_batch": 8,
                                             "lr": 3e-3, "warmup": 10, "val_fraction": 0,
                                             "checkpoint_every": 1000, "parts": ["points"]}}
        train(cfg, showers, tmp_path / f"w{width}", progress=False)
        model = load_model(tmp_path / f"w{width}" / "model.pt")
        one = torch.ones(8)
        depth[width] = [float(model.sample(50 * one, one, 0 * one, shape=s, calibrate=False,
                                           generator=torch.Generator().manual_seed(1)).points[:, 2]
                              .mean()) for s in (deep_shape, shallow_shape)]
    # the data hold showers ~5 X0 apart at the same (E, theta): a network that sees the shape
    # puts its points at the depth it is given, one that does not cannot tell the two apart
    assert depth[4][0] - depth[4][1] > 3.5, depth
    assert abs(depth[0][0] - depth[0][1]) < 1.0, depth


def test_shape_conditioning_starts_from_a_checkpoint_unchanged(tmp_path):
    from pcshower.models.train import _init_from

    showers = toy_showers(40)
    cfg = {"model": TINY_MODEL, "train": {"steps": 6, "batch_showers": 8, "flow_batch": 16,
                                          "checkpoint_every": 100, "warmup": 2}}
    train(cfg, showers, tmp_path / "one", progress=False)
    wide = {**TINY_MODEL, "epic": {**TINY_MODEL["epic"], "shape_embed": 4}}
    model = ShowerModel(wide)
    info = _init_from(model, tmp_path / "one" / "model.pt")
    assert info["tensors_total"] - info["tensors_loaded"] == 4  # the embedding's weights, biases
    old = load_model(tmp_path / "one" / "model.pt")
    args = (torch.tensor([50.0, 20.0]), torch.tensor([1.2, 1.0]), torch.zeros(2))
    a, b = (m.sample(*args, steps=2, calibrate=False, generator=torch.Generator().manual_seed(0))
            for m in (old, model))
    # the new conditioning inputs start at zero (equal up to the summation order of the wider
    # matrix products)
    torch.testing.assert_close(a.points, b.points, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pass shape_y"):
        model.denoise(torch.zeros(3, 4), torch.ones(1), torch.zeros(1, 4), torch.zeros(3, dtype=torch.long),
                      torch.tensor([3]))
    with pytest.raises(ValueError, match="shape_embed must be >= 0"):
        ShowerModel({**TINY_MODEL, "epic": {**TINY_MODEL["epic"], "shape_embed": -1}})
    # the point stage trains the embedding with the network; the flow stays
    cfg2 = {"model": wide, "train": {**cfg["train"], "parts": ["points"]}}
    train(cfg2, showers, tmp_path / "two", progress=False, init_from=tmp_path / "one" / "model.pt")
    one, two = (read_checkpoint(tmp_path / r / "model.pt") for r in ("one", "two"))
    assert all(torch.equal(v, two["weights"][k]) for k, v in one["weights"].items()
               if k.startswith("flow."))
    assert not torch.equal(two["weights"]["shape_embed.2.weight"],
                           model.state_dict()["shape_embed.2.weight"])


def test_combine_takes_each_part_from_its_run(tmp_path):
    """A point-network run and a flow run trained apart (in parallel) make one checkpoint: its
    flow samples what the flow run's does, its network denoises as the point run's does."""
    from pcshower.models.checkpoint import CheckpointError, combine_checkpoints

    showers = toy_showers(30)
    base = {"steps": 4, "batch_showers": 8, "flow_batch": 16, "checkpoint_every": 100, "warmup": 2}
    train({"model": TINY_MODEL, "train": {**base, "parts": ["points"]}}, showers, tmp_path / "p",
          progress=False)
    bigger = {**TINY_MODEL, "flow": {"transforms": 2, "hidden": [24], "passes": 2}}
    train({"model": bigger, "train": {**base, "parts": ["flow"], "seed": 3}}, showers[:20],
          tmp_path / "f", progress=False)
    combine_checkpoints(tmp_path / "p" / "model.pt", tmp_path / "f" / "model.pt", tmp_path / "c.pt")
    p, f, c = (load_model(x) for x in (tmp_path / "p" / "model.pt", tmp_path / "f" / "model.pt",
                                        tmp_path / "c.pt"))
    assert c.config["flow"] == {**f.config["flow"], **bigger["flow"]} != p.config["flow"]
    cond = c.condition(torch.tensor([20.0, 80.0], dtype=torch.float64),
                       torch.tensor([0.6, 1.3], dtype=torch.float64), torch.zeros(2))
    for a, b in ((c, f), (f, f)):
        sa = a.sample_shape(cond, torch.Generator().manual_seed(1))
        sb = b.sample_shape(cond, torch.Generator().manual_seed(1))
        assert torch.equal(sa.num_points, sb.num_points) and torch.equal(sa.slice_energy, sb.slice_energy)
    # the runs measured their statistics on different showers: each part keeps its own
    assert not torch.equal(p.norm.shape_mean, f.norm.shape_mean)
    assert torch.equal(c.norm.shape_mean, f.norm.shape_mean)
    assert torch.equal(c.norm.point_mean, p.norm.point_mean)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    args = (x, torch.full((2,), 0.5), cond, torch.tensor([0] * 4 + [1] * 6), torch.tensor([4, 6]))
    assert torch.equal(c.denoise(*args), p.denoise(*args))
    assert not torch.equal(c.denoise(*args), f.denoise(*args))
    assert read_checkpoint(tmp_path / "c.pt")["provenance"]["combined"]["flow"]["sha256"] == \
        read_checkpoint(tmp_path / "f" / "model.pt")["sha256"]
    # other shape features: the flow would sample what the calibration reads differently
    ringed = {**TINY_MODEL, "rings": [0.5, 1.0]}
    train({"model": ringed, "train": {**base, "parts": ["flow"]}}, showers, tmp_path / "r",
          progress=False)
    with pytest.raises(CheckpointError, match=r"differ in \['rings'\]"):
        combine_checkpoints(tmp_path / "p" / "model.pt", tmp_path / "r" / "model.pt",
                            tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    # how the flow encodes its fractions is the flow's own business (the network does not read
    # them): a dequantised flow combines, and the combined model decodes as that flow does
    deq = {**TINY_MODEL, "fraction_eps": 1e-5, "fraction_dequantize": True}
    train({"model": deq, "train": {**base, "parts": ["flow"]}}, showers, tmp_path / "d",
          progress=False)
    combine_checkpoints(tmp_path / "p" / "model.pt", tmp_path / "d" / "model.pt", tmp_path / "cd.pt")
    cd = load_model(tmp_path / "cd.pt")
    assert cd.codec.dequantize and cd.codec.eps == 1e-5


def test_training_stops_on_a_non_finite_loss(tmp_path, monkeypatch):
    from pcshower.models.model import ShowerModel

    real = ShowerModel.flow_loss
    monkeypatch.setattr(ShowerModel, "flow_loss", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    cfg = {"model": TINY_MODEL, "train": {"steps": 3, "checkpoint_every": 100}}
    with pytest.raises(FloatingPointError, match="training stopped at step 0: the loss is nan"):
        train(cfg, toy_showers(10), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "model.pt").exists()


def test_finetune_bias_only_changes_biases_and_full_changes_weights(tmp_path):
    from pcshower.models.train import bias_parameters, finetune

    base_cfg = {"model": TINY_MODEL, "train": {"steps": 6, "batch_showers": 8, "flow_batch": 16,
                                               "checkpoint_every": 100, "warmup": 2}}
    train(base_cfg, toy_showers(40), tmp_path / "base", progress=False)
    base = read_checkpoint(tmp_path / "base" / "model.pt")
    other = toy_showers(30, seed=7)  # "another detector's" showers
    settings = {"steps": 5, "batch_showers": 8, "flow_batch": 16, "lr": 1e-3, "warmup": 1}
    finetune(tmp_path / "base" / "model.pt", other, tmp_path / "bias", trainable="bias",
             settings=settings, progress=False)
    finetune(tmp_path / "base" / "model.pt", other, tmp_path / "full", settings=settings,
             progress=False)
    bias, full = (read_checkpoint(tmp_path / r / "model.pt") for r in ("bias", "full"))
    names = bias_parameters(ShowerModel(base["config"]))
    assert names and all(n.endswith("bias") or "norm" in n for n in names)
    moved = [k for k in names if not torch.equal(base["weights"][k], bias["weights"][k])]
    assert moved  # the biases learned ...
    for k, v in base["weights"].items():  # ... and nothing else did
        if k not in names:
            assert torch.equal(v, bias["weights"][k]), k
    assert any(not torch.equal(base["weights"][k], full["weights"][k])
               for k in base["weights"] if k not in names)
    for k, v in base["normalization"].items():  # the pre-trained normalisation is kept
        assert torch.equal(v, bias["normalization"][k]), k
    prov = bias["provenance"]
    assert prov["init_from"]["sha256"] == base["sha256"]
    assert prov["trainable"]["mode"] == "bias" and 0 < prov["trainable"]["parameters"] < \
        prov["trainable"]["of"] / 2
    assert full["provenance"]["trainable"]["parameters"] == full["provenance"]["trainable"]["of"]
    with pytest.raises(ValueError, match="trainable must be one of"):
        finetune(tmp_path / "base" / "model.pt", other, tmp_path / "x", trainable="lora")


def test_cli_finetune_runs_and_refuses_bad_input(tmp_path):
    from pcshower.io import write_parquet

    train({"model": TINY_MODEL, "train": {"steps": 3, "batch_showers": 8, "flow_batch": 16,
                                          "checkpoint_every": 100, "warmup": 1}},
          toy_showers(30), tmp_path / "base", progress=False)
    write_parquet(tmp_path / "new.parquet", toy_showers(20, seed=3))

    def run(*args):
        return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)

    r = run("finetune", str(tmp_path / "base" / "model.pt"), "--data", str(tmp_path / "new.parquet"),
             "--out", str(tmp_path / "ft"), "--steps", "2", "--trainable", "bias", "--parts",
             "points", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "fine-tuned" in r.stdout and (tmp_path / "ft" / "model.pt").is_file()
    ft = read_checkpoint(tmp_path / "ft" / "model.pt")
    assert ft["provenance"]["trainable"]["parts"] == ["points"]
    base = read_checkpoint(tmp_path / "base" / "model.pt")
    for k, v in base["weights"].items():
        if k.startswith("flow."):  # not among the parts: unchanged
            assert torch.equal(v, ft["weights"][k]), k
    bad = run("finetune", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "new.parquet"),
               "--out", str(tmp_path / "ft2"))
    assert bad.returncode != 0 and "is not a file" in bad.stderr
    bad = run("finetune", str(tmp_path / "base" / "model.pt"), "--data",
               str(tmp_path / "new.parquet"), "--out", str(tmp_path / "ft3"), "--parts", "decoder")
    assert bad.returncode != 0 and "--parts" in bad.stderr
