"""Parquet round trip of a large shower set: write and read throughput into `Showers`, one core.

    python benchmarks/bench_io.py --showers 100000 --points 1000 --out docs/bench_io.json

Both layouts (``--layout list flat``, docs/formats.md) and each ``--compression`` are written,
read whole (best of ``--repeats``) and streamed in batches of 4096 showers (best of
``--repeats``); every read is checked bit for bit against the sample.

Points are drawn like a detector-frame shower (Gaussian core, exponential energies) so the
compression ratio is realistic rather than that of constant data.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pcshower import Showers, io


def make_sample(n_showers: int, mean_points: int, seed: int = 0) -> Showers:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean_points, n_showers).astype(np.int64)
    total = int(counts.sum())
    points = np.empty((total, 4), dtype=np.float32)
    points[:, :2] = rng.normal(0.0, 15.0, (total, 2))
    points[:, 2] = rng.gamma(3.0, 20.0, total)
    points[:, 3] = rng.exponential(0.5, total)
    return Showers.from_counts(torch.from_numpy(points), torch.from_numpy(counts),
                               energy=rng.uniform(10, 100, n_showers), frame="detector")


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def measure(sample: Showers, path: Path, layout: str, codec: str, repeats: int) -> dict:
    n_points = sample.total_points
    t_write, _ = timed(lambda: io.write_parquet(path, sample, compression=codec, layout=layout), 1)
    t_read, back = timed(lambda: io.read_parquet(path), repeats)
    assert torch.equal(back.points, sample.points) and torch.equal(back.ptr, sample.ptr)
    del back
    t_stream, _ = timed(lambda: sum(len(b) for b in io.iter_parquet(path, batch_size=4096)),
                        repeats)
    size = sum(p.stat().st_size for p in (path, io.points_path(path)) if p.exists())
    return {"layout": layout, "compression": codec, "file_mib": size / 2**20,
            "write_s": t_write, "read_s": t_read, "stream_s": t_stream,
            "read_mpoints_per_s": n_points / t_read / 1e6,
            "write_mpoints_per_s": n_points / t_write / 1e6,
            "stream_mpoints_per_s": n_points / t_stream / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--showers", type=int, default=100_000)
    parser.add_argument("--points", type=int, default=1000, help="mean points per shower")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", nargs="+", default=["zstd", "lz4", "none"])
    parser.add_argument("--layout", nargs="+", default=["list", "flat"], choices=io.LAYOUTS)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import pyarrow as pa
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    sample = make_sample(args.showers, args.points)
    n_points = sample.total_points
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layout:
            for codec in args.compression:
                rows.append(measure(sample, Path(tmp) / f"bench-{layout}-{codec}.parquet", layout,
                                    codec, args.repeats))
                print(json.dumps(rows[-1]))
    result = {"showers": args.showers, "points": n_points, "threads": 1,
              "cpu": platform.processor() or platform.machine(), "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
