"""Every objective x backbone trains through `train()`, round-trips through its checkpoint and
samples; a consistency model distils from an EDM teacher; mismatched objectives are refused."""

import pytest
import torch
import yaml

from pcshower.models.checkpoint import CheckpointError, load_model, read_checkpoint
from pcshower.models.model import ShowerModel
from pcshower.models.train import load_config, train
from tests.test_train import TINY_MODEL, toy_showers

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRANSFORMER = {"dim": 16, "heads": 2, "layers": 1, "inducing": 4, "mlp_ratio": 1.0}
FAST = {"steps": 12, "batch_showers": 4, "flow_batch": 16, "checkpoint_every": 6,
        "log_every": 3, "warmup": 2, "val_fraction": 0.1}

COMBOS = {
    "edm": {"objective": "edm", "sampler": "heun"},
    "flow_matching": {"objective": "flow_matching", "sampler": "euler"},
    "consistency_training": {"objective": "consistency", "sampler": "multistep",
                             "consistency": {"mode": "training", "bins": 8}},
}


@pytest.fixture(scope="module")
def data():
    return toy_showers(40)


def _model_cfg(objective, backbone):
    cfg = {**TINY_MODEL, **COMBOS[objective], "backbone": backbone}
    if backbone == "transformer":
        cfg["transformer"] = TINY_TRANSFORMER
    return cfg


@pytest.mark.parametrize("backbone", ["epic", "transformer"])
@pytest.mark.parametrize("objective", sorted(COMBOS))
def test_each_objective_and_backbone_trains_and_round_trips(tmp_path, data, objective, backbone):
    metrics = train({"model": _model_cfg(objective, backbone), "train": FAST}, data, tmp_path,
                    progress=False)
    assert metrics["steps"] == 12 and all(map(lambda v: v == v, [metrics["val_point_loss"]]))
    body = read_checkpoint(tmp_path / "model.pt")
    assert body["objective"] == COMBOS[objective]["objective"]
    assert body["provenance"]["objective"] == body["objective"]
    a, b = load_model(tmp_path / "model.pt"), load_model(tmp_path / "model.pt")
    assert a.objective.name == COMBOS[objective]["objective"]
    calls = []
    sa = a.sample([20.0, 60.0], [1.0, 1.2], [0.0, 0.0], steps=2,
                  generator=torch.Generator().manual_seed(3), on_call=lambda: calls.append(1))
    sb = b.sample([20.0, 60.0], [1.0, 1.2], [0.0, 0.0], steps=2,
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(sa.points, sb.points) and torch.isfinite(sa.points).all()
    assert len(calls) == a.network_calls(2) == {"edm": 3, "flow_matching": 2,
                                                "consistency_training": 2}[objective]
    other = "flow_matching" if objective == "edm" else "edm"
    with pytest.raises(CheckpointError, match=f"a {other!r} model is needed"):
        load_model(tmp_path / "model.pt", objective=other)


def test_consistency_distillation_from_an_edm_teacher(tmp_path, data):
    train({"model": _model_cfg("edm", "epic"), "train": FAST}, data, tmp_path / "teacher",
          progress=False)
    teacher = tmp_path / "teacher" / "model.pt"
    student_cfg = {**TINY_MODEL, "objective": "consistency", "sampler": "multistep",
                   "consistency": {"bins": 8, "target_decay": 0.9}}
    train({"model": student_cfg, "train": {**FAST, "teacher": str(teacher), "parts": ["points"]}},
          data, tmp_path / "cd", progress=False)
    body = read_checkpoint(tmp_path / "cd" / "model.pt")
    t_body = read_checkpoint(teacher)
    assert body["provenance"]["teacher"]["sha256"] == t_body["sha256"]
    # the student starts from the teacher: its normalisation and its flow are the teacher's
    for key in ("point_mean", "point_std", "cond_stats", "shape_mean"):
        assert torch.equal(body["normalization"][key], t_body["normalization"][key])
    assert all(torch.equal(v, t_body["weights"][k]) for k, v in body["weights"].items()
               if k.startswith("flow."))
    # the EMA target's weights are part of the training state, and resuming a finished run
    # reproduces its model
    state = read_checkpoint(tmp_path / "cd" / "last.pt")["training_state"]
    assert "target" in state
    train({"model": student_cfg, "train": {**FAST, "teacher": str(teacher), "parts": ["points"]}},
          data, tmp_path / "cd", resume=True, progress=False)
    again = read_checkpoint(tmp_path / "cd" / "model.pt")
    assert all(torch.equal(v, body["weights"][k]) for k, v in again["weights"].items())
    model = load_model(tmp_path / "cd" / "model.pt", objective="consistency")
    one = model.sample([50.0], [1.0], [0.0], steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(one.points).all() and model.network_calls(1) == 1


def test_distillation_refuses_a_missing_or_wrong_teacher(tmp_path, data):
    cd = {**TINY_MODEL, "objective": "consistency", "sampler": "multistep"}
    with pytest.raises(ValueError, match="needs an EDM teacher"):
        train({"model": cd, "train": FAST}, data, tmp_path / "a", progress=False)
    train({"model": _model_cfg("flow_matching", "epic"), "train": FAST}, data, tmp_path / "fm",
          progress=False)
    with pytest.raises(CheckpointError, match="is a 'flow_matching' model; a 'edm' model"):
        train({"model": cd, "train": {**FAST, "teacher": str(tmp_path / "fm" / "model.pt")}},
              data, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="does not distil"):
        train({"model": _model_cfg("edm", "epic"),
               "train": {**FAST, "teacher": str(tmp_path / "fm" / "model.pt")}},
              data, tmp_path / "c", progress=False)


def test_config_keys_objective_and_backbone(tmp_path):
    path = tmp_path / "fm.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "objective": "flow_matching",
                                              "backbone": "transformer", "sampler": "midpoint",
                                              "transformer": TINY_TRANSFORMER},
                                    "train": {"steps": 2}}))
    cfg = load_config(path)
    assert cfg["model"]["objective"] == "flow_matching"
    with pytest.raises(ValueError, match="does not fit objective 'consistency'.*multistep"):
        ShowerModel({**TINY_MODEL, "objective": "consistency"})
    with pytest.raises(ValueError, match="backbone must be 'epic' or 'transformer'"):
        ShowerModel({**TINY_MODEL, "backbone": "gnn"})
    with pytest.raises(ValueError, match="unknown objective"):
        ShowerModel({**TINY_MODEL, "objective": "gan"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"transformer": {"heads": 0}}, "train": {}}))
    with pytest.raises(ValueError, match=r"bad.yaml.*transformer.heads must be a whole number"):
        load_config(bad)


def test_combine_puts_a_new_point_network_beside_a_flow(tmp_path, data):
    from pcshower.models.checkpoint import combine_checkpoints

    train({"model": _model_cfg("edm", "epic"), "train": FAST}, data, tmp_path / "edm",
          progress=False)
    train({"model": _model_cfg("flow_matching", "transformer"), "train": FAST}, data,
          tmp_path / "fm", progress=False)
    combine_checkpoints(tmp_path / "fm" / "model.pt", tmp_path / "edm" / "model.pt",
                        tmp_path / "both.pt", tables="flow")
    body = read_checkpoint(tmp_path / "both.pt")
    edm = read_checkpoint(tmp_path / "edm" / "model.pt")
    fm = read_checkpoint(tmp_path / "fm" / "model.pt")
    assert body["objective"] == "flow_matching" and body["config"]["backbone"] == "transformer"
    assert all(torch.equal(v, edm["weights"][k]) for k, v in body["weights"].items()
               if k.startswith("flow."))
    assert all(torch.equal(v, fm["weights"][k]) for k, v in body["weights"].items()
               if k.startswith("points_net."))
    assert body["provenance"]["combined"]["tables_from"] == "flow"
    model = load_model(tmp_path / "both.pt", objective="flow_matching")
    assert torch.isfinite(model.sample([30.0], [1.0], [0.0], steps=2).points).all()
    with pytest.raises(ValueError, match="tables must be"):
        combine_checkpoints(tmp_path / "fm" / "model.pt", tmp_path / "edm" / "model.pt",
                            tmp_path / "x.pt", tables="both")


def test_model_card_and_the_approximate_tables_warning(tmp_path, data, capsys):
    import warnings

    from pcshower import generate
    from pcshower.cli import main
    from pcshower.io import write_parquet

    path = tmp_path / "g4.parquet"
    write_parquet(path, data, metadata={"generator": "geant4-approximate-lowenergy",
                                        "engine": "geant4", "geant4_tables": "approx-v2",
                                        "geant4_physics": "G4EmStandardPhysics_option1",
                                        "stack": "ild", "seed": 5})
    train({"model": _model_cfg("flow_matching", "epic"), "train": FAST}, path, tmp_path / "run",
          progress=False)
    model_path = tmp_path / "run" / "model.pt"
    assert main(["info", str(model_path)]) == 0
    card = capsys.readouterr().out
    for text in ("flow_matching", "network_calls_per_shower  4", "approx-v2",
                 "G4EmStandardPhysics_option1", "'showers': 40"):
        assert text in card
    with pytest.warns(UserWarning, match="approximate low-energy EM tables"):
        generate(50.0, 60.0, geometry=None, n=1, model=str(model_path), steps=1, progress=False,
                 allow_extrapolation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per model and process
        generate(50.0, 60.0, geometry=None, n=1, model=str(model_path), steps=1, progress=False,
                 allow_extrapolation=True)
