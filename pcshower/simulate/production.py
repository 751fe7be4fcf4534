"""Large shower productions: sharded Parquet, deterministic per (seed, shard), resumable, parallel.

A run of ``n`` showers is cut into shards of ``shard_size``; shard ``i`` draws its conditions from
``numpy.random.SeedSequence([seed, i, 0])`` and seeds its engine from ``[seed, i, 1]``, so a shard
is the same whichever worker makes it, whenever, and whether the run was interrupted. Shards are
written atomically (:func:`pcshower.io.write_parquet`); a shard file that exists is done, so
running the same command again finishes an interrupted run without duplicating or losing showers.
``_run.json`` in the output directory records the run (a name that pyarrow, pandas, polars and
DuckDB skip, so the directory reads as one Parquet data set); a different run into the same directory is
refused. Every condition is drawn and checked before the first file is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pcshower.parallel import check_scheduler, map_unordered
from pcshower.physics.stack import Slab, Stack
from pcshower.simulate.api import (finish, get_engine, local_angles, resolve_stack,
                                   validate_conditions)
from pcshower.simulate.reduce import GRID_PRESETS, PolarGrid, grid_for, reduce_points
from pcshower.units import BOTH_FRAMES, FRAMES, deg_to_rad, parse_range, particle_code

__all__ = ["produce", "reduce_dataset", "RunConfig", "parse_range", "parse_stack_spec",
           "shard_conditions"]

MANIFEST = "_run.json"
#: The run record's name before 0.1.x of 2026-12 (a name Parquet readers did not skip); a
#: directory that still has it is resumed and the record renamed.
OLD_MANIFEST = "run.json"


_SLAB = re.compile(r"^\s*([A-Za-z0-9_+\-]+)\s*:\s*([0-9.eE+\-]+)\s*(?::\s*(active|a|passive|p))?\s*$")
_GROUP = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?\[(.*)\]\s*$")


def parse_stack_spec(spec: str) -> Stack:
    """An inline stack: groups ``Nx[MAT:MM[:active], ...]`` joined by ``+``.

    Example (ILD-like): ``"20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]"``. Materials are
    pcshower or Geant4 names (see :func:`pcshower.physics.get_material`).
    """
    slabs: list[Slab] = []
    for group in str(spec).split("+"):
        m = _GROUP.match(group)
        if not m:
            raise ValueError(f"stack spec {spec!r}: cannot read {group.strip()!r}; write groups "
                             "like 20x[W:2.1,Si:0.5:active] joined by '+'")
        repeat = int(m.group(1) or 1)
        pattern = []
        for item in m.group(2).split(","):
            s = _SLAB.match(item)
            if not s:
                raise ValueError(f"stack spec {spec!r}: cannot read slab {item.strip()!r}; write "
                                 "MATERIAL:THICKNESS_MM or MATERIAL:THICKNESS_MM:active")
            pattern.append(Slab(s.group(1), float(s.group(2)), (s.group(3) or "p")[0] == "a"))
        slabs.extend(pattern * repeat)
    return Stack(tuple(slabs), name=str(spec))


def _resolve_stack_arg(stack):
    """A Stack, a geometry name, or an inline spec (contains '[')."""
    if isinstance(stack, str) and "[" in stack:
        return parse_stack_spec(stack), None, stack
    return resolve_stack(stack)


@dataclass
class RunConfig:
    """Everything that defines a production (recorded in ``run.json``)."""

    n: int
    energy_gev: tuple[float, float]
    spectrum: str = "uniform"  # or "log"
    theta_deg: tuple[float, float] = (0.0, 0.0)
    phi_deg: tuple[float, float] = (0.0, 360.0)
    particle: int = 22
    stack: str = "ild"
    frame: str = "physics"
    seed: int = 0
    shard_size: int = 10_000
    engine: str = "parametrised"
    reduce: bool = True
    grid: object = None
    engine_options: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.n / self.shard_size)) if self.n else 0

    def shard_bounds(self, i: int) -> tuple[int, int]:
        return shard_span(self.n, self.shard_size, i)

    def to_json(self) -> dict:
        d = asdict(self)
        d["grid"] = _grid_json(self.grid)
        return d


def _grid_json(grid):
    if isinstance(grid, PolarGrid):
        return {"kind": "polar", **asdict(grid)}
    if isinstance(grid, tuple):
        return list(grid)
    return grid


def _grid_from_json(grid):
    if isinstance(grid, dict):
        return PolarGrid(**{k: v for k, v in grid.items() if k != "kind"})
    if isinstance(grid, list):
        return tuple(grid)
    return grid


def shard_conditions(cfg: RunConfig, i: int):
    """Energies [GeV], theta, phi [rad] of shard ``i`` (deterministic in (seed, i))."""
    a, b = cfg.shard_bounds(i)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, i, 0]))
    k = b - a
    lo, hi = cfg.energy_gev
    if cfg.spectrum == "log":
        energy = np.exp(rng.uniform(math.log(lo), math.log(hi), k))
    else:
        energy = rng.uniform(lo, hi, k)
    theta = deg_to_rad(rng.uniform(*cfg.theta_deg, k))
    phi = deg_to_rad(rng.uniform(*cfg.phi_deg, k))
    return energy, theta, phi


def shard_span(n: int, shard_size: int, i: int) -> tuple[int, int]:
    """First and past-the-last shower of shard ``i`` of a run of ``n`` (also sharded generate)."""
    return i * shard_size, min(n, (i + 1) * shard_size)


def seed_of_shard(seed: int, i: int) -> int:
    """The engine (or sampler) seed of shard ``i``: from ``SeedSequence([seed, i, 1])``."""
    return int(np.random.SeedSequence([seed, i, 1]).generate_state(1, dtype=np.uint32)[0])


def shard_seed(cfg: RunConfig, i: int) -> int:
    return seed_of_shard(cfg.seed, i)


def _validate(cfg: RunConfig):
    if isinstance(cfg.n, bool) or int(cfg.n) != cfg.n or cfg.n < 1:
        raise ValueError(f"--n must be a positive number of showers, got {cfg.n!r}")
    if int(cfg.shard_size) != cfg.shard_size or cfg.shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {cfg.shard_size!r}")
    lo, hi = cfg.energy_gev
    if not lo > 0:
        raise ValueError(f"energies must be positive (GeV), got the range {lo:g}:{hi:g}")
    if cfg.spectrum not in ("uniform", "log"):
        raise ValueError(f"energy spectrum must be 'uniform' or 'log', got {cfg.spectrum!r}")
    if cfg.frame not in (*FRAMES, BOTH_FRAMES):
        raise ValueError(f"frame must be one of {FRAMES} or {BOTH_FRAMES!r}, got {cfg.frame!r}")
    if cfg.reduce and cfg.frame == BOTH_FRAMES:
        if cfg.grid is not None and not isinstance(cfg.grid, str):
            raise ValueError("--frame both needs a grid preset (fine, medium, coarse) or the "
                             "default: one DX,DY,DZ cannot be in both frames' units")
        for f in FRAMES:
            grid_for(f, cfg.grid)
    elif cfg.reduce:
        grid_for(cfg.frame, _grid_from_json(cfg.grid))
    get_engine(cfg.engine)  # a clear error now if the engine cannot be loaded


def produce(out_dir, *, n: int, energy, theta=0.0, phi=(0.0, 360.0), particle="photon",
            stack="ild", frame: str = "physics", seed: int = 0, shard_size: int = 10_000,
            spectrum: str = "uniform", engine: str = "parametrised", reduce: bool = True,
            grid=None, workers: int | None = None, progress: bool = True,
            engine_options: dict | None = None, shards=None, scheduler="processes") -> dict:
    """Simulate ``n`` showers into sharded Parquet files under ``out_dir``.

    Args:
        energy, theta, phi: a value or a ``(low, high)`` range (or ``"low:high"``); energies in
            GeV drawn uniformly (``spectrum="uniform"``) or log-uniformly (``"log"``); angles in
            **degrees** drawn uniformly (global angles when ``stack`` names a geometry).
        stack: a geometry name, a :class:`Stack` or an inline spec such as
            ``"20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]"``.
        workers: processes (default: the machine's cores, at most the pending shards).
        scheduler: where the shards run: ``"processes"`` (local worker processes), ``"local"``
            (a Dask ``LocalCluster``), a Dask scheduler address ``"tcp://HOST:PORT"``, or a
            Dask ``Client``/cluster object (:mod:`pcshower.parallel`). The data set is the same
            whichever runs it.
        shards: ``(start, stop)`` or ``"start:stop"``: make only shards ``start .. stop-1`` of
            the run (one job of a farm, or the first shards of a long production); the run
            record is that of the whole run, so later calls with other ranges (or none) add
            to the same data set. ``None``: every shard.
        Other arguments as in :func:`pcshower.simulate.simulate`.

    Returns:
        A summary: directory, shards, shards written now and found done, showers, and the mean
        points per shower before and after reduction of the showers made now.
    """
    layered, geometry, name = _resolve_stack_arg(stack)
    cfg = RunConfig(n=int(n) if not isinstance(n, bool) else n,
                    energy_gev=parse_range(energy, "energy"), spectrum=spectrum,
                    theta_deg=parse_range(theta, "theta"), phi_deg=parse_range(phi, "phi"),
                    particle=particle_code(particle), stack=name, frame=frame, seed=int(seed),
                    shard_size=int(shard_size), engine=str(engine), reduce=bool(reduce),
                    grid=_grid_json(grid), engine_options=dict(engine_options or {}))
    _validate(cfg)
    scheduler = check_scheduler(scheduler)
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers
                                or workers < 1):
        raise ValueError(f"--workers must be a whole number >= 1, got {workers!r}")
    for option, (lo, hi), top in (("theta", cfg.theta_deg, 180.0), ("phi", cfg.phi_deg, None)):
        if not (math.isfinite(lo) and math.isfinite(hi)) or (top is not None and not 0 <= lo <= hi <= top):
            shown = f"{lo:g}" if lo == hi else f"{lo:g}:{hi:g}"
            raise ValueError(f"--{option} {shown} degrees: " + (
                f"the polar angle must lie in [0, {top:g}] degrees" if top else "must be finite"))
    # draw and check every shard's conditions before anything touches the disk
    first, stop = _shard_range(shards, cfg.num_shards)
    tasks = []
    for i in range(first, stop):
        energy_i, theta_i, phi_i = shard_conditions(cfg, i)
        theta_l, phi_l = local_angles(geometry, theta_i, phi_i)
        validate_conditions(energy_i, theta_l, phi_l, cfg.particle)
        if cfg.engine == "parametrised":
            from pcshower.simulate.parametrised import _check_inputs
            _check_inputs(energy_i, theta_l, phi_l, cfg.particle)
        tasks.append((i, energy_i, theta_i, phi_i, theta_l, phi_l))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    manifest = {"pcshower_run": cfg.to_json(), "stack_summary": layered.summary()}
    if geometry is not None:
        manifest["geometry"] = name
    _check_or_write_manifest(out, manifest)
    pending = [t for t in tasks if not all(
        _shard_complete(path, np.diff(cfg.shard_bounds(t[0]))[0])
        for path in shard_paths(out, cfg, t[0]))]
    done_before = len(tasks) - len(pending)
    jobs = [(cfg, layered, name if geometry is not None else None, geometry is None
             or not hasattr(geometry, "local_direction"), str(out), *t) for t in pending]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        remaining = sum(cfg.shard_bounds(t[0])[1] - cfg.shard_bounds(t[0])[0] for t in pending)
        bar = tqdm(total=remaining, unit="shower", desc=f"simulate -> {out}")
    points = np.zeros(2, dtype=np.int64)  # before and after reduction, shards written now
    try:
        for k, before, after in map_unordered(_run_shard, jobs, scheduler=scheduler,
                                              workers=workers):
            points += (before, after)
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    made = sum(cfg.shard_bounds(j[5])[1] - cfg.shard_bounds(j[5])[0] for j in jobs)
    summary = {"directory": str(out), "shards": cfg.num_shards, "written": len(jobs),
               "already_done": done_before, "showers": cfg.n}
    if (first, stop) != (0, cfg.num_shards):
        summary["range"] = (first, stop)
    if made:
        summary["points_per_shower_before"] = float(points[0]) / made
        summary["points_per_shower_after"] = float(points[1]) / made
    return summary


def summary_line(summary: dict) -> str:
    """The one line ``pcshower simulate`` and sharded ``pcshower generate`` print at the end."""
    return (f"{summary['directory']}: {summary['showers']} showers in {summary['shards']} shards "
            f"({summary['written']} written now, {summary['already_done']} already done"
            + (" of shards {}:{}".format(*summary["range"]) if "range" in summary else "") + ")")


def shard_paths(out, cfg: RunConfig, i: int) -> list[Path]:
    """The files of shard ``i``: ``out/shard-i.parquet``, or with ``frame="both"`` one in each
    of ``out/physics/`` and ``out/detector/`` (each folder reads as one Parquet data set)."""
    from pcshower.io import shard_name

    if cfg.frame == BOTH_FRAMES:
        return [Path(out) / f / shard_name(i) for f in FRAMES]
    return [Path(out) / shard_name(i)]


def _shard_range(shards, num_shards: int) -> tuple[int, int]:
    """``(start, stop)`` of the shards to make, checked against the run's ``num_shards``."""
    if shards is None:
        return 0, num_shards
    text = shards if isinstance(shards, str) else ":".join(str(s) for s in shards)
    parts = text.split(":")
    try:
        start, stop = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]),
                                                                            int(parts[0]) + 1)
    except ValueError:
        start = stop = None
    if start is None or len(parts) > 2 or not 0 <= start < stop <= num_shards:
        raise ValueError(f"--shards {text}: give START:STOP with 0 <= START < STOP <= "
                         f"{num_shards} (this run has {num_shards} shards), or one shard index")
    return start, stop


def _shard_complete(path: Path, rows: int, redo: str = "simulating") -> bool:
    """True if ``path`` is a readable Parquet shard of ``rows`` showers. A shard damaged after
    it was written (truncated, overwritten, wrong row count) is reported and made again."""
    if not path.exists():
        return False
    import pyarrow.parquet as pq

    try:
        found = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # noqa: BLE001  (any unreadable footer means: not done)
        reason = f"unreadable ({type(err).__name__}: {err})"
    else:
        if found == rows:
            return True
        reason = f"{found} showers where the run has {rows}"
    print(f"pcshower: warning: {path} is damaged ({reason}): {redo} it again", file=sys.stderr)
    return False


def _check_or_write_manifest(out: Path, manifest: dict):
    path = out / MANIFEST
    old_path = out / OLD_MANIFEST
    if not path.exists() and old_path.is_file():
        os.replace(old_path, path)  # a run started before the record was renamed
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is unreadable ({err}); remove it or use another --out") from None
        if old.get("pcshower_run") != json.loads(json.dumps(manifest["pcshower_run"])):
            diff = [k for k in manifest["pcshower_run"]
                    if old.get("pcshower_run", {}).get(k) != json.loads(json.dumps(
                        manifest["pcshower_run"][k]))]
            raise ValueError(f"{out} holds a different run (differs in: {', '.join(diff)}); "
                             "use a new --out, or the same options to resume it")
        return
    out.mkdir(parents=True, exist_ok=True)
    from pcshower.io._atomic import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))


def _run_shard(job) -> int:
    """Simulate, reduce and write one shard (runs in a worker process)."""
    cfg, stack, geometry_name, angles_local, out, i, energy, theta, phi, theta_l, phi_l = job
    import torch

    from pcshower.io import write_parquet
    torch.set_num_threads(1)
    seed = shard_seed(cfg, i)
    run = get_engine(cfg.engine, **cfg.engine_options)
    made = run(energy, theta_l, phi_l, cfg.particle, stack, seed, cfg.frame)
    if cfg.frame != BOTH_FRAMES:
        made = {cfg.frame: made}
    a, b = cfg.shard_bounds(i)
    before = after = 0
    frames = FRAMES if cfg.frame == BOTH_FRAMES else (cfg.frame,)  # shard_paths' order
    for path, frame in zip(shard_paths(out, cfg, i), frames):
        showers = finish(made[frame], energy, theta, phi, cfg.particle, geometry_name,
                         angles_local)
        before += showers.total_points
        if cfg.reduce:
            showers = reduce_points(showers, _grid_from_json(cfg.grid))
        after += showers.total_points
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(path, showers, metadata={"seed": cfg.seed, "shard": i, "shard_seed": seed,
                                               "first_shower": a, "run": cfg.to_json()})
    return b - a, before, after


# keep the preset table importable from here for the CLI's help text
PRESET_NAMES = sorted({k for presets in GRID_PRESETS.values() for k in presets})


def reduce_dataset(source, out, grid, *, position: str = "centroid", overwrite: bool = False,
                   progress: bool = True, layout: str = "list", compression: str = "zstd") -> dict:
    """Merge the points of every shower of ``source`` (a Parquet file or shard directory) on
    ``grid`` (:func:`pcshower.simulate.reduce_points`), file by file, into ``out`` (a file for a
    file, else a directory of shards of the same names). Output files that are complete (same
    number of showers, same grid) are kept, so a stopped run resumes; one made on another grid
    is refused unless ``overwrite``. Each file's provenance keeps the source's, with this
    reduction as ``reduction`` and the one before as ``reduction["previous"]``. ``layout`` and
    ``compression`` are those of :func:`pcshower.io.write_parquet` (``"flat"`` with ``"lz4"``
    reads fastest, e.g. for training). Returns counts and the mean points per shower before
    and after (over the files reduced now)."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from pcshower.io import list_shards, read_metadata, read_parquet, write_parquet
    from pcshower.io._atomic import check_output
    from pcshower.simulate.reduce import _grid_record

    source, out = Path(source), Path(out)
    files = list_shards(source)
    if source.is_dir():
        check_output(out, directory=True)
        targets = [out / f.name for f in files]
    else:
        check_output(out, overwrite=True)
        targets = [out]
    if any(t.resolve() == f.resolve() for f, t in zip(files, targets)):
        raise ValueError(f"--out {out} is the input: write the reduced showers elsewhere")
    summary = {"files": len(files), "written": 0, "kept": 0, "showers": 0}
    now = before = after = 0
    for f, target in tqdm(list(zip(files, targets)), disable=not progress, desc="reduce",
                          unit="file"):
        rows = pq.ParquetFile(f).metadata.num_rows
        want = _grid_record(grid_for(read_metadata(f)["frame"], grid))
        if target.exists() and not overwrite and _shard_complete(target, rows, redo="reducing"):
            have = read_metadata(target).get("provenance", {}).get("reduction", {})
            if have.get("grid") != want or have.get("position") != position:
                raise ValueError(f"{target} exists, reduced on grid {have.get('grid')} "
                                 f"({have.get('position')}), not {want} ({position}): pass "
                                 f"--overwrite to replace it, or choose another --out")
            summary["kept"] += 1
            summary["showers"] += rows
            continue
        showers = read_parquet(f)
        previous = showers.metadata.get("reduction")
        reduced = reduce_points(showers, grid, position=position)
        record = dict(reduced.metadata["reduction"])
        if previous is not None:
            record["previous"] = previous
        write_parquet(target, reduced, metadata={"reduction": record}, layout=layout,
                      compression=compression)
        summary["written"] += 1
        summary["showers"] += len(showers)
        now += len(showers)
        before += int(showers.points.shape[0])
        after += int(reduced.points.shape[0])
    summary["points_before"] = before / max(now, 1)
    summary["points_after"] = after / max(now, 1)
    return summary
