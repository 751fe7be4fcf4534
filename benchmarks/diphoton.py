"""Di-photon validation of the Geant4 fast-simulation hook: full Geant4 against Geant4 + hook, same primaries.

Pairs of photons, each of an energy uniform in [--emin, --emax] GeV, enter the ILD stack at normal
incidence at two points --seps apart on the front face (the pair's axis at a random azimuth), behind
an upstream slab (--upstream, default 0.2 X0 of silicon: conversions there give the hook a realistic
mix of photons it takes and e+e- pairs it leaves to Geant4). Every event is simulated twice in
the same process, interleaved per separation: by Geant4 alone, and by Geant4 with the hook
(:mod:`pcshower.simulate.geant4.fastsim`, the shipped model by default), with the same primaries
and the same Geant4 event seeds. Per event:

- total hit energy: the visible energy (MeV) of all hits in the stack;
- number of hits: cells of the ILD readout (5.088 mm squares per layer, ``geometries/ild.yaml``)
  above half a MIP (half the minimum-ionising loss in its 0.5 mm of silicon, from
  :mod:`pcshower.physics.materials`: 0.097 MeV);
- two clusters found: a local-maximum finder on the cells summed over the layers (a cell that is
  at least every one of its 8 neighbours and holds >= --peak-fraction of the hottest cell); an
  event with two or more such maxima counts as two clusters;
- cost: CPU seconds of the process per event for each way (Geant4 transport, the hook's
  generation included), and the hook's generation share.

Results: a JSON file (--out) and a PNG (--plot); docs/integration.md shows them.

    .venv/bin/python benchmarks/diphoton.py --n 50 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

ILD_CELL_MM = 5.088  # geometries/ild.yaml readout.cell_size_mm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50, help="events per separation")
    p.add_argument("--seps", default="10,12.5,15,17.5,20,30,40,60",
                   help="separations at the front face (mm)")
    p.add_argument("--emin", type=float, default=10.0, help="photon energy range low (GeV)")
    p.add_argument("--emax", type=float, default=50.0, help="photon energy range high (GeV)")
    p.add_argument("--upstream", default="Si:0.2", help="MATERIAL:X0 in front, or 'none'")
    p.add_argument("--model", default="default", help="the hook's model")
    p.add_argument("--steps", type=int, default=None, help="the model's sampler steps")
    p.add_argument("--peak-fraction", type=float, default=0.1,
                   help="a local maximum must hold this fraction of the hottest cell")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="docs/bench/diphoton.json")
    p.add_argument("--plot", default="docs/img/diphoton.png")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only redraw --plot and print the Markdown table of an earlier result file")
    return p.parse_args(argv)


def paired(summary: dict) -> list[dict]:
    """Per separation, the hook's events against Geant4's on the same primaries: mean and
    standard error of the per-event ratios of hit energy and of hits (the primaries' own energy
    spread cancels in them)."""
    out = []
    for g4, hook in zip(summary["events"]["geant4"], summary["events"]["hook"]):
        g4, hook = np.asarray(g4), np.asarray(hook)
        row = {}
        for name, col in (("energy", 0), ("hits", 1)):
            r = hook[:, col] / g4[:, col]
            row[name] = (float(r.mean()), float(r.std(ddof=1) / math.sqrt(len(r))))
        out.append(row)
    return out


def markdown_table(summary: dict) -> str:
    """The table of docs/integration.md from a result file's numbers."""
    head = ("| separation [mm] | hit energy, G4 [MeV] | hook / G4 | hits, G4 | hook / G4 | "
            "two clusters, G4 | two clusters, hook | photons stopped | CPU s/event, G4 | "
            "CPU s/event, hook (generation) | speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r, pr in zip(summary["rows"], paired(summary)):
        g, h = r["geant4"], r["hook"]
        lines.append(
            f"| {r['sep_mm']:g} | {g['hit_energy_mev']:.0f} | {pr['energy'][0]:.3f} ± "
            f"{pr['energy'][1]:.3f} | {g['hits']:.0f} | {pr['hits'][0]:.3f} ± {pr['hits'][1]:.3f}"
            f" | {g['two_cluster_fraction']:.2f} ± {g['two_cluster_err']:.2f} | "
            f"{h['two_cluster_fraction']:.2f} ± {h['two_cluster_err']:.2f} | "
            f"{r['photons_stopped_fraction']:.2f} | {g['cpu_s_per_event']:.3f} | "
            f"{h['cpu_s_per_event']:.3f} ({r['generation_cpu_s_per_event']:.3f}) | "
            f"{r['speedup_cpu']:.2f} |")
    c = summary["cpu_s_per_event"]
    lines.append(f"| all | | | | | | | | {c['geant4']:.3f} | {c['hook']:.3f} | "
                 f"{summary['speedup_cpu']:.2f} |")
    return "\n".join(lines)


def event_observables(record, stack, mip_half_mev: float, peak_fraction: float):
    """Per event: total hit energy (MeV), hits above half a MIP, local maxima of the summed map."""
    from pcshower.physics.sampling import sampling_layers

    cell_of_slab = sampling_layers(stack).cell_of_slab
    out = []
    for i in range(len(record.ptr) - 1):
        p = record.points[record.ptr[i]:record.ptr[i + 1]]
        slab = np.clip(np.searchsorted(stack.z_edges_mm, p[:, 2], side="right") - 1, 0,
                       len(stack.slabs) - 1)
        layer = cell_of_slab[slab]
        iu = np.floor(p[:, 0] / ILD_CELL_MM).astype(np.int64)
        iv = np.floor(p[:, 1] / ILD_CELL_MM).astype(np.int64)
        keys, inv = np.unique(np.c_[layer, iu, iv], axis=0, return_inverse=True)
        e_cell = np.bincount(inv.ravel(), weights=p[:, 3])
        hits = int((e_cell > mip_half_mev).sum())
        # the map summed over layers, on a padded grid around the hits
        uv, inv2 = np.unique(keys[:, 1:], axis=0, return_inverse=True)
        e_uv = np.bincount(inv2.ravel(), weights=e_cell)
        lo = uv.min(axis=0) - 1
        grid = np.zeros(tuple(uv.max(axis=0) - lo + 2))
        grid[uv[:, 0] - lo[0], uv[:, 1] - lo[1]] = e_uv
        neighbours = np.max([np.roll(np.roll(grid, du, 0), dv, 1)
                             for du in (-1, 0, 1) for dv in (-1, 0, 1) if du or dv], axis=0)
        peaks = (grid >= neighbours) & (grid >= peak_fraction * grid.max()) & (grid > 0)
        out.append((float(p[:, 3].sum()), hits, int(peaks.sum())))
    return np.array(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        summary = json.loads(Path(args.replot).read_text())
        plot(summary, args.plot)
        print(markdown_table(summary))
        return 0
    import torch

    import pcshower
    from pcshower.physics.materials import get_material
    from pcshower.simulate.geant4 import run_geant4
    from pcshower.simulate.geant4.fastsim import FastSim

    warnings.filterwarnings("ignore", message=".*approximate low-energy.*")
    torch.set_num_threads(1)
    stack = pcshower.load_geometry("ild").stack
    si = get_material("Si")
    mip_half = 0.5 * si.mip_mev_per_mm * 0.5  # half a MIP in ILD's 0.5 mm of silicon
    upstream = None if args.upstream.lower() == "none" else args.upstream
    config = FastSim(model=args.model, steps=args.steps)
    seps = [float(s) for s in args.seps.split(",")]
    run_geant4([args.emin], 0.0, 0.0, 22, stack, seed=0)  # Geant4 set up before any timing
    rows, events = [], {}
    for k, sep in enumerate(seps):
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, k]))
        energy = rng.uniform(args.emin, args.emax, (args.n, 2))
        alpha = rng.uniform(0.0, math.pi, args.n)
        half = 0.5 * sep * np.stack([np.cos(alpha), np.sin(alpha)], axis=-1)
        impact = np.stack([half, -half], axis=1)  # [n, 2, 2]
        g4_seed = int(args.seed * 1000 + k)
        result = {}
        for way in ("geant4", "hook"):
            c0, w0 = time.process_time(), time.perf_counter()
            rec = run_geant4(energy, 0.0, 0.0, 22, stack, seed=g4_seed, impact_mm=impact,
                             upstream=upstream, fastsim=config if way == "hook" else None)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            obs = event_observables(rec, stack, mip_half, args.peak_fraction)
            result[way] = {"obs": obs, "cpu_s": cpu, "wall_s": wall, "record": rec}
        fast = result["hook"]["record"].fastsim
        row = {"sep_mm": sep, "n": args.n,
               "photons_stopped_fraction": float(len(fast.event)) / (2 * args.n),
               "energy_stopped_fraction": float(fast.stopped_mev.sum() / (energy.sum() * 1000)),
               "generation_cpu_s_per_event": fast.seconds / args.n}
        for way in ("geant4", "hook"):
            obs = result[way]["obs"]
            two = obs[:, 2] >= 2
            row[way] = {"hit_energy_mev": float(obs[:, 0].mean()),
                        "hit_energy_sem": float(obs[:, 0].std(ddof=1) / math.sqrt(args.n)),
                        "hit_energy_rms_rel": float(obs[:, 0].std(ddof=1) / obs[:, 0].mean()),
                        "hits": float(obs[:, 1].mean()),
                        "hits_sem": float(obs[:, 1].std(ddof=1) / math.sqrt(args.n)),
                        "two_cluster_fraction": float(two.mean()),
                        "two_cluster_err": float(math.sqrt(max(two.mean() * (1 - two.mean()), 1.0 / args.n) / args.n)),
                        "cpu_s_per_event": result[way]["cpu_s"] / args.n,
                        "wall_s_per_event": result[way]["wall_s"] / args.n}
            events.setdefault(way, []).append(obs.tolist())
        row["speedup_cpu"] = row["geant4"]["cpu_s_per_event"] / row["hook"]["cpu_s_per_event"]
        rows.append(row)
        g, h = row["geant4"], row["hook"]
        print(f"{sep:5.1f} mm: E_hit {g['hit_energy_mev']:.0f} / {h['hit_energy_mev']:.0f} MeV, "
              f"hits {g['hits']:.0f} / {h['hits']:.0f}, two clusters {g['two_cluster_fraction']:.2f}"
              f" / {h['two_cluster_fraction']:.2f}, CPU {g['cpu_s_per_event']:.3f} / "
              f"{h['cpu_s_per_event']:.3f} s/event (x{row['speedup_cpu']:.1f}), stopped "
              f"{row['photons_stopped_fraction']:.2f}", flush=True)
    total = {way: sum(r[way]["cpu_s_per_event"] for r in rows) / len(rows) for way in ("geant4", "hook")}
    import sys

    summary = {"command": "python benchmarks/diphoton.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "args": vars(args), "hook": dataclasses.asdict(config),
               "model_sha256": fast.model_sha256, "rows": rows,
               "cpu_s_per_event": total, "speedup_cpu": total["geant4"] / total["hook"],
               "events": events, "torch_threads": 1,
               "machine": "2 cores, two nice-19 Geant4 productions running alongside"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    print(markdown_table(summary))
    print(f"mean CPU per event: Geant4 {total['geant4']:.3f} s, Geant4 + hook {total['hook']:.3f} s "
          f"(x{summary['speedup_cpu']:.1f}); {args.out}, {args.plot}")
    return 0


def plot(summary: dict, path) -> None:
    """Four panels against the separation: the hook's hit energy and hits relative to Geant4's
    (per-event ratios on the same primaries), the two-cluster fraction, the CPU per event."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, args = summary["rows"], summary["args"]
    sep = np.array([r["sep_mm"] for r in rows]) / 10.0
    pr = paired(summary)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    style = {"geant4": dict(color="k", marker="o", label="Geant4"),
             "hook": dict(color="C1", marker="s", label="Geant4 + hook")}
    for ax, (name, label) in zip(axes[:2], (("energy", "total hit energy"),
                                             ("hits", "hits (cells > 0.5 MIP)"))):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.errorbar(sep, [p[name][0] for p in pr], [p[name][1] for p in pr], ls="-", capsize=2,
                    **style["hook"])
        ax.set_ylabel(f"{label}, hook / Geant4")
    ax = axes[2]
    for way in ("geant4", "hook"):
        shift = -0.04 if way == "geant4" else 0.04
        ax.errorbar(sep + shift, [r[way]["two_cluster_fraction"] for r in rows],
                    [r[way]["two_cluster_err"] for r in rows], ls="-", capsize=2, **style[way])
    ax.set_ylabel("fraction with two clusters")
    ax.legend(loc="lower right")
    ax = axes[3]
    for way in ("geant4", "hook"):
        ax.plot(sep, [r[way]["cpu_s_per_event"] for r in rows], ls="-", **style[way])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("CPU per event [s], one thread")
    for ax in axes:
        ax.set_xlabel("separation at the front face [cm]")
    up = args["upstream"] if args["upstream"].lower() != "none" else "no upstream material"
    steps = args["steps"] or "its default"
    fig.suptitle(f"photon pairs, {args['emin']:g}-{args['emax']:g} GeV each, ILD stack behind "
                 f"{up} X0; {args['n']} events per point, seed {args['seed']}; hook: "
                 f"{args['model']} model, {steps} steps")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
