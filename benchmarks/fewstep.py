"""The few-step comparison: fidelity and speed of each (backbone, objective) model at 1-31 network
calls, on one held-out reference, in one run (results in docs/fewstep.md).

Usage (the commands that made docs/bench/fewstep.json; data and runs in docs/fewstep.md)::

    # fidelity on ILD cells against held-out showers: each model at the sampler settings of its
    # objective; resumable (settings already in the JSON are skipped)
    python benchmarks/fewstep.py quality --reference reference.parquet --n-gen 2000 \\
        --model epic/edm=pcshower/weights/default.pt --model epic/fm=epic_fm.pt \\
        --model epic/cd=run_epic_cd/model.pt --model transformer/fm=transformer_fm.pt \\
        --json docs/bench/fewstep.json
    # generate() ms/shower at batch 1 and 16 on one thread (50 GeV ILD photons, physics frame,
    # calibration and split included), beside the parametrised and the Geant4 engine in the
    # same run
    python benchmarks/fewstep.py speed --json docs/bench/fewstep.json
    python benchmarks/fewstep.py plot docs/bench/fewstep.json --out docs/img/fewstep_pareto.png

The first ``--n-gen`` reference showers give the conditions (E, theta) of the generated ones;
the others are the reference. Generated showers are physics-frame, placed at normal incidence
in the ILD geometry and compared on its cells (``pcshower.evaluate``: W1 of every observable
over its reference-vs-reference floor, and the gradient-boosting classifier AUC with its
floor). One thread throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pcshower.data import Showers
from pcshower.evaluate.report import compare_samples, sample_from_showers
from pcshower.geometry import load_geometry
from pcshower.io import read_parquet
from pcshower.io._atomic import atomic_path
from pcshower.models.checkpoint import load_model
from tqdm import tqdm

from default_model import _grid  # benchmarks/ is the script's directory: the same grid syntax

#: Sampler settings per objective: (sampler, steps).
SETTINGS = {
    "edm": [("heun", s) for s in (1, 2, 4, 8, 16)],
    "flow_matching": [("euler", s) for s in (1, 2, 4, 8, 16)] + [("midpoint", s) for s in (1, 2, 4)],
    "consistency": [("multistep", s) for s in (1, 2, 4)],
}


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"quality": [], "speed": {}}


def _save_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1, default=str))


def _models(specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model takes NAME=CHECKPOINT, got {spec!r}")
        out[name] = path
    return out


def _settings(objective: str, only: set | None) -> list:
    """The (sampler, steps) settings of an objective, restricted to ``only`` when given."""
    return [s for s in SETTINGS[objective] if only is None or s in only]


def quality(models: dict, reference: str, n_gen: int, json_path: Path, seed: int,
            max_calls: int, only: set | None = None, shape_grid: tuple | None = None) -> dict:
    """Fidelity of each model at each setting. ``shape_grid``: instead of the flow's sample, give
    every generated shower the shape (point count, slice and ring fractions, E_vis, CoG) of its
    conditioning shower merged on this grid (the models' training grid): a test of the point
    network and calibration alone, for point networks trained on other data than their flow."""
    torch.set_num_threads(1)
    result = _load_json(json_path)
    done = {(q["model"], q["sampler"], q["steps"]) for q in result["quality"]}
    showers = read_parquet(reference)
    if len(showers) <= n_gen:
        raise SystemExit(f"{reference} holds {len(showers)} showers: need more than --n-gen {n_gen}")
    cond, ref = showers[:n_gen], showers[n_gen:]
    if shape_grid is not None:
        from pcshower.simulate.reduce import reduce_points

        cond = reduce_points(cond, shape_grid)
    geometry = load_geometry("ild")
    ref_sample = sample_from_showers(ref, name="reference", geometry=geometry, seed=seed + 1)
    del showers, ref
    result.update(reference=str(reference), n_generated=n_gen, n_reference=len(ref_sample),
                  geometry="ild")
    for name, path in models.items():
        model = load_model(path)
        for sampler, steps in _settings(model.objective.name, only):
            calls = model.network_calls(steps, sampler)
            if (name, sampler, steps) in done or calls > max_calls:
                continue
            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            parts = [model.sample(b.energy, b.theta, torch.zeros(len(b)), steps=steps,
                                  sampler=sampler, generator=g,
                                  shape=None if shape_grid is None else model.codec.measure_showers(b))
                     for b in tqdm(cond.split(250), desc=f"{name} {sampler} {steps}", unit="batch")]
            gen = Showers.concat(parts)
            t_gen = time.perf_counter() - t0
            gen_sample = sample_from_showers(
                gen, name=name, geometry=geometry, seed=seed + 2,
                threshold_mev=ref_sample.settings.get("threshold_mev"),
                layer_edges=ref_sample.settings.get("layer_edges"),
                radial_edges=ref_sample.settings.get("radial_edges"))
            res = compare_samples(gen_sample, ref_sample, network=False, distances=False, seed=seed)
            # the summary compare_samples makes: cell-level comparisons leave the point-cloud
            # diagnostics (point count, point energies) out of the maxima, as pcshower evaluate does
            summary = res["summary"]
            auc = res.get("classifier_gbdt", {})
            row = {"model": name, "checkpoint": str(path), "objective": model.objective.name,
                   "backbone": model.config["backbone"], "sampler": sampler, "steps": steps,
                   "network_calls": calls, "generation_s": round(t_gen, 1),
                   "shapes": "flow" if shape_grid is None else f"conditioning showers on {shape_grid}",
                   "auc": auc.get("auc"), "auc_floor": auc.get("floor_auc"),
                   "w1_ratio_max": summary.get("w1_ratio_max"),
                   "w1_ratio_median": summary.get("w1_ratio_median"),
                   "worst_w1": summary.get("worst_w1"),
                   "diagnostics": summary.get("diagnostics", []),
                   "w1_ratio": {k: v["w1"]["ratio"] for k, v in res["observables"].items()}}
            print(json.dumps({k: row[k] for k in ("model", "sampler", "steps", "network_calls",
                                                  "auc", "auc_floor", "w1_ratio_max")}), flush=True)
            result["quality"].append(row)
            _save_json(json_path, result)
    return result


def _parse_settings(text: str) -> set:
    out = set()
    for item in text.split(","):
        sampler, sep, steps = item.strip().partition(":")
        if not sep or not steps.isdigit():
            raise argparse.ArgumentTypeError(f"settings are SAMPLER:STEPS, got {item!r}")
        out.add((sampler, int(steps)))
    return out


def _best_ms(fn, n: int, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) / n * 1e3


def speed(models: dict, json_path: Path, batch_sizes=(1, 16), n: int = 16,
          geant4_showers: int = 8, only: set | None = None) -> dict:
    """ms/shower of ``generate()`` per (model, sampler, steps, batch), and of the two engines."""
    from pcshower import generate
    from pcshower.simulate import simulate

    torch.set_num_threads(1)
    result = _load_json(json_path)
    rows = []
    energy, theta = 50.0, 90.0
    # global angles for a geometry name: theta = 90 deg is normal incidence on the ILD barrel;
    # one warm-up shower first (Geant4's initialisation is paid once per process)
    simulate(1, energy, math.pi / 2, 0.0, stack="ild", engine="geant4", seed=0)
    t0 = time.perf_counter()
    simulate(geant4_showers, energy, math.pi / 2, 0.0, stack="ild", engine="geant4", seed=1)
    g4 = (time.perf_counter() - t0) / geant4_showers * 1e3
    param = _best_ms(lambda: simulate(n, energy, math.pi / 2, 0.0, stack="ild", seed=1), n)
    engines = {"geant4_ms_per_shower": round(g4, 1), "geant4_showers": geant4_showers,
               "parametrised_ms_per_shower": round(param, 2)}
    print(json.dumps(engines), flush=True)
    for name, path in models.items():
        model = load_model(path)
        for sampler, steps in _settings(model.objective.name, only):
            for b in batch_sizes:
                ms = _best_ms(lambda: generate(energy, theta, geometry=None, n=n, steps=steps,
                                               sampler=sampler, model=model, batch_size=b, seed=0,
                                               progress=False), n)
                rows.append({"model": name, "sampler": sampler, "steps": steps,
                             "network_calls": model.network_calls(steps, sampler), "batch": b,
                             "ms_per_shower": round(ms, 2)})
                print(json.dumps(rows[-1]), flush=True)
    result["speed"] = {"energy_gev": energy, "theta_deg": theta, "threads": 1, "showers": n,
                       **engines, "rows": rows,
                       "note": "generate() in the physics frame (flow, point network, calibration, "
                               "split); engines: physics-frame showers of the ILD stack"}
    _save_json(json_path, result)
    return result


def plot(json_path: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = _load_json(json_path)
    speed_rows = {(r["model"], r["sampler"], r["steps"]): r["ms_per_shower"]
                  for r in result.get("speed", {}).get("rows", []) if r["batch"] == 1}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(q["model"] for q in result["quality"]):
        rows = sorted((q for q in result["quality"] if q["model"] == name),
                      key=lambda q: q["network_calls"])
        for sampler in dict.fromkeys(q["sampler"] for q in rows):
            sel = [q for q in rows if q["sampler"] == sampler]
            x = [speed_rows.get((name, sampler, q["steps"]), float("nan")) for q in sel]
            if all(v != v for v in x):  # no timing: plot against network calls
                x = [q["network_calls"] for q in sel]
            label = f"{name} ({sampler})"
            axes[0].plot(x, [q["auc"] for q in sel], "o-", label=label)
            axes[1].plot(x, [q["w1_ratio_max"] for q in sel], "o-", label=label)
    floor = [q["auc_floor"] for q in result["quality"] if q.get("auc_floor")]
    if floor:
        axes[0].axhline(sum(floor) / len(floor), color="k", ls=":", label="floor")
    xlabel = ("generate() ms/shower, batch 1, one thread" if speed_rows
              else "network calls per shower")
    for ax, ylabel in zip(axes, ("GBDT classifier AUC", "worst W1 / floor")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    s = result.get("speed", {})
    if s:
        for ax in axes:
            ax.axvline(s["geant4_ms_per_shower"], color="r", ls="--", lw=1)
            ax.text(s["geant4_ms_per_shower"], ax.get_ylim()[1], " Geant4", color="r",
                    va="top", fontsize=8)
    fig.suptitle(f"few-step comparison: {result.get('n_generated')} generated vs "
                 f"{result.get('n_reference')} held-out showers on ILD cells")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


def table(json_path: Path) -> str:
    """The comparison as a Markdown table: one row per (model, sampler, steps), with
    ms/shower at batch 1 and 16 where the speed run measured them."""
    result = _load_json(json_path)
    speed_rows = {(r["model"], r["sampler"], r["steps"], r["batch"]): r["ms_per_shower"]
                  for r in result.get("speed", {}).get("rows", [])}
    lines = ["| model | sampler | steps | network calls | GBDT AUC (floor) | worst W1/floor "
             "| median W1/floor | worst observable | ms/shower batch 1 | batch 16 |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for q in sorted(result["quality"], key=lambda q: (q["model"], q["network_calls"])):
        ms = [speed_rows.get((q["model"], q["sampler"], q["steps"], b)) for b in (1, 16)]
        lines.append(
            f"| {q['model']} | {q['sampler']} | {q['steps']} | {q['network_calls']} | "
            f"{q['auc']:.3f} ({q['auc_floor']:.3f}) | {q['w1_ratio_max']:.1f} | "
            f"{q['w1_ratio_median']:.2f} | {(q['worst_w1'] or ['–'])[0]} | "
            + " | ".join("–" if m is None else f"{m:.0f}" for m in ms) + " |")
    s = result.get("speed", {})
    if s:
        lines += ["", f"Same run, one thread, {s['energy_gev']:g} GeV ILD photons: the Geant4 engine "
                      f"{s['geant4_ms_per_shower']:.0f} ms/shower ({s['geant4_showers']} showers), "
                      f"the parametrised engine {s['parametrised_ms_per_shower']:.1f} ms/shower."]
    return "\n".join(lines)


def merge(out: Path, parts: list[Path]) -> dict:
    """One JSON from quality runs made apart (same reference and seed), e.g. in parallel."""
    result = _load_json(out)
    for part in parts:
        other = _load_json(part)
        known = {(q["model"], q["sampler"], q["steps"]) for q in result["quality"]}
        for key in ("reference", "n_generated", "n_reference", "geometry"):
            if key in other and result.get(key, other[key]) != other[key]:
                raise SystemExit(f"{part}: {key} {other[key]!r} differs from {result[key]!r}")
            result.setdefault(key, other.get(key))
        result["quality"] += [q for q in other["quality"]
                              if (q["model"], q["sampler"], q["steps"]) not in known]
    _save_json(out, result)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT")
    q.add_argument("--reference", required=True)
    q.add_argument("--n-gen", type=int, default=2000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-calls", type=int, default=31)
    q.add_argument("--json", type=Path, required=True)
    q.add_argument("--shapes-from-grid", type=_grid, default=None,
                   help="DX,DY,DZ: shapes of the conditioning showers merged on this grid instead "
                        "of the flow's (tests the point network alone)")
    q.add_argument("--settings", type=_parse_settings, default=None,
                   help="only these SAMPLER:STEPS settings, comma-separated (default: all of "
                        "each objective's)")
    s = sub.add_parser("speed")
    s.add_argument("--settings", type=_parse_settings, default=None)
    s.add_argument("--json", type=Path, required=True)
    s.add_argument("--model", action="append", default=None,
                   help="NAME=CHECKPOINT (default: the models of the JSON's quality rows)")
    p = sub.add_parser("plot")
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table")
    t.add_argument("json", type=Path)
    m = sub.add_parser("merge", help="add the quality rows of other JSON files to JSON")
    m.add_argument("json", type=Path)
    m.add_argument("parts", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "quality":
        quality(_models(args.model), args.reference, args.n_gen, args.json, args.seed,
                args.max_calls, args.settings, args.shapes_from_grid)
    elif args.cmd == "speed":
        models = (_models(args.model) if args.model else
                  {q["model"]: q["checkpoint"] for q in _load_json(args.json)["quality"]})
        speed(models, args.json, only=args.settings)
    elif args.cmd == "plot":
        plot(args.json, args.out)
    elif args.cmd == "table":
        print(table(args.json))
    else:
        merge(args.json, args.parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
