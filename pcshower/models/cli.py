"""The ``pcshower train``, ``pcshower finetune``, ``pcshower combine``, ``pcshower fit-split``,
``pcshower export`` and ``pcshower generate`` subcommands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from pcshower.cli import seed_arg
from pcshower.units import parse_range

__all__ = ["register", "parse_range"]

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a ShowerFlow + EPiC diffusion model on physics-frame showers",
        description="Train a model on Parquet showers in the physics frame (from `pcshower "
                    "simulate --frame physics`). Writes RUN/model.pt (EMA weights), RUN/last.pt "
                    "(training state), RUN/log.csv and RUN/config.yaml.")
    p.add_argument("--config", required=True, help="YAML config with 'model' and 'train' sections "
                                                   "(see configs/)")
    p.add_argument("--data", required=True, help="Parquet file or shard directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt (bit-exact)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's normalisation and matching weights "
                        "(overrides train.init_from; with train.parts: [flow] retrains the flow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    f = subparsers.add_parser(
        "fit-split", help="measure a model's per-point sub-voxel split boxes on finer showers",
        description="Measure, on physics-frame showers finer than the model's training grid "
                    "(split.box), how far each voxel's energy is spread about its centroid, per "
                    "bin of radius and depth, and write a copy of the checkpoint that splits every "
                    "generated point over the measured box (weights unchanged). See "
                    "docs/models.md.")
    f.add_argument("model", help="checkpoint to start from")
    f.add_argument("--data", required=True, help="Parquet showers finer than the training grid")
    f.add_argument("--out", required=True, help="checkpoint to write (atomic)")
    f.add_argument("--factor", type=int, default=None,
                   help="sub-points per generated point (default: the model's split.factor)")
    f.add_argument("--max-showers", type=int, default=2000,
                   help="showers to measure on (default 2000)")
    f.add_argument("--snap-depth", action="store_true",
                   help="also measure the mean depth of the training points per slice and put "
                        "every generated point there (split.snap_depth; needs slices.centred)")
    f.add_argument("--declump", action="store_true",
                   help="move generated points that share a training-grid voxel with another "
                        "point of their shower along the circle about the axis to a free voxel "
                        "(split.declump)")
    f.add_argument("--spread-key", choices=("centroid", "voxel"), default=None,
                   help="bin the spread table by the radius of each voxel's centroid or of its "
                        "centre (split.spread_key; default: the model's)")
    f.add_argument("--core-radius", type=float, default=None,
                   help="centre each shower's energy within this radius (R_M) on the axis at "
                        "generation (core_radius; default: the model's)")
    f.add_argument("--slice-core-radius", type=float, default=None,
                   help="then each depth slice's energy within this radius (R_M) too "
                        "(slice_core_radius; default: the model's)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=_fit_split)

    ft = subparsers.add_parser(
        "finetune", help="adapt a trained model to new showers (e.g. another detector's)",
        description="Continue training MODEL on DATA (physics-frame Parquet showers, e.g. a few "
                    "hundred to ten thousand of another geometry's) from all of its weights and "
                    "its normalisation: a train run with the model's own config and fine-tuning "
                    "settings (500 steps at lr 5e-5 unless given). --trainable bias trains only "
                    "the biases and normalisation layers. Writes RUN as `pcshower train` does.")
    ft.add_argument("model", help="checkpoint to start from ('default': the shipped model)")
    ft.add_argument("--data", required=True, help="Parquet file or shard directory")
    ft.add_argument("--out", required=True, help="run directory")
    ft.add_argument("--trainable", default="all", choices=["all", "bias"],
                    help="all parameters (default), or only biases and normalisation layers")
    ft.add_argument("--parts", default="flow,points",
                    help="networks that learn: flow, points or both (default flow,points)")
    ft.add_argument("--steps", type=int, default=None, help="optimiser steps (default 500)")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5)")
    ft.add_argument("--batch-showers", type=int, default=None,
                    help="showers per point-network step (default: the train default, 48)")
    ft.add_argument("--seed", type=seed_arg, default=None, help="training seed (default 0)")
    ft.add_argument("--resume", action="store_true", help="continue from RUN/last.pt (bit-exact)")
    ft.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_finetune)

    c = subparsers.add_parser(
        "combine", help="one checkpoint from a point-network run and a flow run trained apart",
        description="Write one checkpoint with the flow (and its shape-feature statistics) of FLOW "
                    "and everything else of POINTS: for the two parts of a model trained in "
                    "parallel (train.parts: [points] and [flow], same model section but the "
                    "flow's size), or a new point network (another objective or backbone) "
                    "beside an existing model's flow.")
    c.add_argument("points", help="checkpoint whose point network is kept")
    c.add_argument("flow", help="checkpoint whose flow is kept")
    c.add_argument("--tables-from", choices=["points", "flow"], default="points",
                   help="which checkpoint's generation-time tables (split spread, slice depths, "
                        "measured by `pcshower fit-split`) to keep (default: points)")
    c.add_argument("--out", required=True, help="checkpoint to write (atomic)")
    c.set_defaults(func=_combine)

    x = subparsers.add_parser(
        "export", help="the whole generation chain of a model as one TorchScript file",
        description="Write the generation chain of MODEL (shower flow, point network with its "
                    "sampler steps, calibration, split, placement in the local frame of one face "
                    "of GEOMETRY, sampling fluctuations) as one TorchScript file that "
                    "torch.jit.load / libtorch runs without pcshower: for Key4hep's "
                    "DDFastShowerML (--layout ddml-caloclouds) or batched use (--layout native). "
                    "The traced graph is checked against pcshower's own chain before the file "
                    "is written. See docs/integration.md.")
    x.add_argument("model", help="checkpoint, or 'default' for the shipped model")
    x.add_argument("--format", default="torchscript", choices=["torchscript"],
                   help="file format (default: torchscript)")
    x.add_argument("--layout", default="ddml-caloclouds", choices=["ddml-caloclouds", "native"],
                   help="inputs and outputs of the file (default: ddml-caloclouds)")
    x.add_argument("--geometry", default="ild", help="geometry the showers are placed in "
                                                    "(default: ild)")
    x.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    x.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    x.add_argument("--batch", type=int, default=1,
                   help="showers per pass of the native layout (default: 1)")
    x.add_argument("--out", required=True, help="file to write (atomic)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.set_defaults(func=_export)

    g = subparsers.add_parser(
        "generate", help="generate showers with the shipped (or a given) model",
        description="Generate showers and write them as Parquet (points in the detector frame, "
                    "plus OUT stem + '_hits.parquet' with the cell hits) or CaloChallenge HDF5 "
                    "(.h5: incident energies and dense cell energies, MeV). Angles in degrees; "
                    "ranges LOW:HIGH are sampled uniformly per shower.")
    g.add_argument("--geometry", default="ild", help="geometry name or YAML file; 'none' writes "
                                                     "physics-frame showers (default: ild)")
    g.add_argument("--energy", required=True, help="incident energy in GeV, or LOW:HIGH")
    g.add_argument("--theta", default=None,
                   help="polar angle in degrees, or LOW:HIGH (default: normal incidence on the "
                        "geometry, 90 for barrels such as ild, 0 for planes such as the "
                        "CaloChallenge ones)")
    g.add_argument("--phi", default="0", help="azimuth in degrees, or LOW:HIGH (default 0)")
    g.add_argument("--n", type=int, default=1, help="number of showers")
    g.add_argument("--particle", default="photon",
                   help="particle name or PDG code; must be one the model was trained on "
                        "(default: photon; the shipped model knows photons only)")
    g.add_argument("--out", required=True, help="output .parquet or .h5 file")
    g.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    g.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's). Time grows with the network calls "
                        "(EDM Heun: 2 x steps - 1, flow-matching Heun/midpoint: 2 x steps, Euler "
                        "and consistency: steps); fewer steps than the model was tuned for cost "
                        "fidelity (docs/models.md measures the shipped model at 8 and 16)")
    g.add_argument("--sampler", choices=["heun", "euler", "midpoint", "multistep"], default=None,
                   help="sampler: heun (2nd order, 2 calls a step) or euler (1 call a step) for "
                        "EDM and flow-matching models, midpoint (flow matching), multistep "
                        "(consistency models); default: the model's")
    g.add_argument("--seed", type=seed_arg(), default=0, help="random seed (default 0)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="showers per pass (memory bound; default 256, or a tenth of a smaller job)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core). On a machine whose cores "
                        "are busy with other jobs use 1: there two threads, waiting for each "
                        "other, took twice as long as one (docs/benchmarks.md)")
    g.add_argument("--device", default=None,
                   help="torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--allow-extrapolation", action="store_true",
                   help="warn instead of failing outside the model's training range")
    g.add_argument("--response", default="auto", metavar="auto|sampling|FILE",
                   help="how the geometry reads the model's deposits: 'auto' (the stack's "
                        "measured Geant4 layer response for a model taught by recorded Geant4 "
                        "deposits, else the equivalent-medium sampling model), 'sampling', or a "
                        "response file from 'pcshower tune --response' (docs/geant4.md)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and its _hits file); without it they are kept")
    g.add_argument("--shard-size", type=int, default=None,
                   help="write a sharded production instead of one file: --out is then a "
                        "directory (showers/ and hits/ shard-i.parquet, _run.json), shard i is "
                        "seeded by (seed, i), and the same command resumes an interrupted run")
    g.add_argument("--shards", default=None, metavar="START:STOP",
                   help="with --shard-size: make only shards START..STOP-1 (one farm job)")
    g.add_argument("--scheduler", default="processes", metavar="processes|local|ADDRESS",
                   help="with --shard-size: where the shards run: processes (local worker "
                        "processes, default), local (a Dask LocalCluster) or a Dask scheduler "
                        "address tcp://HOST:PORT (docs/scale.md)")
    g.add_argument("--workers", type=int, default=None,
                   help="with --shard-size: worker processes (default: all cores)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)


def _train(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.models.train import train

    check_output(args.out, directory=True)
    metrics = train(args.config, args.data, args.out, resume=args.resume, device=args.device,
                    progress=not args.no_progress, init_from=args.init_from)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks for the run
        print(f"trained {metrics['steps']} steps in {metrics['train_time_s']} s"
              + (f" on {metrics['ranks']} ranks" if "ranks" in metrics else "")
              + f"; model written to {Path(args.out) / 'model.pt'}")
    return 0


def fit_split(model: str, data: str, out: str, *, factor: int | None = None,
              max_showers: int = 2000, snap_depth: bool | None = None,
              declump: bool | None = None, spread_key: str | None = None,
              core_radius: float | None = None, slice_core_radius: float | None = None,
              progress: bool = True) -> dict:
    """Copy of checkpoint ``model`` with its split spread table measured on ``data`` (Parquet,
    physics frame, finer than the training grid), written to ``out``; ``snap_depth`` sets
    ``split.snap_depth`` (the slices' depths are then measured too), ``declump``,
    ``spread_key``, ``core_radius`` and ``slice_core_radius`` set those generation-time
    settings (the weights do not depend on them). Returns the measurement
    info (also stored in the checkpoint's provenance under ``split_spread``)."""
    import copy

    from pcshower.io import iter_parquet
    from pcshower.models.checkpoint import (checkpoint_state, model_payload, read_checkpoint,
                                            save_checkpoint)
    from pcshower.models.model import ShowerModel

    if max_showers < 1:
        raise ValueError(f"--max-showers must be >= 1, got {max_showers}")
    body = read_checkpoint(model)
    config = copy.deepcopy(body["config"])
    split = config.setdefault("split", {})
    if split.get("box") is None:
        raise ValueError(f"checkpoint {model} has no training grid (split.box) in its config: the "
                         f"spread is measured per voxel of that grid; set it in the training YAML")
    split["spread"] = True
    if factor is not None:
        split["factor"] = int(factor)
    if snap_depth is not None:
        split["snap_depth"] = bool(snap_depth)
    if declump is not None:
        split["declump"] = bool(declump)
    if spread_key is not None:
        split["spread_key"] = str(spread_key)
    for key, value in (("core_radius", core_radius), ("slice_core_radius", slice_core_radius)):
        if value is not None:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{key.replace('_', '-')} must be a positive radius in R_M, "
                                 f"got {value}")
            config[key] = float(value)
    if int(split.get("factor", 1)) < 2:
        raise ValueError("the split factor is 1: give --factor (e.g. 16) so points are split")
    fitted = ShowerModel(config)
    state = checkpoint_state(body)
    state.update({k: v for k, v in fitted.state_dict().items()
                  if k.startswith("split_spread") or k == "slice_depth"})
    fitted.load_state_dict(state)
    info = fitted.fit_split_spread(iter_parquet(data, batch_size=250, max_showers=max_showers),
                                   progress=progress)
    provenance = dict(body.get("provenance") or {})
    provenance["split_spread"] = {"data": str(data), "factor": int(split["factor"]),
                                  **{k: info[k] for k in ("showers", "voxels", "points", "grid",
                                                          "slice_depth") if k in info}}
    save_checkpoint(out, model_payload(fitted, metrics=body.get("metrics"), provenance=provenance))
    return info


def _checkpoint_arg(text: str) -> Path:
    """A MODEL argument: a checkpoint file, or 'default' for the shipped model."""
    from pcshower.models.generate import default_model_path

    model = default_model_path() if text == "default" else Path(text)
    if not model.is_file():
        raise ValueError(f"model {model} is not a file; give a checkpoint or 'default'")
    return model


def _export(args) -> int:
    from pcshower.models.export import export_model

    meta = export_model(_checkpoint_arg(args.model), args.out, layout=args.layout, geometry=args.geometry,
                        steps=args.steps, sampler=args.sampler, batch=args.batch,
                        overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta['layout']} layout, geometry {meta['geometry']}, "
          f"{meta['network_calls']} network calls per shower, model {meta['model_sha256']}, "
          f"file sha256 {meta['sha256']}")
    return 0


def _finetune(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.models.train import finetune

    model = _checkpoint_arg(args.model)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"flow", "points"}:
        raise ValueError(f"--parts takes flow, points or flow,points, got {args.parts!r}")
    check_output(args.out, directory=True)
    settings = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("seed", args.seed),
                                  ("batch_showers", args.batch_showers)) if v is not None}
    metrics = finetune(model, args.data, args.out, trainable=args.trainable, parts=parts,
                       settings=settings, resume=args.resume, device=args.device,
                       progress=not args.no_progress)
    print(f"fine-tuned {model} for {metrics['steps']} steps ({args.trainable} parameters of "
          f"{', '.join(parts)}); model written to {Path(args.out) / 'model.pt'}")
    return 0


def _combine(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.models.checkpoint import combine_checkpoints

    check_output(args.out, overwrite=True)
    combine_checkpoints(args.points, args.flow, args.out, tables=args.tables_from)
    print(f"wrote {args.out}: point network of {args.points}, flow of {args.flow}")
    return 0


def _fit_split(args) -> int:
    from pcshower.io._atomic import check_output

    check_output(args.out, overwrite=True)
    info = fit_split(args.model, args.data, args.out, factor=args.factor,
                     max_showers=args.max_showers, snap_depth=args.snap_depth or None,
                     declump=args.declump or None, spread_key=args.spread_key,
                     core_radius=args.core_radius, slice_core_radius=args.slice_core_radius,
                     progress=not args.no_progress)
    print(f"measured the voxel spread on {info['showers']} showers ({info['voxels']} voxels of "
          f"{info['grid']}); wrote {args.out}")
    return 0


def _generate(args) -> int:
    from pcshower.allocator import tune_allocator
    from pcshower.io import ParquetBatchWriter, write_calochallenge
    from pcshower.models.generate import generate, generate_batches

    tune_allocator()  # no page-faulting of every op's output (docs/benchmarks.md)

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.shard_size is not None:
            raise ValueError("--threads is for a one-process run; a sharded run's workers use "
                             "one thread each (choose their number with --workers)")
        import torch

        torch.set_num_threads(args.threads)
    if args.shard_size is not None:
        return _generate_sharded(args)
    for option in ("shards", "workers"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option} is for a sharded production: add --shard-size")
    if args.scheduler != "processes":
        raise ValueError("--scheduler is for a sharded production: add --shard-size")
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".h5", ".hdf5"):
        raise ValueError(f"--out {out}: use a .parquet file (points + hits) or .h5/.hdf5 "
                         f"(CaloChallenge voxels)")
    geometry = None if args.geometry.lower() == "none" else args.geometry
    if geometry is None and suffix != ".parquet":
        raise ValueError("--geometry none writes physics-frame points: use a .parquet --out")
    from pcshower.io._atomic import check_output

    # a .parquet --out with a geometry gets its cell hits beside it
    hits_path = out.with_name(out.stem + "_hits.parquet") \
        if suffix == ".parquet" and geometry is not None else None
    for path in (out, hits_path):
        if path is not None:
            check_output(path, overwrite=args.overwrite)
    if args.theta is None:
        from pcshower.models.generate import normal_incidence_deg
        args.theta = str(normal_incidence_deg(geometry)) if geometry is not None else "90"
    rng = np.random.default_rng(args.seed)
    conds = {}
    for name in ("energy", "theta", "phi"):
        lo, hi = parse_range(getattr(args, name), name)
        conds[name] = rng.uniform(lo, hi, args.n) if hi > lo else np.full(args.n, lo)
    kwargs = dict(phi=conds["phi"], particle=args.particle, steps=args.steps, seed=args.seed,
                  device=args.device, model=args.model, batch_size=args.batch_size,
                  sampler=args.sampler, allow_extrapolation=args.allow_extrapolation,
                  response=args.response, progress=not args.no_progress)
    if suffix == ".parquet":
        # written pass by pass (batch_size showers): memory stays bounded by a pass however large
        # --n is; both files appear only when complete
        count = 0
        with contextlib.ExitStack() as stack:
            points = stack.enter_context(ParquetBatchWriter(out, "showers"))
            hits = stack.enter_context(ParquetBatchWriter(hits_path, "hits")) if hits_path else None
            for part in generate_batches(conds["energy"], conds["theta"], geometry, 1, **kwargs):
                cpu = part.to("cpu")
                points.write(cpu)
                if hits is not None:
                    hits.write(part.hits.to("cpu"), cpu)
                count += len(part)
        written = [out] + ([hits_path] if hits_path else [])
    else:
        showers = generate(conds["energy"], conds["theta"], geometry, 1, **kwargs)
        hits = showers.hits
        if hits.num_cells > 200_000:
            raise ValueError(f"geometry {args.geometry!r} has {hits.num_cells} cells: too many for "
                             f"dense CaloChallenge voxels; write .parquet (sparse hits) instead")
        from pcshower.geometry import load_geometry

        geo = load_geometry(geometry)
        write_calochallenge(out, showers.energy.cpu().numpy() * 1000.0,
                            geo.calochallenge_voxels(hits).cpu().numpy(),
                            metadata={"generator": "pcshower generate",
                                      **geo.calochallenge_metadata()})
        written = [out]
        count = len(showers)
    print(f"wrote {count} showers to {', '.join(map(str, written))}")
    return 0


def _generate_sharded(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.models.production import generate_production
    from pcshower.simulate.production import summary_line

    if Path(args.out).suffix.lower() in (".parquet", ".h5", ".hdf5"):
        raise ValueError(f"--out {args.out}: with --shard-size, --out is a directory of shards "
                         "(drop the suffix)")
    if args.overwrite:
        raise ValueError("--overwrite does not apply to a sharded production: the same command "
                         "resumes it; use a new --out for a new run")
    check_output(args.out, directory=True)
    geometry = None if args.geometry.lower() == "none" else args.geometry
    summary = generate_production(
        args.out, n=args.n, energy=args.energy, theta=args.theta, phi=args.phi,
        geometry=geometry, model=args.model, particle=args.particle, seed=args.seed,
        shard_size=args.shard_size, steps=args.steps, sampler=args.sampler,
        batch_size=args.batch_size, allow_extrapolation=args.allow_extrapolation,
        scheduler=args.scheduler, workers=args.workers, device=args.device,
        progress=not args.no_progress, shards=args.shards)
    print(summary_line(summary))
    return 0
