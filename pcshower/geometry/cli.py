"""``pcshower geometry list|show`` and ``pcshower project``: inspect geometries, project showers onto cells."""

from __future__ import annotations

import json
from pathlib import Path

from pcshower.cli import seed_arg

__all__ = ["register"]


def register(subparsers) -> None:
    g = subparsers.add_parser("geometry", help="list or describe detector geometries",
                              description="Built-in geometries live in pcshower/geometries/*.yaml; "
                                          "any path to a YAML file works where a name does.")
    gsub = g.add_subparsers(dest="geometry_command", metavar="ACTION")
    lst = gsub.add_parser("list", help="names and titles of the built-in geometries")
    lst.set_defaults(func=_list)
    show = gsub.add_parser("show", help="summary of a geometry, optionally a PNG drawing")
    show.add_argument("name", help="built-in name or path of a YAML file")
    show.add_argument("--png", metavar="FILE", help="write a drawing of the layers and cells")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=_show)
    g.set_defaults(func=lambda args: (g.print_help(), 0)[1])

    p = subparsers.add_parser("project", help="project showers onto the cells of a geometry",
                              description="Read physics- or detector-frame showers (Parquet), place "
                                          "them at their impact point and direction, apply the "
                                          "sampling response and sum per cell. OUT is Parquet "
                                          "cell hits (.parquet) or a CaloChallenge HDF5 file "
                                          "(.h5/.hdf5, CaloChallenge geometries only).")
    p.add_argument("input", help="Parquet file or shard directory of showers")
    p.add_argument("--geometry", required=True, help="built-in name or YAML path")
    p.add_argument("--out", required=True, help="output .parquet or .h5/.hdf5")
    p.add_argument("--seed", type=seed_arg(), default=0, help="seed of the sampling fluctuations")
    p.add_argument("--no-fluctuations", action="store_true",
                   help="mean visible energy, without sampling fluctuations")
    p.add_argument("--batch-size", type=int, default=1000, help="showers per projection pass")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (without it, it is kept)")
    p.set_defaults(func=_project)


def _list(args) -> int:
    from pcshower.geometry import list_geometries, load_geometry

    for name in list_geometries():
        geo = load_geometry(name)
        print(f"{name:28s} {geo.readout.kind:12s} {geo.num_cells:>11d} cells  {geo.title}")
    return 0


def _show(args) -> int:
    from pcshower.geometry import load_geometry
    from pcshower.io._atomic import check_output

    if args.png:
        check_output(args.png, overwrite=True, option="--png")
    geo = load_geometry(args.name)
    summary = geo.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        for key, value in summary.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            print(f"{key:22s} {value}")
    if args.png:
        from pcshower.geometry.draw import draw_geometry

        print(f"drawing written to {draw_geometry(geo, args.png)}")
    return 0


def _project(args) -> int:
    import torch
    from tqdm import tqdm

    from pcshower import io
    from pcshower.geometry import load_geometry
    from pcshower.io._atomic import check_output
    from pcshower.io.parquet import _concat_hits

    out = check_output(args.out, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    geo = load_geometry(args.geometry)
    to_hdf5 = io.is_hdf5(out)
    if not to_hdf5 and out.suffix.lower() != ".parquet":
        raise ValueError(f"{out}: unknown output format; use .parquet (cell hits) or .h5/.hdf5 "
                         "(CaloChallenge voxels)")
    if to_hdf5 and geo.readout.kind != "cylindrical":
        raise ValueError(f"{out}: CaloChallenge HDF5 needs a CaloChallenge geometry "
                         f"(calochallenge_ds1_photons, ..._ds2, ..._ds3), not {geo.name} "
                         f"({geo.readout.kind} readout); write .parquet hits instead")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    generator = torch.Generator().manual_seed(args.seed)
    parts, conditions, dense, energies = [], [], [], []
    total = io.count_showers(args.input)
    with tqdm(total=total, unit="shower", desc=f"project -> {geo.name}") as bar:
        for batch in io.iter_parquet(args.input, batch_size=args.batch_size):
            hits = geo.project(batch, generator=generator, fluctuate=not args.no_fluctuations)
            if to_hdf5:
                dense.append(geo.calochallenge_voxels(hits))
                energies.append(batch.energy.double() * 1000.0)
            else:
                parts.append(hits)
                conditions.append(batch.to_numpy())
            bar.update(len(batch))
    if not parts and not dense:
        raise ValueError(f"{args.input}: holds no showers to project")
    meta = {"generator": "pcshower project", "geometry": geo.name, "seed": args.seed,
            "fluctuate": not args.no_fluctuations, "input": str(args.input)}
    if to_hdf5:
        meta.update(geo.calochallenge_metadata())
        io.write_calochallenge(out, torch.cat(energies), torch.cat(dense), metadata=meta)
    else:
        hits = parts[0] if len(parts) == 1 else _concat_hits(parts)
        cond = {k: _cat([c[k] for c in conditions]) for k in conditions[0] if k not in ("points", "ptr")}
        io.write_hits_parquet(out, hits, cond, metadata=meta)
        outside = float(hits.outside_energy.sum())
        print(f"{len(hits)} showers, {hits.cell_id.numel()} cell hits; outside the readout: "
              f"{int(hits.outside_points.sum())} points, {outside:.1f} MeV")
    print(f"written {out}")
    return 0


def _cat(arrays):
    import numpy as np

    return np.concatenate(arrays)
