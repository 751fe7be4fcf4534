"""``pcshower simulate``: produce a sharded Parquet data set of reference showers."""

from __future__ import annotations

import argparse

from pcshower.simulate.api import ENGINE_NAMES

__all__ = ["register"]

_EXAMPLE = """examples:
  pcshower simulate --stack ild --particle photon --energy 10:100 --theta 30:90 --n 100000 --out ild_photons
  pcshower simulate --stack "20x[W:2.1,Si:0.5:active]+10x[W:4.2,Si:0.5:active]" \\
      --energy 1:1000 --spectrum log --theta 0 --frame detector --n 10000 --out siw_det
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
    p.add_argument("--seed", type=int, default=0, help="run seed (shard i uses (seed, i))")
    p.add_argument("--shard-size", type=int, default=10_000, help="showers per shard")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="parametrised")
    p.add_argument("--grid", default=None,
                   help="point-reduction grid: fine, medium, coarse or 'DX,DY,DZ' in the frame's "
                        "units (DZ may be 'layer' in the detector frame); default medium (physics) "
                        "or fine (detector)")
    p.add_argument("--no-reduce", action="store_true", help="keep every spot/step (no merging)")
    p.add_argument("--shards", default=None, metavar="START:STOP",
                   help="make only shards START..STOP-1 of the run (a farm job, or the first "
                        "shards of a long run); the data set is the same as one whole run's")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


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


def _run(args) -> int:
    from pcshower.io._atomic import check_output
    from pcshower.simulate.production import produce

    check_output(args.out, directory=True)
    summary = produce(args.out, n=args.n, energy=args.energy, theta=args.theta, phi=args.phi,
                      particle=args.particle, stack=args.stack, frame=args.frame, seed=args.seed,
                      shard_size=args.shard_size, spectrum=args.spectrum, engine=args.engine,
                      reduce=not args.no_reduce, grid=_parse_grid(args.grid),
                      workers=args.workers, progress=not args.no_progress,
                      shards=args.shards)
    print(f"{summary['directory']}: {summary['showers']} showers in {summary['shards']} shards "
          f"({summary['written']} written now, {summary['already_done']} already done"
          + (" of shards {}:{}".format(*summary["range"]) if "range" in summary else "") + ")")
    if "points_per_shower_before" in summary:
        print(f"points per shower: {summary['points_per_shower_before']:.0f} simulated, "
              f"{summary['points_per_shower_after']:.0f} after reduction")
    return 0
