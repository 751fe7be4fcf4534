"""The benchmark harness: every stage is timed, totals add up, the budget skips what it must."""

import json

import pytest
import torch

from pcshower.bench import markdown_table, plot_scaling, run_benchmark, time_call
from pcshower.cli import main


@pytest.fixture(scope="module")
def tiny_model():
    from pcshower.models.model import ShowerModel
    from pcshower.simulate import simulate

    torch.manual_seed(0)
    model = ShowerModel({"slices": {"num": 10, "z_max_x0": 30.0},
                         "flow": {"transforms": 1, "hidden": [16, 16], "bins": 4},
                         "epic": {"point_dim": 8, "global_dim": 4, "hidden": 16, "layers": 1},
                         "max_points": 300, "split": {"factor": 2, "box": [0.25, 0.25, 1.0]}})
    model.fit_normalization(simulate(40, torch.linspace(10, 90, 40), torch.linspace(0.5, 1.5708, 40),
                                     stack="ild", frame="physics", seed=1, grid="coarse"))
    return model.eval()


def test_time_call_is_a_median():
    calls = []
    seconds = time_call(lambda: calls.append(1), torch.device("cpu"), repeats=5, warmup=2)
    assert len(calls) == 7 and 0 <= seconds < 0.01


def test_sweep_times_every_stage(tiny_model, tmp_path):
    result = run_benchmark(model=tiny_model, geometry="ild", device="cpu", threads=(1,),
                           steps=(1, 2), batch_sizes=(1, 4), energies=(20.0,), repeats=1,
                           reference_n=4, progress=False)
    assert len(result["runs"]) == 4 and not result["skipped"]
    for row in result["runs"]:
        stages = row["shape_ms"] + row["points_ms"] + row["calibration_ms"] + row["projection_ms"]
        assert row["shape_ms"] > 0 and row["projection_ms"] > 0
        assert stages == pytest.approx(row["total_ms"], rel=1e-6)
        assert row["end_to_end_ms"] > 0
        assert row["points_per_shower"] > 0 and row["threads"] == 1
        # the tiny model is EDM + Heun: 2 N - 1 network calls for N steps
        assert row["objective"] == "edm" and row["network_calls"] == 2 * row["steps"] - 1
        assert round(row["points_per_shower"] * row["batch"]) % 2 == 0  # the model splits x2
    assert [r["energy_gev"] for r in result["reference"]] == [20.0]
    assert result["reference"][0]["ms_per_shower"] > 0
    table = markdown_table(result)
    runs_table, rest = table.split("The project's engines")
    reference_table, ratio_table = rest.split("generate() against each engine")
    assert runs_table.count("\n| 1 | 20 |") == 4
    assert reference_table.count("\n| parametrised | 1 | 20 |") == 1
    assert ratio_table.count("\n| parametrised | 1 | 20 |") == 4  # one ratio per configuration
    assert "| 1 | 20 | 2 | 3 | 4 |" in runs_table  # steps, network calls, batch
    png = plot_scaling(result, tmp_path / "scaling.png")
    assert png.stat().st_size > 10_000


def test_budget_skips_large_batches(tiny_model):
    result = run_benchmark(model=tiny_model, geometry=None, device="cpu", threads=(1,), steps=(2,),
                           batch_sizes=(1, 100000), energies=(20.0,), repeats=1, budget_s=1e-3,
                           reference_n=0, progress=False)
    assert [r["batch"] for r in result["runs"]] == [1]
    assert result["skipped"][0]["batch"] == 100000
    assert "Skipped" in markdown_table(result)


def test_cli_writes_json_and_table(tiny_model, tmp_path, monkeypatch):
    from pcshower.models.checkpoint import model_payload, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny.pt", model_payload(tiny_model))
    code = main(["bench", "--model", str(ckpt), "--out", str(tmp_path / "out"), "--threads", "1",
                 "--steps", "1", "--batch-sizes", "2", "--energies", "30", "--repeats", "1",
                 "--reference-n", "0"])
    assert code == 0
    data = json.loads((tmp_path / "out" / "bench_cpu_float32.json").read_text())
    assert data["runs"][0]["batch"] == 2
    assert (tmp_path / "out" / "bench_cpu_float32.md").read_text().startswith("Device:")


def test_engines_are_timed_in_the_same_run_and_given_as_ratios(tiny_model):
    result = run_benchmark(model=tiny_model, geometry="ild", device="cpu", threads=(1,),
                           steps=(1,), batch_sizes=(2,), energies=(20.0,), repeats=1,
                           reference_n=4, progress=False, against=("parametrised",))
    (run,), (ref,) = result["runs"], result["reference"]
    (ratio,) = result["ratios"]
    assert ref["engine"] == "parametrised" and ratio["engine"] == "parametrised"
    assert ratio["speed_up"] == pytest.approx(ref["ms_per_shower"] / run["end_to_end_ms"])
    assert "ratio" in markdown_table(result) and f"×{ratio['speed_up']:.3g}" in markdown_table(result)
    with pytest.raises(ValueError, match="unknown engine 'geant5'"):
        run_benchmark(model=tiny_model, against=("geant5",), progress=False)
