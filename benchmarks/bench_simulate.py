"""Benchmark of the parametrised simulator: showers per second per core and points per shower.

Usage: ``python benchmarks/bench_simulate.py [--showers 200] [--json out.json] [--plots docs/img]``

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
    parser.add_argument("--plots", default=None,
                        help="also draw the validation plots (simulate_*.png) into this folder")
    parser.add_argument("--skip-timing", action="store_true", help="only the plots")
    args = parser.parse_args()
    if args.plots:
        validation_plots(args.plots)
    if args.skip_timing:
        return
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


def validation_plots(folder: str) -> None:
    """Mean longitudinal profiles against the GFlash mean, radial containment and the ILD-like
    resolution curve (numbers printed as they are measured)."""
    import math
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcshower.physics.sampling import sampling_layers
    from pcshower.simulate import gflash

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stack = ild_stack()
    medium = stack.effective_medium()
    edges = torch.arange(0.0, 41.0, 0.5, dtype=torch.float64)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for energy, color in ((10.0, "C0"), (50.0, "C1"), (100.0, "C2")):
        s = simulate_parametrised(np.full(2000, energy), 0.0, 0.0, "photon", stack, 1,
                                  spot_scale=0.25)
        hist = torch.histogram(s.z.double(), bins=edges, weight=s.e.double()).hist / len(s)
        ref = gflash.mean_profile(edges, energy, medium.Z, medium.ec_mev, photon=True)
        centers = 0.5 * (edges[1:] + edges[:-1])
        ax.step(centers, hist / 0.5, where="mid", color=color, label=f"{energy:.0f} GeV, 2k showers")
        ax.plot(centers, ref / 0.5, "--", color=color, lw=1)
        r = torch.hypot(s.x, s.y).double()
        radii = torch.logspace(-2, 1, 60, dtype=torch.float64)
        frac = torch.stack([(s.e.double() * (r < x)).sum() for x in radii]) / len(s)
        ax2.semilogx(radii, frac, color=color, label=f"{energy:.0f} GeV")
        print(f"photon {energy:.0f} GeV: containment 1 R_M {float((s.e * (r < 1)).sum()) / len(s):.4f}"
              f", 3.5 R_M {float((s.e * (r < 3.5)).sum()) / len(s):.4f}")
    ax.set_xlabel("depth t [X0]")
    ax.set_ylabel("(1/E) dE/dt")
    ax.set_title("ILD-like Si-W, photons: simulated (steps) vs GFlash mean (dashed)")
    ax.legend()
    for y in (0.9, 0.99):
        ax2.axhline(y, color="grey", lw=0.5)
    for x in (1.0, 3.5):
        ax2.axvline(x, color="grey", lw=0.5)
    ax2.set_xlabel("radius r [R_M]")
    ax2.set_ylabel("energy fraction within r")
    ax2.set_title("lateral containment")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "simulate_profiles.png", dpi=110)
    plt.close(fig)

    layers = sampling_layers(stack)
    centers = torch.as_tensor(layers.active_center_mm)
    sf = torch.as_tensor(layers.sampling_fraction)
    energies = np.array([5.0, 10.0, 20.0, 50.0, 100.0, 200.0])
    rel, resp = [], []
    for i, energy in enumerate(energies):
        d = simulate_parametrised(np.full(2000, energy), 0.0, 0.0, "electron", stack, 100 + i,
                                  frame="detector", spot_scale=0.05)
        layer = torch.bucketize(d.z.double(), centers + 1e-3)
        rec = torch.zeros(len(d), dtype=torch.float64).index_add_(0, d.batch,
                                                                  d.e.double() / sf[layer])
        resp.append(rec.mean().item() / 1000 / energy)
        rel.append((rec.std() / rec.mean()).item())
    rel, resp = np.array(rel), np.array(resp)
    (a2, b2), *_ = np.linalg.lstsq(np.stack([1 / energies, np.ones_like(energies)], 1), rel ** 2,
                                   rcond=None)
    a, b = math.sqrt(max(a2, 0)), math.sqrt(max(b2, 0))
    print("electrons, ILD-like, layer-calibrated: response", np.round(resp, 4).tolist(),
          "sigma/E", np.round(rel, 4).tolist(), f"fit {100 * a:.1f}%/sqrt(E) (+) {100 * b:.1f}%")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(energies, rel, "o", label="simulated (2000 e- each)")
    grid = np.geomspace(4, 250, 100)
    ax.plot(grid, np.sqrt(a2 / grid + b2), "-", label=f"{100 * a:.1f}%/sqrt(E) (+) {100 * b:.1f}%")
    ax.set_xscale("log")
    ax.set_xlabel("E [GeV]")
    ax.set_ylabel("sigma/E of the layer-calibrated visible energy")
    ax.set_title("ILD-like Si-W stack")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "simulate_resolution.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
