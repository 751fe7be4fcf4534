"""Build the documented validation report and time a 100k-vs-100k ILD evaluation.

``python -m pcshower.evaluate.benchmark --n 3000 --out /tmp/pcshower-eval --docs-img docs/img``:

1. simulates two independent reference samples (parametrised GFlash engine, photons,
   10-100 GeV uniform, normal incidence on the ILD barrel, physics frame; seeds 1 and 2);
2. compares, on ILD cells, the second reference and three deliberately distorted copies of it
   (energy scale +2 %, transverse size +5 %, layer 10 dead) with the first, writing one report
   each and copying the PNGs to ``--docs-img`` as ``evaluate_<case>_*.png``;
3. with ``--bench-showers N``: projects both samples onto ILD, repeats the hits to N showers per
   sample (re-used showers: a timing test, not a physics one), writes them as Parquet hits and
   times ``pcshower evaluate`` on them end to end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]

CASES = ("reference2", "energy_scale_1.02", "transverse_1.05", "dead_layer_10")


def _simulate(n: int, seed: int, out: Path):
    """Simulated showers, cached as Parquet in ``out`` (the timing run re-uses them)."""
    from pcshower.io import read_parquet, write_parquet
    from pcshower.simulate import simulate

    path = out / f"simulated_n{n}_seed{seed}.parquet"
    if path.exists():
        return read_parquet(path)
    energy = np.random.default_rng(seed).uniform(10.0, 100.0, n)
    showers = simulate(n, energy, theta=np.pi / 2, phi=0.0, stack="ild", frame="physics",
                       seed=seed, progress=True)
    write_parquet(path, showers)
    return showers


def _row(case: str, r: dict) -> str:
    o = r["observables"]

    def ratio(name, metric="w1"):
        return f"{o[name][metric]['ratio']:.2f}" if name in o else "–"

    g, d = r.get("classifier_gbdt", {}), r.get("classifier_deepsets", {})
    k, f = r.get("kpd", {}), r.get("fpd", {})
    s = r["summary"]
    return (f"| {case} | {s['w1_ratio_median']:.2f} | {s['w1_ratio_max']:.1f} ({s['worst_w1'][0]}) | "
            f"{ratio('energy_ratio')} | {ratio('width_u')} | {ratio('layer_energy[10]')} | "
            f"{g.get('auc', float('nan')):.3f} ({g.get('floor_auc', float('nan')):.3f}) | "
            f"{d.get('auc', float('nan')):.3f} ({d.get('floor_auc', float('nan')):.3f}) | "
            f"{1e3 * k.get('value', float('nan')):.3g} ({1e3 * k.get('floor', float('nan')):.3g}) | "
            f"{1e3 * f.get('value', float('nan')):.3g} ({1e3 * f.get('floor', float('nan')):.3g}) |")


def report(n: int, out: Path, docs_img: Path | None, seed: int = 0) -> dict:
    from pcshower.evaluate.distortions import drop_layers, scale_energy, scale_transverse
    from pcshower.evaluate.report import compare_samples, sample_from_showers, write_report
    from pcshower.geometry import load_geometry

    out.mkdir(parents=True, exist_ok=True)
    geometry = load_geometry("ild")
    t0 = time.perf_counter()
    ref, ref2 = _simulate(n, 1, out), _simulate(n, 2, out)
    timings = {"simulate_s": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    reference = sample_from_showers(ref, name="reference (seed 1)", geometry=geometry, seed=seed + 1)
    timings["reference_observables_s"] = round(time.perf_counter() - t0, 1)
    samples = {
        "reference2": (ref2, None),
        "energy_scale_1.02": (scale_energy(ref2, 1.02), None),
        "transverse_1.05": (scale_transverse(ref2, 1.05), None),
        "dead_layer_10": (ref2, drop_layers(geometry, [10])),
    }
    results, rows = {}, []
    for case, (showers, transform) in samples.items():
        t0 = time.perf_counter()
        gen = sample_from_showers(showers, name=case, geometry=geometry, seed=seed + 2,
                                  radial_edges=reference.settings["radial_edges"],
                                  threshold_mev=reference.settings["threshold_mev"],
                                  transform_hits=transform)
        result = compare_samples(gen, reference, seed=seed, energy_bins=[10, 40, 70, 100])
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        write_report(result, gen, reference, out / case)
        results[case] = result
        rows.append(_row(case, result))
        print(rows[-1], flush=True)
        if docs_img is not None:
            docs_img.mkdir(parents=True, exist_ok=True)
            for png in (out / case).glob("evaluate_*.png"):
                if "display" in png.name and case != "reference2":
                    continue
                shutil.copy(png, docs_img / png.name.replace("evaluate_", f"evaluate_{case.replace('.', 'p')}_"))
    summary = {"n": n, "timings": timings, "table": rows,
               "results": {c: {k: r[k] for k in ("summary", "classifier_gbdt", "classifier_deepsets",
                                                  "kpd", "fpd", "wall_s", "n_generated",
                                                  "n_reference") if k in r}
                           for c, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def bench(n: int, showers_per_sample: int, out: Path) -> dict:
    """Time ``pcshower evaluate`` on ``showers_per_sample`` vs ``showers_per_sample`` ILD hits."""
    from pcshower.cli import main as cli_main
    from pcshower.data import CellHits
    from pcshower.geometry import load_geometry
    from pcshower.io import write_hits_parquet

    geometry = load_geometry("ild")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in (1, 2):
        showers = _simulate(n, seed, out)
        hits = geometry.project(showers, generator=torch.Generator().manual_seed(seed))
        reps = -(-showers_per_sample // n)
        counts = hits.num_hits.repeat(reps)[:showers_per_sample]
        total = int(counts.sum())
        ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=ptr[1:])
        tiled = CellHits(hits.cell_id.repeat(reps)[:total], hits.energy.repeat(reps)[:total], ptr,
                         hits.num_cells, hits.geometry)
        cond = {k: v.repeat(reps)[:showers_per_sample].numpy()
                for k, v in (("energy", showers.energy), ("theta", showers.theta),
                             ("phi", showers.phi), ("particle", showers.particle))}
        cond["position"] = showers.position.repeat(reps, 1)[:showers_per_sample].numpy()
        path = out / f"bench_hits_seed{seed}.parquet"
        write_hits_parquet(path, tiled, cond)
        files.append(path)
        del hits, tiled
    t0 = time.perf_counter()
    code = cli_main(["evaluate", str(files[1]), str(files[0]), "--geometry", "ild",
                     "--out", str(out / "bench_report"), "--energy-bins", "10,40,70,100"])
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    result = {"showers_per_sample": showers_per_sample, "distinct_showers": n, "exit_code": code,
              "wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
              "torch_threads": torch.get_num_threads()}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="distinct simulated showers per sample")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--docs-img", type=Path, help="copy the report PNGs here")
    p.add_argument("--bench-showers", type=int, help="also time N vs N showers of hits")
    p.add_argument("--skip-report", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_report:
        report(args.n, args.out, args.docs_img)
    if args.bench_showers:
        bench(args.n, args.bench_showers, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
