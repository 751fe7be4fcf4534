"""Faithful recording in the Geant4 engine: the production scorers against an independent recorder.

Usage: ``python benchmarks/bench_geant4_recording.py [--n 200 --energy 50 --theta 0 --seed 5
--n-time 16 --json docs/bench/geant4_recording.json]``

Photons in the ILD Si-W stack (``geometries/ild.yaml``). Every shower is recorded twice in the
same Geant4 event: by the engine's scorers (charged steps along their chord in pieces of at most
1 mm, photon-step deposits at their interaction point) and by an independent stepping action that
keeps every depositing step in silicon (``reference=True``), whose deposits are spread along each
charged step's chord in 0.1 mm pieces (``reference_points(position="chord")``) or put at the
post-step point (``position="post"``). A third column re-creates the engine's former recording
from the same steps: photon-step deposits handed to the charged points of their slab in
proportion to their energy. Observables on ILD cells (5.088 mm, > 0.1 MeV): hits, transverse
width, mean log10 cell energy, per-layer energies, radial profile. Then the CPU time per shower
of the production recording alone (reference off), one process, one thread, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def former_recording(record, stack):
    """Points as the engine recorded them before: photon-step energy given to the charged points
    of the same slab in proportion to their energy (a slab without charged points: one point on
    the axis; not needed for the comparison, such slabs are dropped and counted)."""
    out, lost = [], 0.0
    n_slabs = len(stack.slabs)
    for i in range(len(record.ptr) - 1):
        p = record.points[record.ptr[i]:record.ptr[i + 1]]
        ph = record.photon_step[record.ptr[i]:record.ptr[i + 1]]
        slab = np.searchsorted(stack.z_edges_mm, p[:, 2], side="right") - 1
        charged = np.bincount(slab[~ph], weights=p[~ph, 3], minlength=n_slabs)
        neutral = np.bincount(slab[ph], weights=p[ph, 3], minlength=n_slabs)
        lost += neutral[charged <= 0].sum()
        scale = np.divide(charged + neutral, charged, out=np.ones(n_slabs), where=charged > 0)
        q = p[~ph].copy()
        q[:, 3] *= scale[slab[~ph]]
        out.append(q)
    ptr = np.concatenate([[0], np.cumsum([len(q) for q in out])]).astype(np.int64)
    return np.concatenate(out), ptr, lost


def summarise(obs: dict, ref: dict) -> dict:
    """Mean of each observable, its ratio to the reference, and the paired standard error."""
    out = {}
    for k in ("hits", "sigma_t_mm", "mean_log10_cell_mev", "evis"):
        d = obs[k] - ref[k]
        out[k] = {"mean": float(obs[k].mean()), "ratio_to_reference": float(obs[k].mean() / ref[k].mean()),
                  "difference": float(d.mean()), "difference_err": float(d.std(ddof=1) / math.sqrt(len(d)))}
    long_o, long_r = obs["long"].sum(0), ref["long"].sum(0)
    out["layer_energy_max_rel_diff"] = float(np.max(np.abs(long_o / long_r - 1)))
    rad_o, rad_r = obs["radial"].mean(0), ref["radial"].mean(0)
    out["radial_ratio"] = [float(v) for v in np.divide(rad_o, rad_r, out=np.ones_like(rad_o), where=rad_r > 0)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="showers recorded both ways")
    ap.add_argument("--energy", type=float, default=50.0, help="photon energy [GeV]")
    ap.add_argument("--theta", type=float, default=0.0, help="angle to the stack normal [deg]")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--n-time", type=int, default=16, help="showers timed with the production recording")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from pcshower.geometry import load_geometry
    from pcshower.simulate.geant4 import run_geant4
    from pcshower.simulate.geant4.compare import RADIAL_EDGES_MM, shower_observables
    from pcshower.simulate.geant4.engine import SEGMENT_MM, reference_points

    stack = load_geometry("ild").stack
    th = math.radians(args.theta)
    n = args.n
    ee, tt, pp = np.full(n, args.energy), np.full(n, th), np.zeros(n)
    run_geant4([args.energy], th, 0.0, 22, stack, seed=args.seed + 10_000)  # tables, warm-up
    c0 = time.process_time()
    rec = run_geant4(ee, th, 0.0, 22, stack, seed=args.seed, reference=True, progress=True)
    both_cpu = (time.process_time() - c0) / n
    engine = shower_observables(rec.points, rec.ptr, ee, tt, pp, stack)
    fp, fptr, lost = former_recording(rec, stack)
    former = shower_observables(fp, fptr, ee, tt, pp, stack)
    result = {"energy_gev": args.energy, "theta_deg": args.theta, "n": n, "seed": args.seed,
              "segment_mm": SEGMENT_MM, "radial_edges_mm": RADIAL_EDGES_MM.tolist(),
              "photon_step_energy_fraction": float(rec.points[rec.photon_step, 3].sum() / rec.points[:, 3].sum()),
              "photon_step_points_per_shower": float(rec.photon_step.sum() / n),
              "former_recording_energy_in_slabs_without_charged_points": float(lost / rec.points[:, 3].sum()),
              "cpu_s_per_shower_with_reference": both_cpu}
    for conv in ("chord", "post"):
        rp, rptr = reference_points(rec, stack, position=conv)
        ref = shower_observables(rp, rptr, ee, tt, pp, stack)
        result[f"reference_{conv}"] = {k: float(ref[k].mean()) for k in ("hits", "sigma_t_mm", "mean_log10_cell_mev", "evis")}
        result[f"engine_vs_{conv}"] = summarise(engine, ref)
        result[f"former_vs_{conv}"] = summarise(former, ref)
    c0 = time.process_time()
    t0 = time.perf_counter()
    timed = run_geant4(np.full(args.n_time, args.energy), th, 0.0, 22, stack, seed=args.seed + 1)
    result["cpu_s_per_shower"] = (time.process_time() - c0) / args.n_time
    result["wall_s_per_shower"] = (time.perf_counter() - t0) / args.n_time
    result["points_per_shower"] = float(len(timed.points) / args.n_time)
    for conv in ("chord", "post"):
        e, f = result[f"engine_vs_{conv}"], result[f"former_vs_{conv}"]
        print(f"vs reference ({conv}): hits engine {e['hits']['ratio_to_reference']:.4f} former "
              f"{f['hits']['ratio_to_reference']:.4f}; sigma_t engine {e['sigma_t_mm']['ratio_to_reference']:.4f} "
              f"former {f['sigma_t_mm']['ratio_to_reference']:.4f}; mean log10 cell E difference engine "
              f"{e['mean_log10_cell_mev']['difference']:+.4f} former {f['mean_log10_cell_mev']['difference']:+.4f}")
    print(f"production recording: {result['cpu_s_per_shower']:.3f} CPU s per shower, "
          f"{result['points_per_shower']:.0f} points")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
