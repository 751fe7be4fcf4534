"""Benchmark of the Geant4 engine: seconds per shower per core at 10/50/90 GeV and the multi-process speed-up.

Usage: ``python benchmarks/bench_geant4.py [--n10 20 --n50 8 --n90 5 --workers 2 --json out.json]``

Photons at normal incidence into the ILD Si-W stack (``geometries/ild.yaml``), default 0.7 mm
cut, recording as in production (Python sensitive detector on Si, C++ scorers elsewhere). One
core: one process, one thread, after a warm-up shower (physics tables are built lazily). Speed-up:
``--workers`` spawned processes, each with its own run manager and seed, each simulating
``--n50`` showers at 50 GeV; the speed-up is (workers x n50 x t_1core) / wall time of the pool,
with and without the per-process start-up (import + geometry + tables).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time

import numpy as np


def ild_stack():
    try:
        from pcshower.geometry import load_geometry

        return load_geometry("ild").stack
    except Exception:  # noqa: BLE001  (the geometry package may be absent in a minimal install)
        from pcshower.physics.stack import Slab, Stack

        return Stack(tuple([Slab("W", 2.1), Slab("Si", 0.5, True)] * 20
                           + [Slab("W", 4.2), Slab("Si", 0.5, True)] * 10), "ild")


def _worker(args):
    energy, n, seed = args
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from pcshower.simulate.geant4 import run_geant4

    stack = ild_stack()
    run_geant4([energy], 0.0, 0.0, 22, stack, seed=10_000 + seed)  # start-up + warm-up shower
    t1, c1 = time.perf_counter(), time.process_time()
    rec = run_geant4(np.full(n, energy), 0.0, 0.0, 22, stack, seed=seed)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"startup_s": t1 - t0, "sim_s": t2 - t1, "cpu_s": c2 - c1, "steps": rec.active_steps.tolist(),
            "vis_frac": (rec.active_mev / (energy * 1000)).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n10", type=int, default=20)
    ap.add_argument("--n50", type=int, default=8)
    ap.add_argument("--n90", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from pcshower.simulate.geant4 import run_geant4

    stack = ild_stack()
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_start": os.getloadavg(), "stack": stack.name, "particle": "photon"}
    t0 = time.perf_counter()
    run_geant4([10.0], 0.0, 0.0, 22, stack, seed=999)
    result["startup_plus_first_10gev_shower_s"] = time.perf_counter() - t0
    per_core = {}
    for energy, n in ((10.0, args.n10), (50.0, args.n50), (90.0, args.n90)):
        t, c = time.perf_counter(), time.process_time()
        rec = run_geant4(np.full(n, energy), 0.0, 0.0, 22, stack, seed=int(energy))
        dt = (time.perf_counter() - t) / n
        cpu = (time.process_time() - c) / n
        vis = rec.active_mev / (energy * 1000)
        per_core[f"{energy:g}"] = {"n": n, "s_per_shower": dt, "cpu_s_per_shower": cpu, "active_steps_mean": float(rec.active_steps.mean()),
                                   "vis_frac_mean": float(vis.mean()), "vis_frac_std": float(vis.std(ddof=1))}
        print(f"{energy:5.0f} GeV: {dt:.3f} s/shower/core wall, {cpu:.3f} s CPU ({n} showers, {rec.active_steps.mean():.0f} "
              f"Si steps, Evis/E {vis.mean():.4f})", flush=True)
    result["per_core"] = per_core

    w = args.workers
    ctx = mp.get_context("spawn")  # never fork a process that holds a Geant4 run manager
    t = time.perf_counter()
    with ctx.Pool(w) as pool:
        outs = pool.map(_worker, [(50.0, args.n50, 100 + i) for i in range(w)])
    wall = time.perf_counter() - t
    sim_wall = max(o["sim_s"] for o in outs)
    t1 = per_core["50"]["s_per_shower"]
    total = w * args.n50
    result["parallel"] = {
        "workers": w, "showers": total, "wall_s": wall, "max_worker_sim_s": sim_wall,
        "startup_s": [o["startup_s"] for o in outs],
        "cpu_s_per_shower_in_workers": sum(o["cpu_s"] for o in outs) / total,
        "speedup_simulation_only": total * t1 / sim_wall,
        "speedup_including_startup": total * t1 / wall,
        "throughput_showers_per_s": total / sim_wall,
    }
    result["load_avg_end"] = os.getloadavg()
    print(f"{w} processes x {args.n50} showers at 50 GeV: wall {wall:.1f} s (simulation {sim_wall:.1f} s),"
          f" speed-up {result['parallel']['speedup_simulation_only']:.2f} (simulation only), "
          f"{result['parallel']['speedup_including_startup']:.2f} (with start-up); load {result['load_avg_end']}",
          flush=True)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
