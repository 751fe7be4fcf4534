"""ShowerFlow's fixed cost: one sample at batch 1 (and 64) on one CPU thread, the Python path
against the traced graph that ``ShowerFlow.sample`` switches to after ``TRACE_AFTER`` calls
(results in docs/benchmarks.md, raw JSON in docs/bench/flow_call.json).

Usage::

    taskset -c 1 python benchmarks/flow_call.py --json docs/bench/flow_call.json

Both paths run interleaved, ``--rounds`` rounds of ``--calls`` calls each, so that a noisy
period hits both alike; the medians and ranges of the rounds' mean call times are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pcshower.bench import report_json
from pcshower.models import showerflow
from pcshower.models.generate import load_default_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net = load_default_model()
    rows = []
    for batch in (1, 64):
        cond = net.condition(torch.full((batch,), 50.0, dtype=torch.float64),
                             torch.full((batch,), 1.2, dtype=torch.float64),
                             torch.zeros(batch, dtype=torch.float64))
        gen = torch.Generator().manual_seed(0)
        times = {"python": [], "traced": []}
        with torch.no_grad():
            for _ in range(showerflow.TRACE_AFTER + 5):  # trace it, and its first runs
                net.flow.sample(cond, gen)
            for _ in range(args.rounds):
                for path in ("python", "traced"):
                    saved = showerflow.TRACE_AFTER
                    if path == "python":  # a threshold never reached: the Python path
                        showerflow._TRACED.pop(net.flow, None)
                        showerflow.TRACE_AFTER = 10 ** 9
                    try:
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            net.flow.sample(cond, gen)
                        times[path].append(1e3 * (time.perf_counter() - t0) / args.calls)
                    finally:
                        showerflow.TRACE_AFTER = saved
                    if path == "python":  # retrace for the traced round (untimed)
                        for _ in range(saved + 5):
                            net.flow.sample(cond, gen)
        for path, ms in times.items():
            rows.append({"batch": batch, "path": path, "median_ms": statistics.median(ms),
                         "min_ms": min(ms), "max_ms": max(ms)})
    result = {"date": time.strftime("%Y-%m-%d"), "torch_version": torch.__version__,
              "threads": 1, "rounds": args.rounds, "calls": args.calls, "rows": rows}
    report_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
