"""Timing of `pcshower.generate`: milliseconds per shower versus sampler steps and batch size.

Run ``python -m pcshower.models.benchmark --steps 1,8,25 --batch-sizes 1,16,256 --json OUT``;
by default on one CPU thread (``--threads 1``), the shipped model, physics-frame output.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

__all__ = ["benchmark_generate", "main"]


def benchmark_generate(steps=(1, 8, 25), batch_sizes=(1, 16, 256), *, model=None, geometry=None,
                       energy: float = 50.0, angle: float = 90.0, device="cpu", repeat: int = 3,
                       min_showers: int = 16, max_seconds: float = 120.0) -> list[dict]:
    """Time ``generate`` for each (steps, batch size): one warm-up call, then ``repeat`` timed
    calls of at least ``min_showers`` showers each (batches of the given size); the best time
    per shower is reported, as well as the median. A combination whose warm-up alone exceeds
    ``max_seconds`` is timed once only."""
    from pcshower.models.generate import generate, resolve_model

    net = resolve_model(model, device)
    rows = []
    for n_steps in steps:
        for size in batch_sizes:
            n = max(size, min_showers)
            kw = dict(geometry=geometry, n=n, steps=n_steps, model=net, device=device,
                      batch_size=size, seed=0)
            t0 = time.perf_counter()
            s = generate(energy, angle, **kw)
            warm = time.perf_counter() - t0
            times = [warm]
            if warm < max_seconds:
                times = []
                for r in range(repeat):
                    t0 = time.perf_counter()
                    s = generate(energy, angle, **{**kw, "seed": r + 1})
                    times.append(time.perf_counter() - t0)
            per = sorted(t / n * 1e3 for t in times)
            rows.append({"steps": n_steps, "network_calls": net.network_calls(n_steps),
                         "batch_size": size, "showers": n,
                         "ms_per_shower_best": round(per[0], 3),
                         "ms_per_shower_median": round(per[len(per) // 2], 3),
                         "points_per_shower": round(s.total_points / len(s), 1),
                         "timed_calls": len(times)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", default="1,8,25")
    p.add_argument("--batch-sizes", default="1,16,256")
    p.add_argument("--model", default=None)
    p.add_argument("--geometry", default="none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark_generate([int(v) for v in args.steps.split(",")],
                              [int(v) for v in args.batch_sizes.split(",")], model=args.model,
                              geometry=None if args.geometry == "none" else args.geometry,
                              device=args.device, repeat=args.repeat, max_seconds=args.max_seconds)
    info = {"device": args.device, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "geometry": args.geometry, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
