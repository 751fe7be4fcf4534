"""Data recipe and fidelity evaluation of the shipped default model (results in docs/models.md).

Usage (the shipped model's recipe; the full command list with the training runs is in
docs/models.md, "The shipped default model")::

    # training showers (physics frame, GFlash photons in the ILD stack) on the training grid
    # (0.1 R_M, 0.1 R_M, 0.5 X0), and the same showers on the fine grid only (for fit-split)
    python benchmarks/default_model.py data flow/train_s1.parquet --n 15000 --seed 1 \\
        --grid 0.05,0.05,0.25 0.1,0.1,0.5
    python benchmarks/default_model.py data train_fine.parquet --n 15000 --seed 1 --grid 0.05,0.05,0.25
    # 35 000 more showers of another seed: the flow trains on flow/ (50 000 showers)
    python benchmarks/default_model.py data flow/extra_s3.parquet --n 35000 --seed 3 \\
        --grid 0.05,0.05,0.25 0.1,0.1,0.5
    # 10 000 held-out reference showers, fine grid only
    python benchmarks/default_model.py data reference.parquet --n 10000 --seed 2 --grid 0.05,0.05,0.25
    # model vs reference on ILD cells (the first --n-gen reference showers give the conditions,
    # the others are the reference)
    python benchmarks/default_model.py evaluate pcshower/weights/default.pt reference.parquet \\
        --n-gen 1000 --steps 16 --seed 124 --out eval_default
    # what the training grid alone costs: reference showers merged on it (and split back) instead
    # of a model; --spread-data: split over boxes measured on those (finer) training showers
    python benchmarks/default_model.py grid-baseline reference.parquet --grid 0.1,0.1,0.5 \\
        --split 4 --n-gen 1000 --out eval_grid

Showers: E uniform in 10-100 GeV, global theta uniform in 30-90 deg, phi = 0, from the
parametrised engine in the ILD stack's equivalent medium. The physics frame is the shower's own
axis frame, so the engine runs at normal incidence and the showers carry the global theta.
Points go through each ``--grid`` in turn (energy-weighted centroids, see
:func:`pcshower.simulate.reduce_points`). One thread throughout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pcshower.data import Showers
from pcshower.evaluate import evaluate
from pcshower.geometry import load_geometry
from pcshower.io import iter_parquet, read_parquet, write_parquet
from pcshower.models.checkpoint import load_model
from pcshower.models.split import measure_voxel_spread, split_points, spread_boxes
from pcshower.simulate.parametrised import simulate_parametrised
from pcshower.simulate.reduce import reduce_points
from tqdm import tqdm

ENERGY_GEV = (10.0, 100.0)
THETA_DEG = (30.0, 90.0)
CHUNK = 1000


def _grid(text: str) -> tuple:
    try:
        grid = tuple(float(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) <= 0:
        raise argparse.ArgumentTypeError(f"a grid is three positive numbers dx,dy,dz (R_M, R_M, X0), got {text!r}")
    return grid


def make_data(out: str, n: int, seed: int, grids: list[tuple], tune: str = "published") -> Showers:
    stack = load_geometry("ild").stack
    g = torch.Generator().manual_seed(seed)
    energy = ENERGY_GEV[0] + (ENERGY_GEV[1] - ENERGY_GEV[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    theta = torch.deg2rad(THETA_DEG[0] + (THETA_DEG[1] - THETA_DEG[0])
                          * torch.rand(n, generator=g, dtype=torch.float64))
    chunks = []
    for i, a in enumerate(tqdm(range(0, n, CHUNK), desc="simulate", unit="chunk")):
        sh = simulate_parametrised(energy[a:a + CHUNK], 0.0, 0.0, "photon", stack,
                                   seed=seed * 1000 + i, tune=tune)
        for grid in grids:
            sh = reduce_points(sh, grid)
        chunks.append(sh._replace(theta=theta[a:a + CHUNK], metadata={}))
    showers = Showers.concat(chunks)
    write_parquet(out, showers, metadata={
        "generator": "pcshower-parametrised-gflash", "tune": str(tune), "seed": seed,
        "geometry_stack": "ild",
        "grids": [list(g) for g in grids], "energy_gev": list(ENERGY_GEV),
        "theta_deg": list(THETA_DEG), "particle": "photon"})
    print(f"{out}: {len(showers)} showers, {float(showers.num_points.double().mean()):.0f} points per shower")
    return showers


def _compare(generated: Showers, reference: Showers, out: str, name: str, extra: dict) -> dict:
    t0 = time.time()
    res = evaluate(generated, reference, geometry=load_geometry("ild"), out_dir=out,
                   names=(name, "GFlash reference"), network=False)
    res.update(extra, n_generated=len(generated), n_reference=len(reference),
               evaluation_seconds=round(time.time() - t0, 1))
    Path(out, "result.json").write_text(json.dumps(res, indent=1, default=str))
    obs = res["observables"]
    for key, v in obs.items():
        if "[" not in key:
            print(f"{key:24s} W1 {v['w1']['value']:.4g}  floor {v['w1']['floor']:.4g}  ratio {v['w1']['ratio']:.2f}")
    for prefix in ("layer_energy", "layer_occupancy", "radial_energy"):
        r = sorted(v["w1"]["ratio"] for k, v in obs.items() if k.startswith(prefix + "["))
        print(f"{prefix:24s} median ratio {r[len(r) // 2]:.2f}  max {r[-1]:.2f}")
    print("GBDT AUC", res.get("classifier_gbdt"))
    print("summary", res["summary"])
    return res


def evaluate_model(model_path: str, reference: str, n_gen: int, steps: int, out: str, seed: int) -> dict:
    torch.set_num_threads(1)
    showers = read_parquet(reference)
    cond, ref = showers[:n_gen], showers[n_gen:]
    model = load_model(model_path)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    parts = [model.sample(b.energy, b.theta, torch.zeros(len(b)), steps=steps, generator=g)
             for b in tqdm(cond.split(250), desc="generate", unit="batch")]
    gen = Showers.concat(parts)
    t_gen = time.time() - t0
    print(f"generated {len(gen)} showers ({float(gen.num_points.double().mean()):.0f} points each) in {t_gen:.1f} s")
    return _compare(gen, ref, out, "pcshower model", {
        "model": model_path, "steps": steps, "seed": seed, "generation_seconds": round(t_gen, 1),
        "points_per_shower": float(gen.num_points.double().mean())})


def grid_baseline(reference: str, grid: tuple, split: int, n_gen: int, out: str, seed: int,
                  spread_data: str | None = None) -> dict:
    torch.set_num_threads(1)
    showers = read_parquet(reference)
    merged = reduce_points(showers[:n_gen], grid)
    box, how = grid, "the voxel"
    if spread_data is not None:
        table, _ = measure_voxel_spread(iter_parquet(spread_data, batch_size=250, max_showers=2000),
                                        grid)
        box, how = spread_boxes(merged.points, table), f"boxes measured on {spread_data}"
    pts, ptr = split_points(merged.points, merged.ptr, split, box, torch.Generator().manual_seed(seed))
    return _compare(merged._replace(points=pts, ptr=ptr), showers[n_gen:], out,
                    f"reference on grid {grid} split x{split}", {"grid": list(grid), "split": split,
                                                                 "split_over": how})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="simulate and reduce training or reference showers")
    d.add_argument("out")
    d.add_argument("--n", type=int, required=True)
    d.add_argument("--seed", type=int, required=True)
    d.add_argument("--grid", type=_grid, nargs="*", default=[], help="reduction grids, applied in turn")
    d.add_argument("--tune", default="published",
                   help="the engine's coefficients: published (Grindhammer & Peters, what the "
                        "shipped model was trained on; the default, so the recipe reproduces its "
                        "data), auto (the stack's shipped Geant4 tune) or a tune file")
    e = sub.add_parser("evaluate", help="a model against the reference on ILD cells")
    e.add_argument("model")
    e.add_argument("reference")
    e.add_argument("--n-gen", type=int, default=1000)
    e.add_argument("--steps", type=int, default=8)
    e.add_argument("--seed", type=int, default=123)
    e.add_argument("--out", required=True)
    b = sub.add_parser("grid-baseline", help="reference merged on a grid (and split) vs reference")
    b.add_argument("reference")
    b.add_argument("--grid", type=_grid, required=True)
    b.add_argument("--split", type=int, default=1)
    b.add_argument("--spread-data", default=None,
                   help="finer training showers: split over per-point boxes measured on them "
                        "(pcshower fit-split) instead of the voxel")
    b.add_argument("--n-gen", type=int, default=1000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.command == "data":
        make_data(a.out, a.n, a.seed, a.grid, a.tune)
    elif a.command == "evaluate":
        evaluate_model(a.model, a.reference, a.n_gen, a.steps, a.out, a.seed)
    else:
        grid_baseline(a.reference, a.grid, a.split, a.n_gen, a.out, a.seed, a.spread_data)


if __name__ == "__main__":
    main()
