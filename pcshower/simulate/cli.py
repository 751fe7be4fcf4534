"""``pcshower simulate``: produce a sharded Parquet data set of reference showers."""

from __future__ import annotations

import argparse

from pcshower.cli import seed_arg
from pcshower.simulate.api import ENGINE_NAMES

__all__ = ["register"]

_EXAMPLE = """examples:
  pcshower simulate --stack ild --particle photon --energy 10:100 --theta 30:90 --n 100000 --out ild_photons
  pcshower simulate --stack "20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]" \\
      --energy 1:1000 --spectrum log --theta 0 --frame detector --n 10000 --out siw_det
  pcshower simulate --engine geant4 --fastsim default --upstream Si:0.2 --frame detector \\
      --energy 10:50 --theta 90 --n 100 --out ild_g4_fastsim
Angles are in degrees (global angles for a named geometry; for a stack, the angle to its normal).
Re-running the same command resumes an interrupted run."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate reference EM showers into sharded Parquet",
        description="Simulate electromagnetic showers with the parametrised GFlash engine (or "
                    "Geant4) and write them as sharded Parquet with provenance.",
        epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", default="ild",
                   help="geometry name (see 'pcshower geometry list') or an inline stack such as "
                        "'20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]' (default: ild)")
    p.add_argument("--particle", default="photon", help="photon, electron, positron or a PDG code")
    p.add_argument("--energy", required=True, help="incident energy in GeV: E or LOW:HIGH")
    p.add_argument("--spectrum", choices=("uniform", "log"), default="uniform",
                   help="energy distribution in a range (default: uniform)")
    p.add_argument("--theta", required=True,
                   help="polar angle in degrees: T or LOW:HIGH (uniform)")
    p.add_argument("--phi", default="0:360", help="azimuth in degrees: P or LOW:HIGH (default 0:360)")
    p.add_argument("--n", type=int, required=True, help="number of showers")
    p.add_argument("--out", required=True, help="output directory (shards shard-00000.parquet, ...)")
    p.add_argument("--frame", choices=("physics", "detector", "both"), default="physics",
                   help="physics: X0/R_M/energy fraction; detector: active-layer deposits, mm/MeV; "
                        "both: the same showers in OUT/physics/ and OUT/detector/")
    p.add_argument("--seed", type=seed_arg(), default=0, help="run seed (shard i uses (seed, i))")
    p.add_argument("--shard-size", type=int, default=10_000, help="showers per shard")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="parametrised",
                   help="parametrised (GFlash-style, ms per shower) or geant4 (full simulation, "
                        "needs the geant4 extra; docs/geant4.md)")
    p.add_argument("--tune", default=None, metavar="auto|published|FILE",
                   help="parametrised engine: its coefficients; auto (default): the stack's "
                        "Geant4 tune where pcshower ships one, else the published GFlash ones; "
                        "published; or a tune file from 'pcshower tune'")
    p.add_argument("--grid", default=None,
                   help="point-reduction grid: fine, medium, coarse or 'DX,DY,DZ' in the frame's "
                        "units (DZ may be 'layer' in the detector frame); default medium (physics) "
                        "or fine (detector)")
    p.add_argument("--no-reduce", action="store_true", help="keep every spot/step (no merging)")
    p.add_argument("--shards", default=None, metavar="START:STOP",
                   help="make only shards START..STOP-1 of the run (a farm job, or the first "
                        "shards of a long run); the data set is the same as one whole run's")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for --scheduler processes or local (default: all cores)")
    p.add_argument("--scheduler", default="processes", metavar="processes|local|ADDRESS",
                   help="where the shards run: processes (local worker processes, default), local "
                        "(a Dask LocalCluster), or a running Dask scheduler's address "
                        "tcp://HOST:PORT (a farm: docs/scale.md); the data set is the same")
    g = p.add_argument_group(
        "Geant4 fast-simulation hook and upstream material (--engine geant4; docs/integration.md)")
    g.add_argument("--fastsim", default=None, metavar="MODEL",
                   help="stop photons (and electrons, if the model knows them) that enter the "
                        "stack above --fastsim-threshold at its front face and add the showers a "
                        "pcshower model generates for them as hits: MODEL is a checkpoint path or "
                        "'default' (the shipped model); needs --frame detector")
    g.add_argument("--fastsim-threshold", type=float, default=None, metavar="GEV",
                   help="kinetic energy in GeV above which the hook takes a particle over "
                        "(default 1; particles outside the model's training range, 10-100 GeV "
                        "for the shipped model, stay with Geant4 unless --fastsim-extrapolate)")
    g.add_argument("--fastsim-particles", default=None, metavar="LIST",
                   help="comma-separated photon,electron,positron to stop (default: those the "
                        "model was trained on)")
    g.add_argument("--fastsim-steps", type=int, default=None, metavar="N",
                   help="sampler steps of the model (default: the model's own)")
    g.add_argument("--fastsim-batch", type=int, default=None, metavar="N",
                   help="stopped particles per generation pass (default 256)")
    g.add_argument("--fastsim-extrapolate", action="store_true",
                   help="also hand the model particles outside its training range")
    g.add_argument("--upstream", default=None, metavar="MATERIAL:X0",
                   help="a tracker-like slab of X0 radiation lengths in front of the stack, e.g. "
                        "Si:0.2 or G4_Al:0.15 (Geant4 NIST names; thickness from Geant4's "
                        "radiation length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    _register_reduce(subparsers)

    t = subparsers.add_parser(
        "tune", help="fit the parametrised engine to Geant4 showers of one stack",
        description="Fit the GFlash coefficients of the parametrised engine (longitudinal "
                    "profile and its fluctuations, photon conversion depth, sampling fraction "
                    "with its energy and angle terms, radial core and tail) to detector-frame "
                    "Geant4 showers of one stack (pcshower simulate --engine geant4 --frame "
                    "detector or both), and write them as a tune file.",
        epilog="example:\n  pcshower tune ~/pcshower-data/g4_ild_photons_train --out ild.yaml\n"
               "Use the file with 'pcshower simulate --tune ild.yaml'; pcshower ships tunes for "
               "its stacks in pcshower/geometries/tunes/.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("data", help="a Geant4 production in the detector frame (or made with "
                                "--frame both: its detector/ is read)")
    t.add_argument("--out", required=True, help="tune file to write (YAML)")
    t.add_argument("--stack", default=None,
                   help="geometry name (default: the one the production records)")
    t.add_argument("--max-showers", type=int, default=None,
                   help="use at most this many showers (the first shards)")
    t.add_argument("--seed", type=seed_arg(), default=0, help="seed of the model showers of the fit")
    t.add_argument("--steps", default="400,100", metavar="LONG,RADIAL",
                   help="optimiser steps of the longitudinal and the radial fit (400,100)")
    t.add_argument("--response", action="store_true",
                   help="instead of a parametrised-engine tune, measure the stack's Geant4 layer "
                        "response (visible/deposited ratio per layer and shower age, and the "
                        "shower-to-shower spread) from a --frame both production, for reading "
                        "Geant4 physics-frame showers and models taught by them "
                        "(pcshower/geometry/response.py)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_tune)


def _tune_response(args, data, run: dict, geometry, name: str, limit) -> int:
    """``pcshower tune --response``: measure and write a :class:`LayerResponse`."""
    import datetime

    from pcshower.geometry.response import measure_layer_response, save_response
    from pcshower.io import iter_parquet, read_metadata

    phys_dir, det_dir = data / "physics", data / "detector"
    if not (phys_dir.is_dir() and det_dir.is_dir()):
        raise ValueError(f"{data} has no physics/ and detector/ folders: a response is measured "
                         "on the two frames of the same Geant4 showers (pcshower simulate "
                         "--engine geant4 --frame both)")
    meta = read_metadata(phys_dir)["provenance"]
    if meta.get("engine") != "geant4" or meta.get("physics_energy") != "per-cell deposit":
        raise ValueError(f"{phys_dir} is not a Geant4 physics frame of per-cell deposits "
                         f"(engine {meta.get('engine')!r}, physics_energy "
                         f"{meta.get('physics_energy')!r}); simulate it again with this pcshower")
    if geometry is None:
        from pcshower.geometry import load_geometry

        geometry = load_geometry(name)
    batches = [iter_parquet(d, batch_size=100, max_showers=limit) for d in (phys_dir, det_dir)]
    response = measure_layer_response(*batches, geometry, progress=not args.no_progress)
    response.provenance.update(
        {k: meta.get(k) for k in ("generator", "geant4_version", "geant4_physics", "geant4_tables")
         if k in meta},
        data=data.name, run_seed=run.get("seed"), measured=datetime.date.today().isoformat())
    save_response(response, args.out, overwrite=args.overwrite)
    import torch

    at_cog = response.ratio(torch.tensor([0, response.num_layers - 1]), torch.zeros(2)).tolist()
    print(f"{args.out}: Geant4 layer response of {name} from {response.provenance['showers']} "
          f"showers; visible/deposited at the shower's centre of gravity {at_cog[0]:.4f} (first "
          f"layer) ... {at_cog[1]:.4f} (last); layer scatter a_l {min(response.layer_var_a_mev):.3g}"
          f"-{max(response.layer_var_a_mev):.3g} MeV; shower factor {response.var_a_mev:.3g} MeV"
          f" / E_dep + {response.var_b:.3g}")
    return 0


def _register_reduce(subparsers) -> None:
    r = subparsers.add_parser(
        "reduce", help="merge the points of a shower file or data set on a coarser grid",
        description="Merge each shower's points that share a voxel of GRID (energy-weighted "
                    "centroids; every shower's energy kept exactly), shard by shard, into OUT: "
                    "e.g. a Geant4 set simulated on the fine grid made into a model's training "
                    "grid. A data set directory gives a directory of shards of the same names; "
                    "complete output shards are kept (a stopped run resumes).")
    r.add_argument("input", help="Parquet file or shard directory (showers, one frame)")
    r.add_argument("--grid", required=True,
                   help="fine, medium, coarse or 'DX,DY,DZ' in the frame's units (R_M, R_M, X0 "
                        "in the physics frame; DZ may be 'layer' in the detector frame)")
    r.add_argument("--position", choices=["centroid", "center"], default="centroid",
                   help="a merged point's position: energy-weighted centroid (default) or the "
                        "voxel centre")
    r.add_argument("--out", required=True, help="output file (for a file) or directory")
    r.add_argument("--overwrite", action="store_true", help="replace existing output files")
    r.add_argument("--layout", choices=("list", "flat"), default="list",
                   help="Parquet layout of the output (docs/formats.md): one row per shower "
                        "with point lists (default), or 'flat', faster to read (training)")
    r.add_argument("--compression", default="zstd", choices=("zstd", "lz4", "snappy", "none"),
                   help="Parquet compression of the output (default zstd; lz4 reads faster)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_reduce)


def _reduce(args) -> int:
    from pcshower.simulate.production import reduce_dataset

    summary = reduce_dataset(args.input, args.out, _parse_grid(args.grid),
                             position=args.position, overwrite=args.overwrite,
                             progress=not args.no_progress, layout=args.layout,
                             compression=args.compression)
    print(f"{args.out}: {summary['showers']} showers in {summary['files']} file(s) "
          f"({summary['written']} written now, {summary['kept']} already done); points per "
          f"shower {summary['points_before']:.0f} -> {summary['points_after']:.0f}")
    return 0


def _parse_grid(text):
    if text is None or text in ("fine", "medium", "coarse"):
        return text
    parts = [s.strip() for s in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"--grid must be fine, medium, coarse or DX,DY,DZ; got {text!r}")
    try:
        return tuple(None if (i == 2 and s.lower() in ("layer", "none")) else float(s)
                     for i, s in enumerate(parts))
    except ValueError:
        raise ValueError(f"--grid {text!r}: DX,DY,DZ must be numbers (DZ may be 'layer')") from None


def _geant4_options(args) -> dict:
    """The engine options of the hook and the upstream slab, checked before any work."""
    hook = {"--fastsim-threshold": ("fastsim_threshold_gev", args.fastsim_threshold),
            "--fastsim-particles": ("fastsim_particles", args.fastsim_particles),
            "--fastsim-steps": ("fastsim_steps", args.fastsim_steps),
            "--fastsim-batch": ("fastsim_batch_size", args.fastsim_batch),
            "--fastsim-extrapolate": ("fastsim_extrapolate", args.fastsim_extrapolate or None)}
    given = [flag for flag, (_, value) in hook.items() if value is not None]
    if args.engine != "geant4":
        used = (["--fastsim"] if args.fastsim is not None else []) + given + (
            ["--upstream"] if args.upstream is not None else [])
        if used:
            raise ValueError(f"{', '.join(used)}: only with --engine geant4 (the {args.engine} "
                             "engine has no Geant4 tracks to stop or upstream material)")
        return {}
    if args.fastsim is None and given:
        raise ValueError(f"{', '.join(given)} set without --fastsim MODEL (a checkpoint path or "
                         "'default')")
    options = {}
    if args.upstream is not None:
        from pcshower.simulate.geant4.fastsim import Upstream, check_upstream_material

        upstream = Upstream.parse(args.upstream)
        check_upstream_material(upstream)  # an unknown material is an error now, not in a worker
        options["upstream"] = str(upstream)
    if args.fastsim is not None:
        from pcshower.simulate.geant4.api import fastsim_config
        from pcshower.simulate.geant4.fastsim import plan_hook
        from pcshower.simulate.production import _resolve_stack_arg

        options["fastsim"] = args.fastsim
        options.update({key: value for key, value in hook.values() if value is not None})
        config = fastsim_config(args.fastsim, args.frame,
                                *(options.get(k) for k, _ in list(hook.values())[:4]),
                                extrapolate=bool(args.fastsim_extrapolate))
        # the model loaded and its ranges checked now (a missing or unreadable model, or one
        # trained on none of the particles asked for, fails before the run is recorded)
        plan_hook(config, _resolve_stack_arg(args.stack)[0])
    return options


def _run(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.simulate.production import produce, summary_line

    check_output(args.out, directory=True)
    options = {}
    if args.tune is not None:
        if args.engine != "parametrised":
            raise ValueError("--tune sets the parametrised engine's coefficients; drop it for "
                             f"--engine {args.engine}")
        options["tune"] = args.tune
    options.update(_geant4_options(args))
    summary = produce(args.out, n=args.n, energy=args.energy, theta=args.theta, phi=args.phi,
                      particle=args.particle, stack=args.stack, frame=args.frame, seed=args.seed,
                      shard_size=args.shard_size, spectrum=args.spectrum, engine=args.engine,
                      reduce=not args.no_reduce, grid=_parse_grid(args.grid),
                      workers=args.workers, progress=not args.no_progress,
                      shards=args.shards, engine_options=options, scheduler=args.scheduler)
    print(summary_line(summary))
    if "points_per_shower_before" in summary:
        print(f"points per shower: {summary['points_per_shower_before']:.0f} simulated, "
              f"{summary['points_per_shower_after']:.0f} after reduction")
    return 0


def _tune(args) -> int:
    import json
    from pathlib import Path

    from pcshower.io import read_metadata, read_parquet
    from pcshower.io._atomic import check_output
    from pcshower.simulate.api import resolve_stack
    from pcshower.simulate.production import MANIFEST
    from pcshower.simulate.tuning import fit_tune, write_tune

    check_output(args.out, overwrite=args.overwrite)
    data = Path(args.data)
    det_dir = data / "detector" if (data / "detector").is_dir() else data
    run = {}
    if (data / MANIFEST).is_file():
        run = json.loads((data / MANIFEST).read_text()).get("pcshower_run", {})
    stack_name = args.stack or run.get("stack")
    if not stack_name:
        raise ValueError(f"{data} records no stack: give --stack NAME")
    stack, geometry, name = resolve_stack(stack_name)
    limit = args.max_showers
    if limit is not None and limit < 10:
        raise ValueError(f"--max-showers must be at least 10, got {limit}")
    if args.response:
        return _tune_response(args, data, run, geometry, name, limit)
    det = read_parquet(det_dir)
    if det.frame != "detector":
        raise ValueError(f"{det_dir} holds {det.frame}-frame showers; a tune is fitted to the "
                         "detector frame (simulate with --frame detector or --frame both)")
    if limit is not None:
        det = det[:limit]
    meta = read_metadata(det_dir)["provenance"]
    if meta.get("engine") != "geant4":
        raise ValueError(f"{data} was made by the {meta.get('engine')!r} engine; tunes are "
                         "fitted to Geant4 showers")
    try:
        steps = tuple(int(x) for x in str(args.steps).split(","))
    except ValueError:
        steps = ()
    if len(steps) != 2 or min(steps) < 1:
        raise ValueError(f"--steps {args.steps}: give two positive integers LONG,RADIAL")
    par, stats = fit_tune(det, stack, geometry, seed=args.seed, steps=steps,
                          progress=not args.no_progress)
    e, th = det.energy.double(), det.theta.double()
    provenance = {k: meta.get(k) for k in ("engine", "generator", "geant4_version",
                                           "geant4_physics", "geant4_tables",
                                           "production_cut_mm") if k in meta}
    provenance.update(stack=name, showers=len(det), data=data.name,
                      run_seed=run.get("seed"), energy_gev=[float(e.min()), float(e.max())],
                      theta_deg=[float(th.min().rad2deg()), float(th.max().rad2deg())],
                      angles=meta.get("angles"))
    write_tune(args.out, par, stack, provenance, stats)
    lng, rad = stats["longitudinal"], stats["radial"]
    print(f"{args.out}: tune of {name} from {len(det)} Geant4 showers; longitudinal chi2/term "
          f"{lng['chi2_per_term_published']:.3g} (published) -> {lng['chi2_per_term']:.3g}, "
          f"radial chi2 {rad['chi2_published']:.3g} -> {rad['chi2']:.3g}")
    return 0
