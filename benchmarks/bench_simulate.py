"""Benchmark of the parametrised simulator: showers per second per core and points per shower.

Usage: ``python benchmarks/bench_simulate.py [--showers 200] [--json out.json]``

One thread (``torch.set_num_threads(1)``), photons at normal incidence in the ILD-like Si-W stack
(20 x 2.1 mm + 10 x 4.2 mm W, 0.5 mm Si). Throughput is showers per CPU second of this process
(``time.process_time``), which is the per-core rate even on a shared machine; wall-clock rates
are printed beside it. Points per shower are given unreduced and for each reduction preset.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pcshower.physics import Stack
from pcshower.simulate import GRID_PRESETS, reduce_points, simulate_parametrised


def ild_stack() -> Stack:
    return (Stack.repeated([("W", 2.1, False), ("Si", 0.5, True)], 20, name="thin")
            + Stack.repeated([("W", 4.2, False), ("Si", 0.5, True)], 10, name="thick"))


def timed(fn, repeats: int):
    """Best (CPU seconds, wall seconds) of ``repeats`` calls, and the last result."""
    best_cpu = best_wall = float("inf")
    out = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--showers", type=int, default=200, help="showers per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stack = ild_stack()
    simulate_parametrised([10.0] * 5, 0.0, 0.0, "photon", stack, 0)  # warm-up
    rows = []
    for energy in (10.0, 50.0, 100.0):
        e = np.full(args.showers, energy)
        for frame in ("physics", "detector"):
            cpu, wall, raw = timed(lambda: simulate_parametrised(e, 0.0, 0.0, "photon", stack, 1,
                                                                 frame=frame), args.repeats)
            row = {"energy_gev": energy, "frame": frame, "showers": args.showers,
                   "sim_showers_per_cpu_s": args.showers / cpu,
                   "sim_showers_per_wall_s": args.showers / wall,
                   "points_unreduced": float(raw.num_points.double().mean())}
            for preset in GRID_PRESETS[frame]:
                rcpu, _, red = timed(lambda: reduce_points(raw, preset), 1)
                row[f"points_{preset}"] = float(red.num_points.double().mean())
                row[f"with_{preset}_showers_per_cpu_s"] = args.showers / (cpu + rcpu)
            rows.append(row)
            print(json.dumps(row))
    print()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread, {args.showers} photons per point, best of {args.repeats}")
    print("| E [GeV] | frame | showers/s/core (sim) | with default reduction | points unreduced "
          "| fine | medium | coarse |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        default = "medium" if r["frame"] == "physics" else "fine"
        print(f"| {r['energy_gev']:.0f} | {r['frame']} | {r['sim_showers_per_cpu_s']:.0f} | "
              f"{r[f'with_{default}_showers_per_cpu_s']:.0f} | {r['points_unreduced']:.0f} | "
              f"{r['points_fine']:.0f} | {r['points_medium']:.0f} | {r['points_coarse']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
