"""The ``pcshower evaluate`` subcommand: compare a generated sample with a reference and write a report."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from pcshower.cli import seed_arg

__all__ = ["register", "load_sample"]

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="compare generated showers with a reference (metrics, plots, HTML report)",
        description="Compare GENERATED with REFERENCE: observables, W1 and separation power with "
                    "their reference-vs-reference floors, classifier AUCs, KPD/FPD, conditional "
                    "views; writes REPORT_DIR/index.html, metrics.json and PNGs. Inputs: pcshower "
                    "Parquet (showers or cell hits; a file or a shard directory), CaloClouds-style "
                    "HDF5 points, or CaloChallenge HDF5 voxels (needs --geometry).")
    p.add_argument("generated", help="generated sample (.parquet file/directory or .h5)")
    p.add_argument("reference", help="reference sample (.parquet file/directory or .h5)")
    p.add_argument("--geometry", help="geometry name or YAML file (e.g. ild, calochallenge_ds2); "
                                      "without it point clouds are compared as points")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="output directory")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold-mev", type=float, help="cell threshold in MeV")
    thr.add_argument("--threshold-mip", type=float,
                     help="cell threshold in MIP equivalents of the geometry (default 0.5; "
                          "CaloChallenge voxel files: their 15.15 keV)")
    p.add_argument("--max-showers", type=int, help="use at most this many showers of each sample")
    p.add_argument("--n-boot", type=int, default=10, help="reference splits for the floors (10)")
    p.add_argument("--seed", type=seed_arg(2 ** 32 - 2), default=0,
                   help="seed of the resampling and the classifier (default 0)")
    p.add_argument("--energy-bins", help="incident-energy bin edges in GeV, e.g. 1,10,50,100")
    p.add_argument("--theta-bins", help="polar-angle bin edges in degrees, e.g. 0,30,60,90")
    p.add_argument("--no-classifier", action="store_true", help="skip the gradient-boosting test")
    p.add_argument("--no-network", action="store_true", help="skip the Deep Sets classifier test")
    p.add_argument("--no-distances", action="store_true", help="skip KPD and FPD")
    p.add_argument("--network-epochs", type=int, default=5,
                   help="training epochs of the Deep Sets classifier (default 5)")
    p.add_argument("--names", default="generated,reference",
                   help="labels of the two samples, comma separated")
    p.set_defaults(func=run)


def _edges(text: str | None, name: str, scale: float = 1.0):
    if not text:
        return None
    try:
        values = [float(v) * scale for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if len(values) < 2 or any(b <= a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"--{name}: need at least two increasing edges, got {text!r}")
    return values


def load_sample(path: str, *, name: str, geometry, threshold_mev, max_showers, seed,
                settings: dict | None = None, progress: bool = True):
    """An :class:`~pcshower.evaluate.report.EvaluationSample` from a file of any supported kind."""
    from pcshower import io
    from pcshower.evaluate.report import (sample_from_calochallenge, sample_from_hits,
                                          sample_from_showers)

    settings = settings or {}
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    common = dict(name=name, seed=seed, progress=progress)
    if io.is_hdf5(p):
        kind = io.hdf5_kind(p)
        if kind == "calochallenge":
            if geometry is None:
                raise ValueError(f"{path} is a CaloChallenge voxel file: give --geometry (e.g. "
                                 "calochallenge_ds2) so voxels have layers and positions")
            inc, vox = io.read_calochallenge(p)
            if max_showers is not None:
                inc, vox = inc[:max_showers], vox[:max_showers]
            return sample_from_calochallenge(inc, vox, geometry, threshold_mev=threshold_mev,
                                             **common)
        if kind == "caloclouds":
            showers = io.read_caloclouds(p)
            return sample_from_showers(showers, geometry=geometry, threshold_mev=threshold_mev,
                                       max_showers=max_showers,
                                       layer_edges=settings.get("layer_edges"),
                                       radial_edges=settings.get("radial_edges"), **common)
        raise ValueError(f"{path}: an HDF5 file that is neither CaloChallenge ('incident_energies', "
                         "'showers') nor CaloClouds-style ('events', 'energy')")
    meta = io.read_metadata(p)
    if meta.get("kind") == "hits":
        if geometry is None:
            raise ValueError(f"{path} holds cell hits: give --geometry {meta.get('geometry') or ''}".strip())
        hits, cond = io.read_hits_parquet(p)
        if cond is None:
            raise ValueError(f"{path}: cell hits without incident energies cannot be evaluated "
                             "(write them with their conditions)")
        if max_showers is not None and len(hits) > max_showers:
            from pcshower.data import CellHits

            end = int(hits.ptr[max_showers])
            hits = CellHits(hits.cell_id[:end], hits.energy[:end], hits.ptr[:max_showers + 1],
                            hits.num_cells, hits.geometry)
            cond = {k: v[:max_showers] for k, v in cond.items()}
        return sample_from_hits(hits, cond, geometry, threshold_mev=threshold_mev,
                                radial_edges=settings.get("radial_edges"), **common)
    total = int(meta.get("num_showers", 0)) or None
    return sample_from_showers(io.iter_parquet(p, batch_size=2000), geometry=geometry,
                               threshold_mev=threshold_mev, max_showers=max_showers,
                               layer_edges=settings.get("layer_edges"),
                               radial_edges=settings.get("radial_edges"), total=total, **common)


def describe_input(path: str) -> tuple[str, str | None]:
    """``(level, geometry)`` of an input file without reading its showers: level is
    ``"physics"`` or ``"detector"`` for points, ``"cells"`` for hits and CaloChallenge voxels;
    geometry is the name recorded in the file (None when it records none)."""
    from pcshower import io

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if io.is_hdf5(p):
        kind = io.hdf5_kind(p)
        if kind == "caloclouds":
            import h5py

            with h5py.File(p, "r") as f:
                frame = str(f.attrs.get("frame", "detector"))
                geometry = str(f.attrs.get("geometry", "")) or None
            return frame, geometry
        return "cells", None
    meta = io.read_metadata(p)
    level = "cells" if meta.get("kind") == "hits" else str(meta.get("frame"))
    return level, meta.get("geometry") or None


def check_comparable(generated: str, reference: str, geometry_name: str | None) -> None:
    """Refuse samples that cannot be compared as given: points in different frames (or of
    different detectors) without a geometry to put both on cells, a physics-frame sample against
    cells, or a file recorded for another geometry than ``--geometry``."""
    described = {path: describe_input(path) for path in (generated, reference)}
    (lg, gg), (lr, gr) = described[generated], described[reference]
    how = ("give --geometry NAME to compare them on cells (physics-frame showers are placed and "
           "projected), or project first: pcshower project FILE --geometry NAME --out HITS.parquet")
    what = {"physics": "physics-frame points", "detector": "detector-frame points",
            "cells": "cell hits"}
    if geometry_name is None:
        if lg != lr:
            raise ValueError(f"{generated} holds {what.get(lg, lg)} and {reference} "
                             f"{what.get(lr, lr)}: {how}")
        if lg != "physics" and gg and gr and gg != gr:
            raise ValueError(f"{generated} is for geometry {gg!r} and {reference} for {gr!r}: "
                             "compare samples of one detector")
        return
    for path, (level, geo) in described.items():
        if level != "physics" and geo and geo != geometry_name:
            raise ValueError(f"{path} holds {'cell hits' if level == 'cells' else 'points'} of "
                             f"geometry {geo!r}, not --geometry {geometry_name!r}: give "
                             f"--geometry {geo}, or re-project the physics-frame showers")


def run(args: argparse.Namespace) -> int:
    from pcshower.evaluate.observables import mip_threshold_mev
    from pcshower.evaluate.report import compare_samples, write_report

    names = [n.strip() for n in args.names.split(",")]
    if len(names) != 2 or not all(names):
        raise ValueError(f"--names: expected two comma-separated labels, got {args.names!r}")
    if args.n_boot < 2:
        raise ValueError(f"--n-boot must be at least 2 to estimate a spread, got {args.n_boot}")
    energy_bins = _edges(args.energy_bins, "energy-bins")
    theta_bins = _edges(args.theta_bins, "theta-bins", math.pi / 180.0)
    geometry = None
    threshold = args.threshold_mev
    if args.geometry:
        from pcshower.geometry import load_geometry

        geometry = load_geometry(args.geometry)
        if threshold is None and args.threshold_mip is not None:
            threshold = mip_threshold_mev(geometry, args.threshold_mip)
    elif args.threshold_mev is not None or args.threshold_mip is not None:
        raise ValueError("a cell threshold needs cells: give --geometry too")
    from pcshower.io._atomic import check_output

    check_output(args.out, directory=True)
    check_comparable(args.generated, args.reference, geometry.name if geometry is not None else None)
    progress = not getattr(args, "quiet", False)
    ref = load_sample(args.reference, name=names[1], geometry=geometry, threshold_mev=threshold,
                      max_showers=args.max_showers, seed=args.seed + 1, progress=progress)
    gen = load_sample(args.generated, name=names[0], geometry=geometry,
                      threshold_mev=ref.settings.get("threshold_mev", threshold),
                      max_showers=args.max_showers, seed=args.seed + 2, settings=ref.settings,
                      progress=progress)
    result = compare_samples(gen, ref, n_boot=args.n_boot, seed=args.seed,
                             classifier=not args.no_classifier, network=not args.no_network,
                             distances=not args.no_distances, energy_bins=energy_bins,
                             theta_bins=theta_bins, network_epochs=args.network_epochs)
    result["inputs"] = {"generated": str(args.generated), "reference": str(args.reference),
                        "geometry": args.geometry}
    page = write_report(result, gen, ref, args.out)
    s = result["summary"]
    print(f"{names[0]} vs {names[1]}: {result['n_generated']} vs {result['n_reference']} showers; "
          f"W1/floor median {s.get('w1_ratio_median', math.nan):.2f}, max "
          f"{s.get('w1_ratio_max', math.nan):.2f} ({(s.get('worst_w1') or ['–'])[0]})", end="")
    if "classifier_gbdt" in result:
        c = result["classifier_gbdt"]
        print(f"; AUC {c['auc']:.3f} (floor {c['floor_auc']:.3f})", end="")
    print(f"\nreport: {page}")
    return 0

