"""An exported pipeline (``pcshower export``) at batch 1 on one CPU thread, against
``pcshower.generate`` at batch 1 and the project's own engines (parametrised and Geant4), all
in one run on the same thread (results in docs/integration.md, raw JSON in
docs/bench/export.json).

Usage::

    taskset -c 1 python benchmarks/export_speed.py --json docs/bench/export.json

The DDML file (ILD, shipped model, its 16 Heun steps) is loaded in this process with
``torch.jit.load`` and called as DDML calls it: three ``[1, 1]`` inputs, one shower per call.
TorchScript's profiling executor optimises a graph on its first calls, so the first call and
the steady state are reported apart (the steady state is the median of ``--repeats`` calls
after ``--warmup`` calls). ``pcshower.generate`` runs at ``batch_size=1`` with the same model,
geometry and steps. The engines simulate the same 50 GeV photon at normal incidence.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import pcshower
from pcshower.bench import report_json, time_reference_simulator
from pcshower.models.export import export_model


def _median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--energy", type=float, default=50.0, help="GeV (default 50)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    ap.add_argument("--geant4-n", type=int, default=5, help="Geant4 showers per timing (default 5)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", DeprecationWarning)
    e = args.energy
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ild_ddml.pt"
        t0 = time.perf_counter()
        meta = export_model(None, path, layout="ddml-caloclouds", geometry="ild")
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        module = torch.jit.load(str(path))
        load_s = time.perf_counter() - t0
    inputs = (torch.tensor([[e]]), torch.tensor([[0.0]]), torch.tensor([[0.0]]))
    with torch.inference_mode():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        module(*inputs)
        first_ms = 1e3 * (time.perf_counter() - t0)
        for i in range(args.warmup):
            torch.manual_seed(1 + i)
            module(*inputs)

        def exported(i):
            torch.manual_seed(100 + i)
            module(*inputs)

        exported_ms = _median_ms(exported, args.repeats)
    pcshower.generate(e, 90.0, "ild", seed=1, batch_size=1)  # model load, first-call costs
    generate_ms = _median_ms(lambda i: pcshower.generate(e, 90.0, "ild", seed=100 + i,
                                                         batch_size=1), args.repeats)
    theta = torch.pi / 2
    engines = (time_reference_simulator([e], theta, 20, engine="parametrised")
               + time_reference_simulator([e], theta, args.geant4_n, engine="geant4", repeats=1))
    result = {"date": time.strftime("%Y-%m-%d"), "pcshower_version": pcshower.__version__,
              "torch_version": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "energy_gev": e, "geometry": "ild",
              "layout": meta["layout"], "steps": meta["steps"], "network_calls": meta["network_calls"],
              "export_s": export_s, "load_s": load_s, "exported_first_call_ms": first_ms,
              "exported_ms_per_shower": exported_ms, "generate_ms_per_shower": generate_ms,
              "engines": engines}
    for row in engines:
        row["over_exported"] = row["ms_per_shower"] / exported_ms
        row["over_generate"] = row["ms_per_shower"] / generate_ms
    report_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
