"""``pcshower info`` and ``pcshower convert``: look into shower files and convert between formats."""

from __future__ import annotations

import json

import numpy as np

from pcshower.units import particle_name, rad_to_deg

__all__ = ["register", "describe"]


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="summarise a shower file (Parquet, directory or HDF5) "
                                           "or a model checkpoint",
                              description="Shower count, points per shower, condition ranges and "
                                          "metadata of a Parquet file or shard directory, a "
                                          "CaloClouds-style or a CaloChallenge HDF5 file; or, for "
                                          "a model checkpoint (.pt), its objective, network calls "
                                          "per shower and what it was trained on.")
    p.add_argument("file", help="Parquet file, shard directory, .h5/.hdf5 file, or .pt model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_info)

    c = subparsers.add_parser("convert", help="convert point clouds between Parquet and HDF5",
                              description="Convert between pcshower Parquet (file or shard "
                                          "directory) and CaloClouds-style padded HDF5 points. "
                                          "The output format follows the OUT suffix.")
    c.add_argument("input", help="Parquet file/directory or .h5/.hdf5 file")
    c.add_argument("output", help="output .parquet or .h5/.hdf5 file")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (without it, it is kept)")
    c.add_argument("--energy-scale", type=float, default=1.0,
                   help="multiply point energies when reading HDF5 (1000 for CaloClouds' GeV files)")
    c.add_argument("--layout", choices=("list", "flat"), default="list",
                   help="Parquet output: one row per shower with point lists (default), or 'flat': "
                        "a showers table plus OUT.points.parquet with one row per point, faster to "
                        "read (docs/formats.md)")
    c.add_argument("--compression", default="zstd", choices=("zstd", "lz4", "snappy", "none"),
                   help="Parquet compression (default zstd; lz4 or none read faster)")
    c.set_defaults(func=_convert)


def _range(values) -> list[float]:
    values = np.asarray(values, dtype=float)
    return [float(values.min()), float(values.max())] if values.size else []


def describe(path: str) -> dict:
    """The summary ``pcshower info`` prints, as a dict."""
    from pcshower import io

    if io.is_hdf5(path) and io.hdf5_kind(path) == "calochallenge":
        inc, vox = io.read_calochallenge(path)
        nonzero = (vox > 0).sum(axis=1)
        return {"file": str(path), "format": "CaloChallenge HDF5", "showers": int(len(inc)),
                "voxels": int(vox.shape[1]), "incident_energy_mev": _range(inc),
                "nonzero_voxels_min_median_max": [int(nonzero.min()), float(np.median(nonzero)),
                                                  int(nonzero.max())] if len(inc) else []}
    if io.is_hdf5(path):
        showers, meta, fmt = io.read_caloclouds(path), {}, "CaloClouds-style HDF5"
    else:
        meta = io.read_metadata(path)
        if meta.get("kind") == "hits":
            return _describe_hits(path, meta)
        showers, fmt = io.read_parquet(path), f"pcshower Parquet {meta.get('format_version')}"
        if meta.get("layout", "list") != "list":
            fmt += f" ({meta['layout']} layout, points in {meta.get('points_file')})"
    counts = showers.num_points.numpy()
    arrays = showers.to_numpy()
    particles = sorted({particle_name(c) for c in np.unique(arrays["particle"])})
    summary = {
        "file": str(path), "format": fmt, "showers": len(showers),
        "points_total": int(counts.sum()),
        "points_per_shower_min_median_max": ([int(counts.min()), float(np.median(counts)),
                                              int(counts.max())] if len(counts) else []),
        "frame": showers.frame, "geometry": showers.geometry, "features": list(showers.feature_names),
        "energy_gev": _range(arrays["energy"]), "theta_deg": _range(rad_to_deg(arrays["theta"])),
        "phi_deg": _range(rad_to_deg(arrays["phi"])), "particles": particles,
        "point_energy_sum_min_max": _range(np.bincount(
            np.repeat(np.arange(len(counts)), counts), weights=arrays["points"][:, 3],
            minlength=len(counts))),
    }
    if meta:
        summary["files"] = meta.get("num_files")
        summary["provenance"] = meta.get("provenance")
        summary["units"] = meta.get("units", {}).get("points")
    return summary


def _describe_hits(path, meta: dict) -> dict:
    """``pcshower info`` of a cell-hits file (``generate``'s OUT_hits.parquet, ``project``)."""
    from pcshower.io import read_hits_parquet

    hits, cond = read_hits_parquet(path)
    cells = hits.num_hits.numpy()
    total = np.bincount(np.repeat(np.arange(len(cells)), cells), weights=hits.energy.numpy(),
                        minlength=len(cells))
    summary = {"file": str(path), "format": f"pcshower Parquet {meta.get('format_version')} "
                                            "(cell hits)",
               "showers": len(hits), "geometry": hits.geometry, "cells": int(hits.num_cells),
               "hit_cells_per_shower_min_median_max": ([int(cells.min()), float(np.median(cells)),
                                                        int(cells.max())] if len(cells) else []),
               "cell_energy_sum_mev_min_max": _range(total),
               "outside_energy_mev_min_max": _range(hits.outside_energy.numpy())}
    if cond is not None:
        summary["energy_gev"] = _range(cond["energy"].numpy())
        summary["theta_deg"] = _range(rad_to_deg(cond["theta"].numpy()))
    summary["files"] = meta.get("num_files")
    summary["provenance"] = meta.get("provenance")
    return summary


def _info(args) -> int:
    if str(args.file).endswith(".pt"):
        from pcshower.models.checkpoint import describe_model

        summary = describe_model(args.file)
    else:
        summary = describe(args.file)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _convert(args) -> int:
    from pcshower import io
    from pcshower.io._atomic import check_output

    check_output(args.output, overwrite=args.overwrite, option="output")
    if io.is_hdf5(args.input):
        showers = io.read_caloclouds(args.input, energy_scale=args.energy_scale)
    else:
        showers = io.read_parquet(args.input)
    options = {}
    if not io.is_hdf5(args.output):
        options = {"layout": args.layout, "compression": args.compression}
    elif args.layout != "list" or args.compression != "zstd":
        raise SystemExit("--layout and --compression apply to Parquet output only")
    out = io.write_showers(args.output, showers, **options)
    print(f"wrote {len(showers)} showers ({showers.total_points} points) to {out}")
    return 0
