"""The model card's numbers: a model against held-out Geant4 showers on the cells of each stack.

For each stack with a Geant4 validation set (``pcshower simulate --engine geant4 --frame both``,
recipe in docs/geant4.md; its detector-frame half is the reference), the model generates one
shower at each validation shower's own energy, angles and impact point (``pcshower.generate``
with ``position``), in that stack's geometry. Both samples go through ``pcshower.evaluate`` on the
stack's cells: W1 and separation power per observable with their Geant4-vs-Geant4 floors, the
gradient-boosting classifier AUC with its floor, conditional views, and the reconstruction-level
checks (calibrated energy response/resolution and the PCA shower-axis angle,
:mod:`pcshower.evaluate.reconstruction`). One thread; generation is timed.

    python benchmarks/model_card.py MODEL --data ~/pcshower-data --stacks ild,cld,allegro \\
        --max-showers 10000 --json docs/bench/model_card.json --plots docs/img --reports eval_card

Writes (and merges into) the JSON, the profile and reconstruction plots of each stack
(``model_card_<stack>_*.png``) and a full HTML report per stack under ``--reports``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pcshower import generate
from pcshower.evaluate import evaluate
from pcshower.geometry import load_geometry
from pcshower.io import read_parquet
from pcshower.models.checkpoint import load_model
from pcshower.models.cli import _checkpoint_arg

ENERGY_BINS = (10.0, 40.0, 70.0, 100.0)
THETA_BINS_DEG = {"ild": (30, 50, 70, 90), "cld": (30, 50, 70, 90), "allegro": (45, 60, 75, 90)}


#: Generation-time corrections that can be switched off on a loaded model (``--variants``):
#: name -> the config change. The card's choice of corrections is made with these on showers
#: the card itself does not use (``--first``).
VARIANTS = {
    "as-fitted": {},
    "no-core-centring": {"core_radius": None},
    "no-depth-snap": {"split.snap_depth": False},
    "uniform-split-box": {"split.spread": False},
    "no-split": {"split.factor": 1},
    "no-calibration": {"calibrate": False},
}


def _reference(data: Path, stack: str, first: int, max_showers: int):
    path = data / f"g4_{stack}_photons_val" / "detector"
    if not path.is_dir():
        raise SystemExit(f"no Geant4 validation set at {path}: make it with the recipe in "
                         "docs/geant4.md (pcshower simulate --engine geant4 --frame both)")
    ref = read_parquet(path)
    if len(ref) <= first:
        raise SystemExit(f"{path} holds {len(ref)} showers, none after --first {first}")
    return ref[first:first + max_showers], path


def _variant(model, name: str):
    """A copy of ``model`` with the corrections of variant ``name`` switched off."""
    import copy

    change = VARIANTS[name]
    m = copy.deepcopy(model)
    for key, value in change.items():
        if key == "calibrate":
            continue
        section, _, leaf = key.rpartition(".")
        (m.config[section] if section else m.config)[leaf] = value
    if change.get("calibrate") is False:
        sample = m.sample
        m.sample = lambda *a, **k: sample(*a, **{**k, "calibrate": False})
    return m


def card_for_stack(model, model_path: str, data: Path, stack: str, max_showers: int, seed: int,
                   report_dir: Path, batch_size: int, first: int = 0, response="auto") -> dict:
    ref, path = _reference(data, stack, first, max_showers)
    pos = ref.position.double().numpy()
    t0 = time.perf_counter()
    gen = generate(ref.energy.double().numpy(), np.degrees(ref.theta.double().numpy()), stack,
                   phi=np.degrees(ref.phi.double().numpy()), position=pos, model=model, seed=seed,
                   batch_size=batch_size, response=response, progress=True)
    t_gen = time.perf_counter() - t0
    theta_bins = [math.radians(t) for t in THETA_BINS_DEG.get(stack, (0, 30, 60, 90))]
    res = evaluate(gen, ref, geometry=load_geometry(stack), out_dir=report_dir / stack,
                   names=("pcshower model", "Geant4"), network=False, energy_bins=ENERGY_BINS,
                   theta_bins=theta_bins, seed=seed, progress=True)
    obs = res["observables"]
    summary = res["summary"]
    auc = res.get("classifier_gbdt", {})
    entry = {
        "stack": stack, "reference": str(path), "reference_showers": [first, first + len(ref)],
        "n_reference": len(ref), "n_generated": len(gen),
        "model": model_path, "model_sha256": (getattr(model, "checkpoint_info", {}) or {}).get("sha256"),
        "seed": seed, "layer_response": gen.metadata.get("layer_response"),
        "generation_s": round(t_gen, 1),
        "generation_ms_per_shower": round(1e3 * t_gen / max(len(gen), 1), 2),
        "gbdt_auc": auc.get("auc"), "gbdt_auc_floor": auc.get("floor_auc"),
        "w1_ratio_median": summary.get("w1_ratio_median"),
        "w1_ratio_max": summary.get("w1_ratio_max"), "worst_w1": summary.get("worst_w1"),
        "w1_ratio": {k: v["w1"]["ratio"] for k, v in obs.items() if "[" not in k},
        "profile_w1_ratio_median": {
            p: float(np.median([v["w1"]["ratio"] for k, v in obs.items() if k.startswith(p + "[")]))
            for p in ("layer_energy", "layer_occupancy", "radial_energy")},
        "means": res.get("means"),
        "reconstruction": res.get("reconstruction"),
        "conditional": [{"energy_gev": c["energy_gev"], "theta_rad": c["theta_rad"],
                         "n_reference": c["n_reference"],
                         "w1_ratio_median": c.get("summary", {}).get("w1_ratio_median"),
                         "w1_ratio_max": c.get("summary", {}).get("w1_ratio_max")}
                        for c in res.get("conditional", [])],
    }
    print(json.dumps({k: entry[k] for k in ("stack", "n_reference", "gbdt_auc", "gbdt_auc_floor",
                                            "w1_ratio_median", "w1_ratio_max", "worst_w1",
                                            "generation_ms_per_shower")}), flush=True)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="checkpoint, or 'default' for the shipped model")
    ap.add_argument("--data", type=Path, required=True, help="directory of the Geant4 sets")
    ap.add_argument("--stacks", default="ild,cld,allegro")
    ap.add_argument("--max-showers", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plots", type=Path, help="copy each stack's profile/reconstruction plots here")
    ap.add_argument("--reports", type=Path, default=Path("eval_card"))
    ap.add_argument("--first", type=int, default=0,
                    help="skip this many validation showers (kept for choosing corrections)")
    ap.add_argument("--response", default="auto",
                    help="how the stack reads the model's deposits: auto (default), sampling, or a "
                         "response file (pcshower.generate's response)")
    ap.add_argument("--variants", help="comma-separated corrections to switch off, one run each "
                    f"(of {', '.join(VARIANTS)}); results go under 'corrections' in the JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model_path = str(_checkpoint_arg(args.model))
    model = load_model(model_path)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    out.setdefault("stacks", {})
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(args.json)

    if args.variants:
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            for stack in args.stacks.split(","):
                entry = card_for_stack(_variant(model, name), model_path, args.data, stack,
                                       args.max_showers, args.seed, args.reports / name,
                                       args.batch_size, args.first, args.response)
                entry["variant"], entry["change"] = name, VARIANTS[name]
                out.setdefault("corrections", {}).setdefault(stack, {})[name] = entry
                save()
        return 0
    for stack in args.stacks.split(","):
        entry = card_for_stack(model, model_path, args.data, stack, args.max_showers, args.seed,
                               args.reports, args.batch_size, args.first, args.response)
        out["stacks"][stack] = entry
        save()
        if args.plots:
            args.plots.mkdir(parents=True, exist_ok=True)
            for tag in ("profiles", "reconstruction", "shape", "energy"):
                src = args.reports / stack / f"evaluate_{tag}.png"
                if src.exists():
                    shutil.copyfile(src, args.plots / f"model_card_{stack}_{tag}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
