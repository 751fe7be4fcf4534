"""Where the shards of a production run: local worker processes or a Dask cluster.

A production (``pcshower simulate``, ``pcshower generate --shard-size``) is a list of shard jobs
whose results depend only on (seed, shard), so any executor that runs each job once — in any
order, on any machine, again after a worker died — makes the same data set. This module maps a
picklable function over the jobs and yields the results as they complete:

- ``"processes"`` (the default): a pool of fresh (spawned) local Python processes;
- ``"local"``: a ``dask.distributed.LocalCluster`` started for the job and closed after it;
- ``"tcp://HOST:PORT"`` (any Dask scheduler address): a running Dask cluster, e.g. one started
  on a farm with ``dask-jobqueue`` (docs/scale.md); a ``distributed.Client`` or a cluster object
  (``SLURMCluster``, ``HTCondorCluster``, ``LocalCluster``) is accepted from Python.

Dask reschedules the job of a worker that dies (the scheduler's ``allowed-failures``, 3 by
default); since every shard is written atomically under its final name only when complete, a
killed worker leaves nothing behind and the run's result is that of an undisturbed run.
Dask is an optional dependency (``pip install "pcshower[dask]"``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable, Iterator

__all__ = ["SCHEDULERS", "check_scheduler", "map_unordered"]

#: The scheduler names; anything else must be a Dask scheduler address (``tcp://...``).
SCHEDULERS = ("processes", "local")

_ADDRESS_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


def check_scheduler(scheduler) -> object:
    """``scheduler`` as given, after checking it names an executor; a string that is neither a
    name of :data:`SCHEDULERS` nor a Dask address is refused with what to write instead."""
    if scheduler is None:
        return "processes"
    if isinstance(scheduler, str):
        if scheduler in SCHEDULERS or scheduler.startswith(_ADDRESS_SCHEMES):
            if scheduler != "processes":
                _import_distributed()
            return scheduler
        raise ValueError(f"--scheduler {scheduler!r}: use 'processes' (local worker processes, "
                         "the default), 'local' (a Dask LocalCluster) or the address of a running "
                         "Dask scheduler, e.g. tcp://10.0.0.1:8786")
    if hasattr(scheduler, "submit") or hasattr(scheduler, "scheduler_address"):
        return scheduler  # a distributed.Client or a Dask cluster object
    raise TypeError(f"scheduler must be a name, a Dask address, a Client or a cluster; got "
                    f"{type(scheduler).__name__}")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ValueError("a Dask scheduler needs dask.distributed: pip install \"pcshower[dask]\" "
                         "(or use --scheduler processes)") from None
    return distributed


@contextlib.contextmanager
def _dask_client(scheduler, workers: int | None, announce: bool):
    distributed = _import_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler  # the caller's client: left open
        return
    with contextlib.ExitStack() as stack:
        # the scheduler of a LocalCluster and the client live in this process: keep their
        # start-up and shut-down chatter (INFO lines, a closed-comm traceback) off the terminal
        quiet = logging.getLogger("distributed")
        stack.callback(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.CRITICAL)
        if scheduler == "local":
            # one thread per worker process: the engines and torch run single-threaded per
            # shard, and processes (not threads) keep them from sharing the GIL
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=max(1, workers or os.cpu_count() or 1), threads_per_worker=1,
                processes=True, dashboard_address=":0", silence_logs=logging.ERROR))
            client = stack.enter_context(distributed.Client(cluster))
        else:
            client = stack.enter_context(distributed.Client(scheduler))
        _check_single_threaded(client)
        if announce:
            link = client.dashboard_link if _has_bokeh() else None
            n = len(client.scheduler_info().get("workers", {}))
            print(f"pcshower: Dask scheduler {client.scheduler.address} with {n} workers"
                  + (f"; dashboard {link}" if link else ""), file=sys.stderr)
        yield client


def _check_single_threaded(client) -> None:
    """Refuse workers that run several tasks at once in one process: the engines (Geant4's run
    manager, the cached model, torch's thread setting) are per process, not per thread."""
    workers = client.scheduler_info().get("workers", {})
    crowded = sorted(a for a, w in workers.items() if int(w.get("nthreads", 1)) > 1)
    if crowded:
        raise ValueError(f"Dask workers {', '.join(crowded[:3])}{' ...' if len(crowded) > 3 else ''}"
                         " run several threads: pcshower runs one shard per process; start them "
                         "with 'dask worker ADDRESS --nthreads 1 --nworkers N' (dask-jobqueue: "
                         "processes=cores)")


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401  (Dask's dashboard needs it)
    except ImportError:
        return False
    return True


def map_unordered(fn: Callable, jobs: Iterable, *, scheduler="processes",
                  workers: int | None = None, announce: bool = True) -> Iterator:
    """Yield ``fn(job)`` for every job, in the order they complete.

    Args:
        fn: a module-level (picklable) function.
        jobs: its arguments, one per call (picklable).
        scheduler: see the module docstring.
        workers: processes for ``"processes"`` and ``"local"`` (default: the machine's cores,
            at most the number of jobs); ignored for a running cluster, which has its own.
        announce: print the Dask scheduler's address and dashboard link (stderr).
    """
    scheduler = check_scheduler(scheduler)
    jobs = list(jobs)
    if not jobs:
        return
    if scheduler == "processes":
        n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        if n == 1:  # in this process: the shard functions set torch's threads; restore them
            import torch

            threads = torch.get_num_threads()
            try:
                yield from map(fn, jobs)
            finally:
                torch.set_num_threads(threads)
            return
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread state
        with ctx.Pool(n) as pool:
            yield from pool.imap_unordered(fn, jobs)
        return
    distributed = _import_distributed()
    if scheduler == "local":
        workers = min(workers or os.cpu_count() or 1, len(jobs))
    with _dask_client(scheduler, workers, announce) as client:
        # pure=False: two equal jobs are still two shards; the futures are released as they
        # are consumed, so the scheduler does not hold every shard's result
        futures = client.map(fn, jobs, pure=False)
        try:
            for future in distributed.as_completed(futures):
                result = future.result()
                future.release()
                yield result
        finally:
            client.cancel(futures)
