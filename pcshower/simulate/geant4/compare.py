"""Validate the parametrised engine against Geant4 in the same stack: profiles, linearity, resolution, hits.

Run ``python -m pcshower.simulate.geant4.compare --out docs/img --cache DIR``: photons at 10, 50
and 90 GeV, θ = 0° and 40° to the stack normal (ILD's barrel polar angles 90° and 50°), in the
ILD Si-W stack, detector frame. Observables per shower, both engines through the same code:

- longitudinal profile: visible energy per active layer / E;
- radial profile: visible energy per mm of distance from the shower axis (the line through
  the impact point along the incident direction) / E;
- visible energy E_vis (sum of active deposits) and the sampling-weighted sum
  E_w = Σ_l w_l E_l, w_l = absorber X0 in front of layer l over that of layer 0 (the ILD
  reconstruction's ×2 for the thick-tungsten layers); linearity <E_vis>/E and resolution
  σ(E_w)/<E_w>;
- hit cells: 5.088 mm square cells per layer with more than 0.1 MeV (half a MIP in 0.5 mm Si);
  raw point counts are reported too but differ by construction (Geant4 steps vs GFlash spots).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from pcshower.physics.stack import Stack

__all__ = ["shower_observables", "layer_weights", "compare_engines"]

CELL_MM = 5.088
CELL_THRESHOLD_MEV = 0.1
RADIAL_EDGES_MM = np.concatenate([np.arange(0, 20, 1.0), np.arange(20, 60, 4.0), np.arange(60, 151, 15.0)])


def layer_weights(stack: Stack) -> np.ndarray:
    """[L] absorber radiation lengths in front of each active layer, relative to layer 0."""
    x0 = np.diff(stack.x0_edges)
    active = stack.active_mask
    before = np.cumsum(np.where(active, 0.0, x0))
    at_active = before[active]
    per_layer = np.diff(np.concatenate([[0.0], at_active]))
    return per_layer / per_layer[0]


def shower_observables(points: np.ndarray, ptr: np.ndarray, energy_gev: np.ndarray, theta: np.ndarray,
                       phi: np.ndarray, stack: Stack) -> dict:
    """Per-shower observables of detector-frame points (mm, MeV) in ``stack`` (vectorised)."""
    n = len(ptr) - 1
    counts = np.diff(ptr)
    shower = np.repeat(np.arange(n), counts)
    x, y, z, e = (points[:, i].astype(np.float64) for i in range(4))
    slab = np.clip(np.searchsorted(stack.z_edges_mm, z, side="right") - 1, 0, len(stack.slabs) - 1)
    layer = stack.layer_of_slab[slab]
    ok = layer >= 0
    L = stack.num_layers
    long = np.zeros((n, L))
    np.add.at(long, (shower[ok], layer[ok]), e[ok])
    d = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)[shower]
    p = np.stack([x, y, z], 1)
    along = (p * d).sum(1)
    r = np.linalg.norm(p - along[:, None] * d, axis=1)
    rbin = np.clip(np.searchsorted(RADIAL_EDGES_MM, r, side="right") - 1, 0, len(RADIAL_EDGES_MM) - 2)
    radial = np.zeros((n, len(RADIAL_EDGES_MM) - 1))
    np.add.at(radial, (shower, rbin), e)
    radial /= np.diff(RADIAL_EDGES_MM)[None, :]
    # hit cells: (shower, layer, ix, iy) keys, summed, thresholded
    ix = np.floor(x / CELL_MM).astype(np.int64) + 100_000
    iy = np.floor(y / CELL_MM).astype(np.int64) + 100_000
    key = ((shower.astype(np.int64) * 64 + np.maximum(layer, 0)) * 200_000 + ix) * 200_000 + iy
    uniq, inv = np.unique(key[ok], return_inverse=True)
    cell_e = np.bincount(inv, weights=e[ok])
    cell_shower = (uniq // (200_000 * 200_000)) // 64
    hit = cell_e > CELL_THRESHOLD_MEV
    hits = np.bincount(cell_shower[hit], minlength=n)
    # transverse width of the hit cells: energy-weighted RMS of the cell centres about the
    # shower's energy-weighted centre, averaged over x and y
    cx = ((uniq // 200_000) % 200_000 - 100_000 + 0.5) * CELL_MM
    cy = (uniq % 200_000 - 100_000 + 0.5) * CELL_MM
    cs, ce = cell_shower[hit], cell_e[hit]
    esum = np.maximum(np.bincount(cs, weights=ce, minlength=n), 1e-30)
    sigma = np.zeros(n)
    for c in (cx[hit], cy[hit]):
        mean = np.bincount(cs, weights=ce * c, minlength=n) / esum
        sigma += np.bincount(cs, weights=ce * (c - mean[cs]) ** 2, minlength=n) / esum
    mean_log10 = np.bincount(cs, weights=np.log10(ce), minlength=n) / np.maximum(hits, 1)
    e_mev = np.asarray(energy_gev, dtype=np.float64) * 1000.0
    w = layer_weights(stack)
    return {"long": long / e_mev[:, None], "radial": radial / e_mev[:, None], "evis": long.sum(1),
            "ew": (long * w[None, :]).sum(1), "hits": hits, "points": counts, "energy_gev": np.asarray(energy_gev),
            "sigma_t_mm": np.sqrt(0.5 * sigma), "mean_log10_cell_mev": mean_log10}


def _summary(obs: dict) -> dict:
    e = obs["energy_gev"][0]
    evis, ew = obs["evis"], obs["ew"]
    n = len(evis)
    res = ew.std(ddof=1) / ew.mean()
    return {"n": n, "evis_over_e_mev_per_gev": float(evis.mean() / e),
            "evis_over_e_err": float(evis.std(ddof=1) / math.sqrt(n) / e),
            "ew_over_e_mev_per_gev": float(ew.mean() / e),
            "resolution": float(res), "resolution_err": float(res / math.sqrt(2 * (n - 1))),
            "resolution_sqrtE": float(res * math.sqrt(e)),
            "hits_mean": float(obs["hits"].mean()), "points_mean": float(obs["points"].mean()),
            "long_mean": obs["long"].mean(0).tolist(), "radial_mean": obs["radial"].mean(0).tolist()}


def compare_engines(stack: Stack, energies=(10.0, 50.0, 90.0), thetas_deg=(0.0, 40.0),
                    n_geant4=(300, 100, 60), n_param=1000, seed=2026, cache: Path | None = None) -> dict:
    """Run both engines for every (energy, θ) and return per-configuration summaries."""
    from pcshower.simulate.geant4 import simulate_geant4
    from pcshower.simulate.parametrised import simulate_parametrised

    results = {}
    for theta_deg in thetas_deg:
        th = math.radians(theta_deg)
        for energy, ng in zip(energies, n_geant4):
            tag = f"E{energy:g}_th{theta_deg:g}"
            f = cache / f"g4_{tag}_n{ng}.npz" if cache else None
            t0 = time.perf_counter()
            if f is not None and f.exists():
                z = np.load(f)
                g4_points, g4_ptr = z["points"], z["ptr"]
            else:
                g4 = simulate_geant4(np.full(ng, energy), th, 0.0, 22, stack, seed=seed + int(energy) + int(theta_deg),
                                     frame="detector", progress=True)
                g4_points, g4_ptr = g4.points.numpy(), g4.ptr.numpy()
                if f is not None:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(f, points=g4_points, ptr=g4_ptr)
            t_g4 = time.perf_counter() - t0
            par = simulate_parametrised(np.full(n_param, energy), th, 0.0, 22, stack, seed=seed, frame="detector")
            full = lambda k: np.full(k, energy)  # noqa: E731
            og = shower_observables(g4_points, g4_ptr, full(ng), np.full(ng, th), np.zeros(ng), stack)
            op = shower_observables(par.points.numpy(), par.ptr.numpy(), full(n_param), np.full(n_param, th),
                                    np.zeros(n_param), stack)
            results[tag] = {"energy_gev": energy, "theta_deg": theta_deg, "geant4": _summary(og),
                            "parametrised": _summary(op), "geant4_seconds": t_g4}
            s_g, s_p = results[tag]["geant4"], results[tag]["parametrised"]
            print(f"{tag}: Evis/E G4 {s_g['evis_over_e_mev_per_gev']:.2f} param {s_p['evis_over_e_mev_per_gev']:.2f} MeV/GeV; "
                  f"res G4 {s_g['resolution']:.4f} param {s_p['resolution']:.4f}; hits G4 {s_g['hits_mean']:.0f} "
                  f"param {s_p['hits_mean']:.0f} ({t_g4:.0f} s)", flush=True)
    return results


def plot(results: dict, stack: Stack, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    tags = list(results)
    thetas = sorted({r["theta_deg"] for r in results.values()})
    energies = sorted({r["energy_gev"] for r in results.values()})
    files = []
    for kind, xlabel, ylabel in (("long", "active layer", "mean E_layer / E [MeV/GeV]"),
                                 ("radial", "distance to the shower axis [mm]", "mean dE/dr / E [MeV/(GeV mm)]")):
        fig, axes = plt.subplots(len(thetas), len(energies), figsize=(4 * len(energies), 3.2 * len(thetas)),
                                 squeeze=False)
        for t in tags:
            r = results[t]
            ax = axes[thetas.index(r["theta_deg"]), energies.index(r["energy_gev"])]
            if kind == "long":
                xs = np.arange(stack.num_layers)
                ax.step(xs, r["geant4"]["long_mean"], where="mid", label=f"Geant4 ({r['geant4']['n']})")
                ax.step(xs, r["parametrised"]["long_mean"], where="mid", label=f"parametrised ({r['parametrised']['n']})")
            else:
                xs = 0.5 * (RADIAL_EDGES_MM[1:] + RADIAL_EDGES_MM[:-1])
                ax.plot(xs, r["geant4"]["radial_mean"], drawstyle="steps-mid", label="Geant4")
                ax.plot(xs, r["parametrised"]["radial_mean"], drawstyle="steps-mid", label="parametrised")
                ax.set_yscale("log")
            ax.set_title(f"{r['energy_gev']:g} GeV γ, θ_normal = {r['theta_deg']:g}°", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / f"geant4_{'longitudinal' if kind == 'long' else 'radial'}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.3))
    for engine, marker in (("geant4", "o"), ("parametrised", "s")):
        for th in thetas:
            rs = [results[t] for t in tags if results[t]["theta_deg"] == th]
            e = [r["energy_gev"] for r in rs]
            lab = f"{engine}, θ={th:g}°"
            axes[0].errorbar(e, [r[engine]["evis_over_e_mev_per_gev"] for r in rs],
                             [r[engine]["evis_over_e_err"] for r in rs], marker=marker, ls="-", label=lab)
            axes[1].plot(e, [r[engine]["ew_over_e_mev_per_gev"] for r in rs], marker=marker, ls="-", label=lab)
            axes[2].errorbar(e, [r[engine]["resolution"] for r in rs], [r[engine]["resolution_err"] for r in rs],
                             marker=marker, ls="-", label=lab)
            axes[3].plot(e, [r[engine]["hits_mean"] for r in rs], marker=marker, label=lab)
    ee = np.linspace(8, 95, 50)
    axes[2].plot(ee, np.hypot(0.166 / np.sqrt(ee), 0.011), "k--", label="CALICE SiW: 16.6%/√E ⊕ 1.1%")
    for ax, yl in zip(axes, ("<E_vis>/E [MeV/GeV]", "<E_w>/E (thick layers x2) [MeV/GeV]", "σ(E_w)/<E_w>",
                             "hit cells (> 0.1 MeV)")):
        ax.set_xlabel("E [GeV]")
        ax.set_ylabel(yl)
        ax.legend(fontsize=6)
    fig.tight_layout()
    f = out / "geant4_linearity_resolution.png"
    fig.savefig(f, dpi=90)
    plt.close(fig)
    files.append(f)
    return files


def markdown_table(results: dict) -> str:
    rows = ["| E [GeV] | θ to normal | n G4 / param | E_vis/E [MeV/GeV] G4 | param | E_w/E G4 | param | σ(E_w)/E_w G4 | param | hit cells G4 | param | raw points G4 | param |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        g, p = r["geant4"], r["parametrised"]
        rows.append(f"| {r['energy_gev']:g} | {r['theta_deg']:g}° | {g['n']} / {p['n']} | "
                    f"{g['evis_over_e_mev_per_gev']:.2f} ± {g['evis_over_e_err']:.2f} | {p['evis_over_e_mev_per_gev']:.2f} | "
                    f"{g['ew_over_e_mev_per_gev']:.2f} | {p['ew_over_e_mev_per_gev']:.2f} | "
                    f"{100 * g['resolution']:.2f} ± {100 * g['resolution_err']:.2f}% | {100 * p['resolution']:.2f}% | "
                    f"{g['hits_mean']:.0f} | {p['hits_mean']:.0f} | {g['points_mean']:.0f} | {p['points_mean']:.0f} |")
    return "\n".join(rows)


def geant4_resolution(stack: Stack, points_per_energy: dict, seed: int = 7) -> dict:
    """Geant4 only: linearity and resolution of normal-incidence photons (for the tables study)."""
    from pcshower.simulate.geant4 import simulate_geant4
    from pcshower.simulate.geant4.datasets import configure_geant4_data

    out = {"tables": configure_geant4_data().get("tables", "real data")}
    for energy, n in points_per_energy.items():
        sh = simulate_geant4(np.full(n, energy), 0.0, 0.0, 22, stack, seed=seed, frame="detector")
        o = shower_observables(sh.points.numpy(), sh.ptr.numpy(), np.full(n, energy), np.zeros(n), np.zeros(n), stack)
        s = _summary(o)
        out[f"{energy:g}"] = {k: s[k] for k in ("n", "evis_over_e_mev_per_gev", "evis_over_e_err", "resolution",
                                                "resolution_err", "resolution_sqrtE", "hits_mean")}
        print(json.dumps({f"{energy:g}": out[f"{energy:g}"]}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Parametrised engine vs Geant4 in the ILD stack")
    ap.add_argument("--resolution-only", default=None, metavar="E:N,E:N",
                    help="Geant4 only: resolution of N photons at each E GeV (tables study)")
    ap.add_argument("--out", default="docs/img", help="folder for the PNGs")
    ap.add_argument("--cache", default=None, help="folder to keep the Geant4 showers (npz) between runs")
    ap.add_argument("--n", type=int, nargs=3, default=(300, 100, 60), help="Geant4 showers at 10/50/90 GeV")
    ap.add_argument("--n-param", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from pcshower.geometry import load_geometry

    stack = load_geometry("ild").stack
    if args.resolution_only:
        pairs = dict((float(a), int(b)) for a, b in (x.split(":") for x in args.resolution_only.split(",")))
        res = geant4_resolution(stack, pairs)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    res = compare_engines(stack, n_geant4=tuple(args.n), n_param=args.n_param,
                          cache=Path(args.cache) if args.cache else None)
    plot(res, stack, Path(args.out))
    print(markdown_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
