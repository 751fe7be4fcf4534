"""The ``pcshower train`` and ``pcshower generate`` subcommands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

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

    g = subparsers.add_parser(
        "generate", help="generate showers with the shipped (or a given) model",
        description="Generate showers and write them as Parquet (points in the detector frame, "
                    "plus OUT stem + '_hits.parquet' with the cell hits) or CaloChallenge HDF5 "
                    "(.h5: incident energies and dense cell energies, MeV). Angles in degrees; "
                    "ranges LOW:HIGH are sampled uniformly per shower.")
    g.add_argument("--geometry", default="ild", help="geometry name or YAML file; 'none' writes "
                                                     "physics-frame showers (default: ild)")
    g.add_argument("--energy", required=True, help="incident energy in GeV, or LOW:HIGH")
    g.add_argument("--theta", default="90", help="polar angle in degrees, or LOW:HIGH (default 90)")
    g.add_argument("--phi", default="0", help="azimuth in degrees, or LOW:HIGH (default 0)")
    g.add_argument("--n", type=int, default=1, help="number of showers")
    g.add_argument("--particle", default="photon")
    g.add_argument("--out", required=True, help="output .parquet or .h5 file")
    g.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    g.add_argument("--sampler", choices=["heun", "euler"], default=None)
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--batch-size", type=int, default=None, help="showers per pass (memory bound)")
    g.add_argument("--device", default=None)
    g.add_argument("--allow-extrapolation", action="store_true",
                   help="warn instead of failing outside the model's training range")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=_generate)


def _train(args) -> int:
    from pcshower.models.train import train

    metrics = train(args.config, args.data, args.out, resume=args.resume, device=args.device,
                    progress=not args.no_progress, init_from=args.init_from)
    print(f"trained {metrics['steps']} steps in {metrics['train_time_s']} s; "
          f"model written to {Path(args.out) / 'model.pt'}")
    return 0


def _generate(args) -> int:
    from pcshower.io import write_calochallenge, write_hits_parquet, write_parquet
    from pcshower.models.generate import generate

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".h5", ".hdf5"):
        raise ValueError(f"--out {out}: use a .parquet file (points + hits) or .h5/.hdf5 "
                         f"(CaloChallenge voxels)")
    geometry = None if args.geometry.lower() == "none" else args.geometry
    if geometry is None and suffix != ".parquet":
        raise ValueError("--geometry none writes physics-frame points: use a .parquet --out")
    rng = np.random.default_rng(args.seed)
    conds = {}
    for name in ("energy", "theta", "phi"):
        lo, hi = parse_range(getattr(args, name), name)
        conds[name] = rng.uniform(lo, hi, args.n) if hi > lo else np.full(args.n, lo)
    showers = generate(conds["energy"], conds["theta"], geometry, 1, phi=conds["phi"],
                       particle=args.particle, steps=args.steps, seed=args.seed,
                       device=args.device, model=args.model, batch_size=args.batch_size,
                       sampler=args.sampler, allow_extrapolation=args.allow_extrapolation,
                       progress=not args.no_progress)
    meta = {k: v for k, v in showers.metadata.items() if v is not None}
    if suffix == ".parquet":
        write_parquet(out, showers.to("cpu"), metadata=meta)
        written = [out]
        if showers.hits is not None:
            hits_path = out.with_name(out.stem + "_hits.parquet")
            write_hits_parquet(hits_path, showers.hits, showers.to("cpu"))
            written.append(hits_path)
    else:
        hits = showers.hits
        if hits.num_cells > 200_000:
            raise ValueError(f"geometry {args.geometry!r} has {hits.num_cells} cells: too many for "
                             f"dense CaloChallenge voxels; write .parquet (sparse hits) instead")
        write_calochallenge(out, showers.energy.cpu().numpy() * 1000.0,
                            hits.to_dense().cpu().numpy())
        written = [out]
    print(f"wrote {len(showers)} showers to {', '.join(map(str, written))}")
    return 0
