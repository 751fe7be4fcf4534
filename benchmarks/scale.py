"""Scaling on one machine: productions on 1 and 2 workers (local processes and a Dask
LocalCluster) for both engines and for sharded generation, and the data-parallel training step
on 1 and 2 ranks (results in docs/scale.md, raw JSON in docs/bench/scale.json).

Usage::

    python benchmarks/scale.py --json docs/bench/scale.json            # everything (~10 min)
    python benchmarks/scale.py --only simulate --json /tmp/s.json       # one part
    python benchmarks/scale.py --only stream --data ~/pcshower-data/g4_ild_photons_train/physics

Each production is timed end to end as a user runs it (worker start-up and imports included:
that is what a farm job pays too) into a fresh directory, in one run, so the ratios compare like
with like. The training part runs ``pcshower train`` on the same toy physics-frame set once in
one process (all cores as threads) and once under ``torchrun`` with one single-threaded rank a
core, and reports the seconds per step from the runs' logs. ``stream`` trains a few streamed
steps on a real shard directory and reports the peak memory against reading the set whole.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PY = sys.executable
CLI = [PY, "-m", "pcshower.cli"]

SIM = ["--particle", "photon", "--energy", "10:100", "--theta", "90", "--stack", "ild",
       "--no-progress"]


def _run(cmd, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def bench_productions(tmp: Path, n_param: int, n_geant4: int, n_gen: int) -> list[dict]:
    rows = []
    cases = [("simulate", "parametrised", n_param, n_param // 8),
             ("simulate", "geant4", n_geant4, n_geant4 // 4),
             ("generate", "shipped model, 4 steps", n_gen, n_gen // 4)]
    for command, engine, n, shard in cases:
        for scheduler, workers in (("processes", 1), ("processes", 2), ("local", 2)):
            out = tmp / f"{command}-{engine.split()[0]}-{scheduler}-{workers}"
            if command == "simulate":
                cmd = [*CLI, "simulate", *SIM, "--engine", engine, "--n", str(n),
                       "--shard-size", str(shard), "--out", str(out)]
            else:
                cmd = [*CLI, "generate", "--energy", "10:100", "--theta", "90", "--steps", "4",
                       "--n", str(n), "--shard-size", str(shard), "--out", str(out),
                       "--no-progress"]
            cmd += ["--scheduler", scheduler, "--workers", str(workers)]
            wall = _run(cmd)
            rows.append({"command": command, "engine": engine, "scheduler": scheduler,
                         "workers": workers, "showers": n, "shards": n // shard,
                         "wall_s": round(wall, 2), "showers_per_s": round(n / wall, 2)})
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    for command, engine in {(r["command"], r["engine"]) for r in rows}:
        base = next(r for r in rows if (r["command"], r["engine"], r["workers"]) ==
                    (command, engine, 1))
        for r in rows:
            if (r["command"], r["engine"]) == (command, engine):
                r["speed_up"] = round(base["wall_s"] / r["wall_s"], 2)
    return rows


TRAIN_CONFIG = {
    "model": {"slices": {"num": 8, "z_max_x0": 20.0}, "flow": {"transforms": 2, "hidden": [64]},
              "epic": {"point_dim": 64, "global_dim": 16, "hidden": 128, "layers": 3}},
    "train": {"steps": 40, "batch_showers": 32, "flow_batch": 128, "checkpoint_every": 1000,
              "log_every": 10, "warmup": 5, "stream": True, "stream_buffer": 512}}


def bench_training(tmp: Path, cores: int) -> list[dict]:
    from pcshower.io import write_parquet
    from pcshower.simulate import simulate

    data = tmp / "train.parquet"
    import numpy as np

    energy = np.random.default_rng(3).uniform(10.0, 100.0, 2000)
    showers = simulate(2000, energy, np.pi / 2, stack="ild", seed=3, frame="physics")
    write_parquet(data, showers, row_group_size=100)
    rows = []
    for ranks in (1, cores):
        cfg = json.loads(json.dumps(TRAIN_CONFIG))
        cfg["train"]["threads"] = cores if ranks == 1 else 1
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        out = tmp / f"train-{ranks}"
        args = ["train", "--config", str(tmp / "cfg.yaml"), "--data", str(data), "--out",
                str(out), "--no-progress"]
        if ranks == 1:
            cmd = [*CLI, *args]
        else:
            cmd = [PY, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", "-m", "pcshower.cli", *args]
        wall = _run(cmd, env={"OMP_NUM_THREADS": str(cfg["train"]["threads"])})
        import csv
        with open(out / "log.csv") as f:
            log = list(csv.DictReader(f))
        # steps 10 -> 40: after the first steps' warm-up
        t10 = next(float(r["elapsed_s"]) for r in log if int(r["step"]) == 10)
        t40 = float(log[-1]["elapsed_s"])
        rows.append({"ranks": ranks, "threads_per_rank": cfg["train"]["threads"],
                     "global_batch_showers": cfg["train"]["batch_showers"],
                     "s_per_step": round((t40 - t10) / 30, 4), "wall_s": round(wall, 1),
                     "final_loss": float(log[-1]["loss"])})
        print(rows[-1], flush=True)
    return rows


def bench_stream(tmp: Path, data: Path) -> list[dict]:
    """Peak memory of a few training steps streamed vs in memory on a real shard directory."""
    from pcshower.io import read_metadata

    rows = []
    meta = read_metadata(data)
    for stream in (True, False):
        cfg = json.loads(json.dumps(TRAIN_CONFIG))
        cfg["train"].update(steps=5, stream=stream, threads=1)
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        out = tmp / f"stream-{stream}"
        # the peak from /proc (VmHWM, kB): getrusage's ru_maxrss survives exec on Linux, so a
        # child started by a large parent would report the parent's peak
        code = ("from pcshower.models.train import train; "
                f"train({str(tmp / 'cfg.yaml')!r}, {str(data)!r}, {str(out)!r}, progress=False); "
                "print([l.split()[1] for l in open('/proc/self/status') if "
                "l.startswith('VmHWM')][0])")
        t0 = time.perf_counter()
        res = subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append({"stream": stream, "showers": meta["num_showers"],
                     "files": meta["num_files"], "peak_rss_gb": round(
                         int(res.stdout.split()[-1]) / 2 ** 20, 2),
                     "wall_s": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--only", choices=["simulate", "train", "stream"], action="append")
    p.add_argument("--n-parametrised", type=int, default=4000)
    p.add_argument("--n-geant4", type=int, default=40)
    p.add_argument("--n-generate", type=int, default=64)
    p.add_argument("--data", type=Path, default=None,
                   help="a physics-frame shard directory for the stream part")
    args = p.parse_args(argv)
    parts = set(args.only or ["simulate", "train"] + (["stream"] if args.data else []))
    cores = os.cpu_count() or 1
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
              platform.machine(), "cores": cores, "python": platform.python_version()}
    path = Path(args.json)
    if path.is_file():
        result = {**json.loads(path.read_text()), **{k: result[k] for k in ("date", "cores")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = {"simulate": ("productions", lambda tmp: bench_productions(
                tmp, args.n_parametrised, args.n_geant4, args.n_generate)),
            "train": ("training", lambda tmp: bench_training(tmp, min(cores, 2))),
            "stream": ("stream", lambda tmp: bench_stream(tmp, args.data))}
    for part, (key, run) in runs.items():
        if part in parts:
            with tempfile.TemporaryDirectory() as tmp:
                result[key] = run(Path(tmp))
            path.write_text(json.dumps(result, indent=1))  # each part kept as it is done
    print(f"wrote {path}; peak RSS of this driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")


if __name__ == "__main__":
    main()
