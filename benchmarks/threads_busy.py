"""Seconds per shower of ``pcshower.generate`` at batch 1 with a given number of torch threads:
run it on a quiet and on a busy machine, with and without ``OMP_WAIT_POLICY=PASSIVE`` (results
in docs/benchmarks.md, "Threads on a machine that is busy").

Usage::

    python benchmarks/threads_busy.py 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/threads_busy.py 2
    python benchmarks/threads_busy.py 1
"""

from __future__ import annotations

import sys
import time

import torch

import pcshower


def main() -> int:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    pcshower.generate(50.0, 90.0, "ild", seed=1, batch_size=1)  # load and first-call costs
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        pcshower.generate(50.0, 90.0, "ild", seed=2 + i, batch_size=1)
        times.append(round(time.perf_counter() - t0, 2))
    load = open("/proc/loadavg").read().split()[:3] if sys.platform == "linux" else "?"
    print(f"{threads} threads: {times} s per shower; load average {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
