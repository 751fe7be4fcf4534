"""The parametrised engine, tuned and published, against held-out Geant4 showers on cells.

For each stack with a Geant4 validation set (``pcshower simulate --engine geant4 --frame both``,
recipe in docs/geant4.md), the parametrised engine simulates the same conditions (the set's own
energies and angles, one shower each) with the stack's tune and with the published
coefficients, in the detector frame, on the same reduction grid. Both go through the same
observable code as Geant4 (:func:`pcshower.simulate.geant4.compare.shower_observables`: layers,
5.088 mm cells with 0.1 MeV, radial profile about the axis), and through ``pcshower evaluate``
for the gradient-boosting classifier AUC with its Geant4-vs-Geant4 floor.

    python benchmarks/validate_parametrised.py --data ~/pcshower-data --stacks ild,cld \\
        --max-showers 3000 --json docs/bench/parametrised_vs_geant4.json --plots docs/img

Writes the JSON of every number (entries of other stacks already in the file are kept) and one
profile plot per stack.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from pcshower.io import read_parquet, write_parquet
from pcshower.simulate import simulate
from pcshower.simulate.api import local_angles, resolve_stack
from pcshower.simulate.geant4.compare import RADIAL_EDGES_MM, shower_observables

ENERGY_BINS = (10.0, 40.0, 70.0, 100.0)


def _summary(obs: dict, theta: np.ndarray) -> dict:
    long = obs["long"]  # [n, L] visible / E
    frac = long.mean(0)
    tot = np.maximum(long.sum(1), 1e-30)
    cog = (long * np.arange(long.shape[1])).sum(1) / tot
    e = obs["energy_gev"]
    ratio = obs["ew"] / (e * 1000.0)
    res = []
    for lo, hi in zip(ENERGY_BINS[:-1], ENERGY_BINS[1:]):
        sel = (e >= lo) & (e < hi)
        r = ratio[sel]
        res.append(float(r.std(ddof=1) / r.mean()) if sel.sum() > 2 else float("nan"))
    return {"n": int(len(e)), "layer_fraction": frac.tolist(),
            "visible_over_e": float(tot.mean()), "visible_over_e_err": float(tot.std() / math.sqrt(len(e))),
            "cog_layer": float(cog.mean()), "cog_layer_err": float(cog.std() / math.sqrt(len(e))),
            "cog_layer_rms": float(cog.std()),
            "resolution_by_energy": res, "hits": float(obs["hits"].mean()),
            "sigma_t_mm": float(obs["sigma_t_mm"].mean()),
            "mean_log10_cell_mev": float(obs["mean_log10_cell_mev"].mean()),
            "radial": obs["radial"].mean(0).tolist()}


def _compare(engine: dict, g4: dict, layers: slice) -> dict:
    f_e, f_g = np.array(engine["layer_fraction"]), np.array(g4["layer_fraction"])
    ratio = f_e / np.maximum(f_g, 1e-30)
    r_e, r_g = np.array(engine["radial"]), np.array(g4["radial"])
    return {"layer_ratio": ratio.tolist(),
            "layer_ratio_worst_in_range": float(np.max(np.abs(ratio[layers] - 1.0))),
            "layer_range": [layers.start, layers.stop - 1],
            "cog_ratio": engine["cog_layer"] / g4["cog_layer"],
            "cog_rms_ratio": engine["cog_layer_rms"] / g4["cog_layer_rms"],
            "visible_ratio": engine["visible_over_e"] / g4["visible_over_e"],
            "resolution_ratio": (np.array(engine["resolution_by_energy"])
                                 / np.array(g4["resolution_by_energy"])).tolist(),
            "hits_ratio": engine["hits"] / g4["hits"],
            "sigma_ratio": engine["sigma_t_mm"] / g4["sigma_t_mm"],
            "mean_log10_cell_difference_dex": engine["mean_log10_cell_mev"] - g4["mean_log10_cell_mev"],
            "radial_ratio": (r_e / np.maximum(r_g, 1e-30)).tolist()}


def _auc(generated: Path, reference: Path, geometry: str, out: Path, seed: int) -> dict:
    from pcshower.cli import main

    rc = main(["evaluate", str(generated), str(reference), "--geometry", geometry, "--out",
               str(out), "--no-network", "--no-distances", "--n-boot", "3", "--seed", str(seed)])
    if rc != 0:
        raise RuntimeError(f"pcshower evaluate failed for {generated} (exit {rc})")
    m = json.loads((out / "metrics.json").read_text())["classifier_gbdt"]
    return {"auc": m["auc"], "floor_auc": m["floor_auc"]}


def validate_stack(name: str, data: Path, max_showers: int, seed: int, work: Path,
                   classifier: bool = True) -> dict:
    g4_dir = data / f"g4_{name}_photons_val" / "detector"
    g4 = read_parquet(g4_dir)[:max_showers]
    stack, geometry, _ = resolve_stack(name)
    e = g4.energy.double().numpy()
    th, ph = g4.theta.double().numpy(), g4.phi.double().numpy()
    th_l, ph_l = local_angles(geometry, th, ph)
    obs = {"geant4": _summary(shower_observables(g4.points.numpy(), g4.ptr.numpy(), e, th_l, ph_l,
                                                 stack), th_l)}
    ref_file = work / f"{name}_geant4.parquet"
    write_parquet(ref_file, g4)
    result = {"stack": name, "showers": len(g4), "geant4_set": str(g4_dir.parent.name),
              "generator": g4.metadata.get("generator"), "engines": {}}
    L = stack.num_layers
    layers = slice(2, L - 2)
    for label, tune in (("tuned", "auto"), ("published", "published")):
        t0 = time.process_time()
        sim = simulate(len(e), e, th, ph, stack=name, frame="detector", seed=seed, grid="fine",
                       tune=tune)
        cpu = time.process_time() - t0
        s = _summary(shower_observables(sim.points.numpy(), sim.ptr.numpy(), e, th_l, ph_l,
                                        stack), th_l)
        entry = {"summary": s, "vs_geant4": _compare(s, obs["geant4"], layers),
                 "parametrisation": sim.metadata.get("parametrisation"),
                 "cpu_s_per_shower": cpu / len(e)}
        if classifier:
            f = work / f"{name}_{label}.parquet"
            write_parquet(f, sim)
            entry["classifier"] = _auc(f, ref_file, name, work / f"eval_{name}_{label}", seed)
        result["engines"][label] = entry
    result["geant4"] = obs["geant4"]
    return result


def plot(result: dict, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = result["stack"]
    fig, ax = plt.subplots(2, 2, figsize=(10, 6.5), sharex="col",
                           gridspec_kw={"height_ratios": [2, 1]})
    g = result["geant4"]
    layers = np.arange(len(g["layer_fraction"]))
    centres = 0.5 * (RADIAL_EDGES_MM[1:] + RADIAL_EDGES_MM[:-1])
    ax[0, 0].step(layers, g["layer_fraction"], where="mid", color="k", label="Geant4")
    ax[0, 1].step(centres, g["radial"], where="mid", color="k", label="Geant4")
    for label, colour in (("tuned", "C0"), ("published", "C3")):
        e = result["engines"][label]
        ax[0, 0].step(layers, e["summary"]["layer_fraction"], where="mid", color=colour,
                      label=f"parametrised, {label}")
        ax[1, 0].step(layers, e["vs_geant4"]["layer_ratio"], where="mid", color=colour)
        ax[0, 1].step(centres, e["summary"]["radial"], where="mid", color=colour,
                      label=f"parametrised, {label}")
        ax[1, 1].step(centres, e["vs_geant4"]["radial_ratio"], where="mid", color=colour)
    ax[0, 0].set_ylabel("visible energy / E per layer")
    ax[0, 1].set_ylabel("visible energy / E per mm")
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_xscale("log")
    for a in ax[1]:
        a.axhline(1.0, color="k", lw=0.8)
        a.axhspan(0.9, 1.1, color="0.9")
        a.set_ylim(0.4, 1.6)
        a.set_ylabel("/ Geant4")
    ax[1, 0].set_xlabel("active layer")
    ax[1, 1].set_xlabel("distance from the shower axis [mm]")
    ax[0, 0].legend(fontsize=8)
    fig.suptitle(f"{name}: photons 10-100 GeV, {result['showers']} held-out Geant4 showers "
                 f"({result['generator']})", fontsize=10)
    fig.tight_layout()
    path = out / f"parametrised_vs_geant4_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path.home() / "pcshower-data")
    ap.add_argument("--stacks", default="ild,cld,allegro")
    ap.add_argument("--max-showers", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=18100)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plots", type=Path, default=None)
    ap.add_argument("--no-classifier", action="store_true")
    args = ap.parse_args(argv)
    # stacks validated before keep their entry (a run per stack as its set becomes ready)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stacks.split(","):
            if not (args.data / f"g4_{name}_photons_val" / "detector").is_dir():
                print(f"{name}: no Geant4 validation set under {args.data}, skipped")
                continue
            r = validate_stack(name, args.data, args.max_showers, args.seed, Path(tmp),
                               classifier=not args.no_classifier)
            results[name] = r
            if args.plots:
                args.plots.mkdir(parents=True, exist_ok=True)
                plot(r, args.plots)
            for label, e in r["engines"].items():
                v = e["vs_geant4"]
                auc = e.get("classifier", {})
                print(f"{name} {label:9s}: worst layer {v['layer_ratio_worst_in_range']:.3f} "
                      f"(layers {v['layer_range'][0]}-{v['layer_range'][1]}), CoG "
                      f"{v['cog_ratio']:.4f}, E_vis {v['visible_ratio']:.4f}, hits "
                      f"{v['hits_ratio']:.3f}, sigma {v['sigma_ratio']:.3f}, resolution "
                      + "/".join(f"{x:.2f}" for x in v["resolution_ratio"]) + ", AUC "
                      f"{auc.get('auc', float('nan')):.3f} (floor {auc.get('floor_auc', float('nan')):.3f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
