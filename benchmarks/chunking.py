"""Chunked network passes on one CPU thread: time, system time and page faults per shower of the
shipped model's point network, whole batch at once against chunks of points (results in
docs/benchmarks.md, raw JSON in docs/bench/chunking.json).

Usage::

    taskset -c 1 python benchmarks/chunking.py --json docs/bench/chunking.json --malloc default
    taskset -c 1 python benchmarks/chunking.py --json docs/bench/chunking.json --append

For each batch size (50 GeV ILD photons, shapes from the model's flow, one seed) and each
``chunk_points`` setting, one untimed call and then ``--repeats`` timed network calls (the
denoiser of one EDM step, the unit every sampler repeats); the minor page faults and the system
time come from ``getrusage`` around the timed calls. A last column times the whole
``ShowerModel.sample`` (``--steps`` steps, calibration and split) to show what the network's
share becomes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from pcshower.models.generate import load_default_model


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def measure(model, batch: int, chunk, repeats: int, steps: int) -> dict:
    model.chunk_points = chunk
    e = torch.full((batch,), 50.0, dtype=torch.float64)
    th = torch.full((batch,), torch.pi / 2, dtype=torch.float64)
    ph = torch.zeros(batch, dtype=torch.float64)
    cond = model.condition(e, th, ph)
    shape = model.sample_shape(cond, torch.Generator().manual_seed(1))
    counts = shape.num_points
    index = torch.repeat_interleave(torch.arange(batch), counts)
    with torch.inference_mode():
        net = model.network(cond, index, counts, model.shape_context(shape), chunk_points=chunk)
        x = torch.randn(int(counts.sum()), 4, generator=torch.Generator().manual_seed(2))
        t = torch.full((batch,), 0.5)
        net(x, t)  # untimed first call
        f0, s0 = _usage()
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(x, t)
        wall = (time.perf_counter() - t0) / repeats
        f1, s1 = _usage()
    t0 = time.perf_counter()
    model.sample(e, th, ph, steps=steps, generator=torch.Generator().manual_seed(3))
    sample = time.perf_counter() - t0
    return {"batch": batch, "chunk_points": chunk, "points": int(counts.sum()),
            "ms_per_shower_per_call": round(1e3 * wall / batch, 2),
            "sys_ms_per_shower_per_call": round(1e3 * (s1 - s0) / repeats / batch, 2),
            "minor_faults_per_shower_per_call": round((f1 - f0) / repeats / batch, 1),
            f"sample_{steps}steps_ms_per_shower": round(1e3 * sample / batch, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--chunks", nargs="+", default=["none", "4096", "16384", "65536"])
    p.add_argument("--append", action="store_true", help="add the rows to an existing --json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--malloc", choices=["default", "tuned"], default="tuned",
                   help="glibc as it is, or pcshower.allocator.tune_allocator() first")
    args = p.parse_args(argv)
    if args.malloc == "tuned":
        from pcshower.allocator import tune_allocator
        assert tune_allocator(), "glibc did not take the settings"
    torch.set_num_threads(1)
    model = load_default_model()
    rows = []
    for batch in args.batches:
        for chunk in args.chunks:
            c = None if chunk == "none" else int(chunk)
            rows.append({"malloc": args.malloc, **measure(model, batch, c, args.repeats,
                                                          args.steps)})
            print(rows[-1], flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": 1,
           "malloc": args.malloc,
           "torch": torch.__version__, "rows": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.append and path.is_file():
        old = json.loads(path.read_text())
        out = {**old, "runs": old.get("runs", []) + [out]}
    else:
        out = {"runs": [out]}
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
