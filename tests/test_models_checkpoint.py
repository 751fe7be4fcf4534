"""Checkpoints: round trip, and clear rejection of tampered, corrupt, foreign or too-new files."""

import pickle

import pytest
import torch

from pcshower.models.checkpoint import (CHECKPOINT_VERSION, CheckpointError, load_model,
                                        model_payload, read_checkpoint, save_checkpoint)
from pcshower.models.model import ShowerModel

TINY = {"slices": {"num": 4, "z_max_x0": 10.0}, "flow": {"transforms": 1, "hidden": [16]},
        "epic": {"point_dim": 8, "global_dim": 4, "hidden": 16, "layers": 1}, "steps": 2}


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = ShowerModel(TINY)
    model.norm.ranges.copy_(torch.tensor([10.0, 100.0, 0.5, 1.5]))
    path = save_checkpoint(tmp_path / "m.pt", model_payload(model, metrics={"val_loss": 0.5}))
    return model, path


def test_round_trip_gives_the_same_model(saved):
    model, path = saved
    loaded = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.checkpoint_info["metrics"] == {"val_loss": 0.5}
    assert loaded.energy_range == (10.0, 100.0)
    a = model.eval().sample([50.0], [1.0], [0.0], generator=torch.Generator().manual_seed(1))
    b = loaded.sample([50.0], [1.0], [0.0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.points, b.points)
    # plain containers only: loadable with weights_only=True
    body = torch.load(path, weights_only=True)
    assert body["format_version"] == CHECKPOINT_VERSION and body["frame"] == "physics"


def test_edited_weight_is_rejected(saved, tmp_path):
    _, path = saved
    body = torch.load(path, weights_only=True)
    key = next(iter(body["weights"]))
    body["weights"][key] = body["weights"][key] + 1e-3
    torch.save(body, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="integrity check"):
        load_model(tmp_path / "edited.pt")


def test_edited_metadata_is_rejected(saved, tmp_path):
    _, path = saved
    body = torch.load(path, weights_only=True)
    body["normalization"]["ranges"][1] = 1000.0  # claim a wider energy range
    torch.save(body, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="integrity check"):
        read_checkpoint(tmp_path / "edited.pt")


def test_corrupt_bytes_are_rejected(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "corrupt.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "corrupt.pt")
    (tmp_path / "short.pt").write_bytes(bytes(data[:1000]))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_model(tmp_path / "short.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "pcshower-checkpoint", "x": Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_model(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out


def test_foreign_and_incompatible_files(saved, tmp_path):
    _, path = saved
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a pcshower checkpoint"):
        load_model(tmp_path / "foreign.pt")
    body = torch.load(path, weights_only=True)
    body["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(body, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"format version {CHECKPOINT_VERSION + 1}"):
        load_model(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
