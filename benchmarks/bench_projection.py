"""Projection throughput (points per second) of geometry adapters on one CPU core, and on a GPU.

Usage: python benchmarks/bench_projection.py [--geometry ild] [--showers 200] [--points 5000]
The showers are synthetic physics-frame clouds with shower-like shapes (Gamma-distributed depth,
Gaussian core of 1 R_M), all with one direction (normal incidence on a barrel) or, with
``--spread``, each with its own; timing is the median of ``--repeat`` calls of
``Geometry.project`` after one warm-up call, in wall-clock seconds (``*_s``) and in CPU seconds
of this process (``*_cpu_s``, the time one core spends when other processes share the machine;
the same as wall time on an idle one).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from pcshower import Showers
from pcshower.geometry import load_geometry


def synthetic_showers(n: int, points: int, device, seed: int = 0, spread: bool = False) -> Showers:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # torch.distributions draws from the global generator
    total = n * points
    depth = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(0.5)).sample((total,))
    xy = torch.randn(total, 2, generator=g)
    e = torch.full((total,), 1.0 / points)
    pts = torch.cat([xy, depth[:, None], e[:, None]], dim=1)
    barrel = kind_of(ARGS.geometry) != "plane"
    theta = torch.full((n,), math.pi / 2 if barrel else 0.0)
    phi = torch.full((n,), 0.1)
    if spread:  # every shower its own direction (and, in a barrel, its own stave)
        phi = torch.rand(n, generator=g) * 2 * math.pi
        theta = theta + (torch.rand(n, generator=g) - 0.5) * (0.6 if barrel else 0.0) + (
            0.0 if barrel else torch.rand(n, generator=g) * 0.5)
    return Showers.from_counts(pts, [points] * n, energy=torch.full((n,), 50.0),
                               theta=theta, phi=phi).to(device)


def kind_of(name):
    return name if name in ("ild", "cld", "allegro") else "plane"


def time_projection(geometry, showers, repeat: int, fluctuate: bool, device):
    def run():
        gen = torch.Generator(device=device).manual_seed(1)
        geometry.project(showers, generator=gen, fluctuate=fluctuate)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _timed(run, repeat)


def time_sampling(geometry, showers, repeat: int, fluctuate: bool, device):
    from pcshower.physics.sampling import depth_x0_to_mm, to_active_layers

    pts = showers.points.double()
    batch = torch.repeat_interleave(torch.arange(len(showers), device=device), showers.num_points)
    energy = pts[:, 3] * 50e3

    def run():
        gen = torch.Generator(device=device).manual_seed(1)
        z = depth_x0_to_mm(pts[:, 2].contiguous(), geometry.stack)
        to_active_layers(z, energy, batch, geometry.stack, fluctuate=fluctuate, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _timed(run, repeat)


def _timed(run, repeat: int):
    run()
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="ild")
    p.add_argument("--showers", type=int, default=200)
    p.add_argument("--points", type=int, default=5000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spread", action="store_true",
                   help="a different direction per shower (default: one shared direction)")
    p.add_argument("--malloc", choices=["default", "tuned"], default="tuned",
                   help="tuned (default): the allocator settings pcshower generate uses "
                        "(pcshower.allocator.tune_allocator); default: glibc's own")
    p.add_argument("--sampling-only", action="store_true",
                   help="time only the shared sampling model (depth_x0_to_mm + to_active_layers) "
                        "on the showers' depths at normal incidence")
    ARGS = p.parse_args()
    if ARGS.malloc == "tuned":
        from pcshower.allocator import tune_allocator

        tune_allocator()
    torch.set_num_threads(ARGS.threads)
    device = torch.device(ARGS.device)
    geo = load_geometry(ARGS.geometry)
    showers = synthetic_showers(ARGS.showers, ARGS.points, device, spread=ARGS.spread)
    result = {"geometry": geo.name, "device": str(device), "threads": ARGS.threads,
              "directions": "one per shower" if ARGS.spread else "shared",
              "showers": ARGS.showers, "points_per_shower": ARGS.points, "malloc": ARGS.malloc}
    if ARGS.sampling_only:
        result["part"] = "sampling model only"
    for fluctuate in (False, True):
        if ARGS.sampling_only:
            t, cpu = time_sampling(geo, showers, ARGS.repeat, fluctuate, device)
        else:
            t, cpu = time_projection(geo, showers, ARGS.repeat, fluctuate, device)
        key = "fluctuations" if fluctuate else "mean_response"
        result[f"{key}_s"] = round(t, 4)
        result[f"{key}_points_per_s"] = float(f"{showers.total_points / t:.3g}")
        if device.type == "cpu":
            result[f"{key}_cpu_s"] = round(cpu, 4)
            result[f"{key}_points_per_cpu_s"] = float(f"{showers.total_points / cpu:.3g}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
