"""How well can any Geant4-taught model do? Geant4's own physics-frame showers, placed by the adapter.

A model taught by Geant4's physics-frame showers can at best reproduce those showers; what reaches
the cells is then decided by the adapter that places them in the readout. This benchmark takes the
two frames of the same held-out Geant4 showers (``pcshower simulate --engine geant4 --frame
both``), places the physics-frame half in the stack's geometry with each way the adapter can read
recorded deposits, and compares the result with the detector-frame half on the same cells
through ``pcshower.evaluate`` (W1 over the Geant4-vs-Geant4 floor, GBDT AUC, plain means,
calibrated resolution). The numbers are the ceiling of the model card: a model cannot beat them.

Readings compared (``--readings``):

* ``sampling``: the equivalent-medium sampling model (GFlash sampling fraction, Gamma-distributed
  crossings per point), what a model of parametrised showers is read with;
* ``layer-mean``: one measured Geant4 ratio per layer (no age bins), no fluctuation;
* ``age``: the measured ratio per layer and shower age, with the fitted shower-to-shower spread
  (the response ``generate`` uses for a Geant4-taught model);
* ``age-mean``: the same without the spread.

    python benchmarks/adapter_roundtrip.py --stack ild \\
        --fit ~/pcshower-data/g4_ild_photons_train --test ~/pcshower-data/g4_ild_photons_val \\
        --max-fit 2000 --max-test 1000 --json docs/bench/adapter_roundtrip.json

The response is measured on ``--fit`` (use training showers) or read from ``--response FILE``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pcshower import Showers
from pcshower.evaluate import evaluate
from pcshower.geometry import load_geometry
from pcshower.geometry.response import load_response, measure_layer_response
from pcshower.io import iter_parquet

READINGS = ("sampling", "layer-mean", "age", "age-mean")


def _frames(path: Path, max_showers: int | None, batch: int = 100):
    return [iter_parquet(path / frame, batch_size=batch, max_showers=max_showers)
            for frame in ("physics", "detector")]


def roundtrip(stack: str, fit: Path | None, test: Path, *, response_file: Path | None,
              max_fit: int | None, max_test: int | None, readings=READINGS, seed: int = 5) -> dict:
    geometry = load_geometry(stack)
    t0 = time.perf_counter()
    age = (load_response(response_file) if response_file else
           measure_layer_response(*_frames(fit, max_fit), geometry, progress=True))
    flat = None
    if "layer-mean" in readings:
        if fit is None:
            raise SystemExit("the layer-mean reading is measured on --fit showers")
        flat = measure_layer_response(*_frames(fit, max_fit), geometry, tau_edges=(-1e3, 1e3))
    t_fit = time.perf_counter() - t0
    phys_batches, det_batches = _frames(test, max_test)
    phys = Showers.concat(list(phys_batches))
    det = Showers.concat(list(det_batches))
    options = {"sampling": (None, True), "layer-mean": (flat, False), "age": (age, True),
               "age-mean": (age, False)}
    out = {"stack": stack, "fit": None if fit is None else str(fit),
           "response": str(response_file) if response_file else "measured on --fit",
           "response_showers": age.provenance.get("showers"), "test": str(test),
           "n_test": len(det), "response_fit_s": round(t_fit, 1),
           "shower_spread": {"a_mev": age.var_a_mev, "b": age.var_b}, "readings": {}}
    for name in readings:
        response, fluctuate = options[name]
        gen = torch.Generator().manual_seed(seed)
        placed = Showers.concat([geometry.to_detector(phys[a:a + 100], generator=gen,
                                                      fluctuate=fluctuate, response=response)
                                 for a in range(0, len(phys), 100)])
        res = evaluate(placed, det, geometry=geometry, names=(f"Geant4 placed ({name})", "Geant4"),
                       network=False, progress=False, seed=1)
        auc = res.get("classifier_gbdt", {})
        means = res.get("means", {})
        rec = res.get("reconstruction", {})
        entry = {
            "gbdt_auc": auc.get("auc"), "gbdt_auc_floor": auc.get("floor_auc"),
            "w1_ratio_median": res["summary"].get("w1_ratio_median"),
            "w1_ratio_max": res["summary"].get("w1_ratio_max"),
            "worst_w1": res["summary"].get("worst_w1"),
            "w1_ratio": {k: v["w1"]["ratio"] for k, v in res["observables"].items() if "[" not in k},
            "mean_ratio": {k: v["generated"] / v["reference"] for k, v in means.items()
                           if v["reference"]},
            "resolution": [{"energy_gev": b["energy_gev"],
                            "placed": b["generated"]["resolution"],
                            "geant4": b["reference"]["resolution"]}
                           for b in rec.get("energy", [])],
        }
        out["readings"][name] = entry
        print(json.dumps({"reading": name, **{k: entry[k] for k in (
            "gbdt_auc", "w1_ratio_median", "w1_ratio_max", "worst_w1")}}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", required=True)
    ap.add_argument("--fit", type=Path, help="--frame both production to measure the response on")
    ap.add_argument("--response", type=Path, help="response file instead of measuring one")
    ap.add_argument("--test", type=Path, required=True, help="held-out --frame both production")
    ap.add_argument("--max-fit", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--readings", default=",".join(READINGS))
    ap.add_argument("--json", type=Path, required=True, help="results (merged per stack)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.fit is None and args.response is None:
        raise SystemExit("give --fit (to measure the response) or --response FILE")
    readings = tuple(args.readings.split(","))
    unknown = set(readings) - set(READINGS)
    if unknown:
        raise SystemExit(f"unknown reading {sorted(unknown)[0]!r}; known: {', '.join(READINGS)}")
    result = roundtrip(args.stack, args.fit, args.test, response_file=args.response,
                       max_fit=args.max_fit, max_test=args.max_test, readings=readings)
    merged = json.loads(args.json.read_text()) if args.json.exists() else {}
    merged[args.stack] = result
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=str))
    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
