"""Sharded generation: ``pcshower generate --shard-size K --out DIR`` on local processes or Dask.

The same contract as :func:`pcshower.simulate.production.produce`: ``n`` showers are cut into
shards of ``shard_size``; shard ``i`` draws its conditions from ``SeedSequence([seed, i, 0])``
and generates with the seed drawn from ``SeedSequence([seed, i, 1])``, so a shard's showers
depend only on (seed, i) — never on the worker, the order or an interruption. Each shard is
written atomically as ``DIR/showers/shard-i.parquet`` (points) and, with a geometry,
``DIR/hits/shard-i.parquet`` (cell hits); a shard whose files are complete is skipped, so the
same command resumes. ``DIR/_run.json`` records the run, the model's SHA-256 included: another
model or other options into the same directory are refused. Every shard's conditions are
checked against the model (range, particle, angles) before the first file is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pcshower.parallel import check_scheduler, map_unordered
from pcshower.simulate.production import (_check_or_write_manifest, _shard_complete,
                                          _shard_range, seed_of_shard, shard_span)
from pcshower.units import parse_range, particle_code, resolve_device

__all__ = ["generate_production"]


def _shard_conditions(run: dict, i: int):
    """Energies [GeV] and angles [deg] of shard ``i``: uniform in the run's ranges."""
    a, b = shard_span(run["n"], run["shard_size"], i)
    rng = np.random.default_rng(np.random.SeedSequence([run["seed"], i, 0]))
    return tuple(rng.uniform(lo, hi, b - a) if hi > lo else np.full(b - a, lo)
                 for lo, hi in (run["energy_gev"], run["theta_deg"], run["phi_deg"]))


def _shard_seed(run: dict, i: int) -> int:
    return seed_of_shard(run["seed"], i)


def _paths(out: Path, run: dict, i: int) -> list[Path]:
    from pcshower.io import shard_name

    kinds = ("showers", "hits") if run["geometry"] is not None else ("showers",)
    return [out / kind / shard_name(i) for kind in kinds]


def generate_production(out_dir, *, n: int, energy, theta=None, phi=0.0, geometry="ild",
                        model=None, particle="photon", seed: int = 0, shard_size: int = 10_000,
                        steps: int | None = None, sampler: str | None = None,
                        batch_size: int | None = None, allow_extrapolation: bool = False,
                        scheduler="processes", workers: int | None = None, device="cpu",
                        progress: bool = True, shards=None) -> dict:
    """Generate ``n`` showers into sharded Parquet under ``out_dir`` (see the module docstring).

    Args:
        energy, theta, phi: a value or a ``(low, high)`` range (or ``"low:high"``), energies in
            GeV, angles in degrees, drawn uniformly per shower; ``theta=None``: the geometry's
            normal incidence.
        geometry: geometry name or YAML path; ``None`` writes physics-frame showers only.
        model: checkpoint path (default: the shipped model). Workers load it themselves.
        scheduler, workers: where the shards run (:func:`pcshower.parallel.map_unordered`).
        device: the torch device every worker generates on (recorded: showers depend on it).
        shards: ``"start:stop"`` to make only those shards (one farm job).
        Other arguments as for :func:`pcshower.generate`; ``batch_size`` is the showers per
        pass inside a shard (the memory bound of a worker).

    Returns:
        A summary: directory, shards, written now, found done, showers.
    """
    from pcshower.models.checkpoint import read_checkpoint
    from pcshower.models.generate import (_check_seed, _positive_int, default_model_path,
                                          generate_batches, normal_incidence_deg)

    n, shard_size = _positive_int("n", n), _positive_int("shard_size", shard_size)
    if workers is not None:
        _positive_int("workers", workers)
    _check_seed(seed)
    scheduler = check_scheduler(scheduler)
    model_path = Path(model).resolve() if model is not None else default_model_path()
    if model_path.is_dir() or not model_path.is_file():
        raise FileNotFoundError(f"model {model_path} is not a checkpoint file")
    if geometry is not None and theta is None:
        theta = normal_incidence_deg(geometry)
    elif theta is None:
        theta = 90.0
    run = {"command": "generate", "n": n, "shard_size": shard_size, "seed": int(seed),
           "energy_gev": list(parse_range(energy, "energy")),
           "theta_deg": list(parse_range(theta, "theta")),
           "phi_deg": list(parse_range(phi, "phi")), "particle": particle_code(particle),
           "geometry": None if geometry is None else str(geometry),
           "model_sha256": read_checkpoint(model_path)["sha256"],
           "steps": steps, "sampler": sampler, "batch_size": batch_size,
           "allow_extrapolation": bool(allow_extrapolation),
           "device": str(resolve_device(device))}
    num_shards = math.ceil(n / shard_size)
    first, stop = _shard_range(shards, num_shards)
    jobs = []
    out = Path(out_dir)
    for i in range(first, stop):
        energy_i, theta_i, phi_i = _shard_conditions(run, i)
        # every check generate() makes (ranges, particle, angles, steps), before any file
        generate_batches(energy_i, theta_i, run["geometry"], 1, phi=phi_i, particle=particle,
                         steps=steps, sampler=sampler, seed=_shard_seed(run, i), device=run["device"],
                         model=str(model_path), batch_size=batch_size,
                         allow_extrapolation=allow_extrapolation).close()
        jobs.append((run, str(out), i, str(model_path)))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    # the model is recorded by its SHA-256 (compared on resume) and, for reading, its path
    _check_or_write_manifest(out, {"pcshower_run": run, "model_path": str(model_path)})
    pending = [j for j in jobs if not all(
        _shard_complete(p, np.diff(shard_span(n, shard_size, j[2]))[0], "generating")
        for p in _paths(out, run, j[2]))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(np.diff(shard_span(n, shard_size, j[2]))[0] for j in pending),
                   unit="shower", desc=f"generate -> {out}")
    try:
        for k in map_unordered(_generate_shard, pending, scheduler=scheduler, workers=workers):
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    summary = {"directory": str(out), "shards": num_shards, "written": len(pending),
               "already_done": len(jobs) - len(pending), "showers": n}
    if (first, stop) != (0, num_shards):
        summary["range"] = (first, stop)
    return summary


def _generate_shard(job) -> int:
    """Generate and write one shard (runs in a worker process); returns its showers."""
    import contextlib

    import torch

    from pcshower.io import ParquetBatchWriter
    from pcshower.models.generate import generate_batches

    from pcshower.allocator import tune_allocator

    run, out, i, model_path = job
    tune_allocator()  # as pcshower generate does (docs/benchmarks.md, chunked passes)
    torch.set_num_threads(1)
    energy, theta, phi = _shard_conditions(run, i)
    paths = _paths(Path(out), run, i)
    meta = {"shard": i, "run": run}
    with contextlib.ExitStack() as stack:
        points = stack.enter_context(ParquetBatchWriter(paths[0], "showers", metadata=meta))
        hits = (stack.enter_context(ParquetBatchWriter(paths[1], "hits", metadata=meta))
                if len(paths) > 1 else None)
        for part in generate_batches(energy, theta, run["geometry"], 1, phi=phi,
                                     particle=run["particle"], steps=run["steps"],
                                     sampler=run["sampler"], seed=_shard_seed(run, i),
                                     device=run["device"], model=model_path,
                                     batch_size=run["batch_size"],
                                     allow_extrapolation=run["allow_extrapolation"]):
            cpu = part.to("cpu")
            points.write(cpu)
            if hits is not None:
                hits.write(part.hits.to("cpu"), cpu)
    return len(energy)

