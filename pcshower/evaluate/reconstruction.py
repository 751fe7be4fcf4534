"""Reconstruction-level checks: what a detector's reconstruction would measure from the showers.

Two numbers per condition, generated against reference, as the field checks fast-simulation
models beyond per-observable distributions (CaloClouds3, arXiv 2511.01460, runs its showers
through the ILD reconstruction and compares the photon energy and angle):

* **Energy response and resolution after a linear calibration.** The detector's response
  ``E_vis = k E + c`` (visible against incident energy) is fitted by least squares on the
  *reference* and inverted, ``E_rec = (E_vis − c) / k``, for both samples, as a detector
  calibrated on Geant4 would treat fast-simulated showers. (Fitting ``E`` on ``E_vis`` instead
  would bias every bin's mean towards the middle of the range by the resolution: regression
  dilution.) Per incident-energy bin:
  the response ``<E_rec / E>`` (a generated sample with the wrong sampling scale shows up here)
  and the resolution ``σ(E_rec / E) / <E_rec / E>``.
* **Shower-axis polar angle.** The principal axis of each shower's deposits (energy-weighted
  PCA, observable ``pca_theta``; :func:`pcshower.evaluate.observables.deposit_observables`),
  minus the incident polar angle: per polar-angle bin its mean (bias) and standard deviation
  (angular resolution of a calorimeter-only direction measurement).

Errors are the usual large-sample ones: σ/√n for means, σ/√(2(n−1)) for standard deviations, and
σ_res · √(1/(2(n−1)) + (σ/μ)²/n) for the relative resolution.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["linear_calibration", "binned_response", "binned_angle", "reconstruction_check"]


def linear_calibration(visible, incident) -> tuple[float, float]:
    """``(a, b)`` with ``E_rec = a · visible + b``: the inverse of the least-squares line
    ``visible ≈ k · incident + c`` (``a = 1/k``, ``b = −c/k``)."""
    vis = np.asarray(visible, dtype=np.float64)
    inc = np.asarray(incident, dtype=np.float64)
    if vis.size < 2 or np.ptp(vis) == 0 or np.ptp(inc) == 0:
        raise ValueError(f"a linear calibration needs at least two showers of different visible "
                         f"energy, got {vis.size}")
    k, c = np.polyfit(inc, vis, 1)
    if not k > 0:
        raise ValueError(f"the visible energy does not rise with the incident energy (slope {k:g}):"
                         " no linear calibration")
    return float(1.0 / k), float(-c / k)


def _edges(values: np.ndarray, edges, bins: int) -> np.ndarray:
    if edges is not None:
        return np.asarray(edges, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return np.linspace(lo, hi + 1e-9 * max(1.0, abs(hi)), bins + 1)


def _mean_std(x: np.ndarray) -> dict:
    n = x.size
    if n < 2:
        return {"n": int(n)}
    mu, sd = float(x.mean()), float(x.std(ddof=1))
    return {"n": int(n), "mean": mu, "mean_err": sd / math.sqrt(n), "std": sd,
            "std_err": sd / math.sqrt(2 * (n - 1))}


def binned_response(e_rec, e_inc, edges) -> list[dict]:
    """Per incident-energy bin [GeV]: response ``<E_rec/E>`` and resolution
    ``σ(E_rec/E)/<E_rec/E>`` with their errors."""
    ratio = np.asarray(e_rec, dtype=np.float64) / np.asarray(e_inc, dtype=np.float64)
    inc = np.asarray(e_inc, dtype=np.float64)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        r = ratio[(inc >= lo) & (inc < hi)]
        row = {"energy_gev": [float(lo), float(hi)], **_mean_std(r)}
        if "std" in row:
            res = row["std"] / row["mean"]
            row.update(response=row["mean"], response_err=row["mean_err"], resolution=res,
                       resolution_err=res * math.sqrt(1 / (2 * (r.size - 1)) +
                                                      (row["std"] / row["mean"]) ** 2 / r.size))
        rows.append(row)
    return rows


def binned_angle(pca_theta, theta, edges) -> list[dict]:
    """Per polar-angle bin [rad]: mean and standard deviation of ``pca_theta − theta`` (mrad)."""
    d = 1e3 * (np.asarray(pca_theta, dtype=np.float64) - np.asarray(theta, dtype=np.float64))
    th = np.asarray(theta, dtype=np.float64)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        stats = _mean_std(d[(th >= lo) & (th <= hi)])
        rows.append({"theta_rad": [float(lo), float(hi)], "unit": "mrad", **stats})
    return rows


def reconstruction_check(generated, reference, *, energy_bins=None, theta_bins=None,
                         bins: int = 5) -> dict:
    """Calibrated energy response/resolution and shower-axis angle of two samples' observables.

    Args:
        generated, reference: :class:`~pcshower.evaluate.observables.Observables` (their
            ``visible_energy`` and ``pca_theta`` scalars and ``energy``/``theta`` conditions).
        energy_bins: incident-energy bin edges [GeV] (default: ``bins`` equal bins over the
            reference's range).
        theta_bins: polar-angle bin edges [rad] (default likewise).

    Returns:
        ``{"calibration": {a, b, ...}, "energy": [...], "angle": [...]}``, each list entry holding
        the ``generated`` and ``reference`` statistics of one bin.
    """
    def arrays(obs):
        s, c = obs.scalars, obs.conditions
        if "pca_theta" not in s:
            raise ValueError("the observables carry no 'pca_theta' (made before pcshower had it?)"
                             ": recompute them with pcshower.evaluate")
        return (s["visible_energy"].cpu().double().numpy(), s["pca_theta"].cpu().double().numpy(),
                c["energy"].cpu().double().numpy(), c["theta"].cpu().double().numpy())

    g_vis, g_pca, g_e, g_th = arrays(generated)
    r_vis, r_pca, r_e, r_th = arrays(reference)
    a, b = linear_calibration(r_vis, r_e)
    e_edges = _edges(r_e, energy_bins, bins)
    t_edges = _edges(r_th, theta_bins, bins)
    energy = [{"energy_gev": g["energy_gev"], "generated": g, "reference": r}
              for g, r in zip(binned_response(a * g_vis + b, g_e, e_edges),
                              binned_response(a * r_vis + b, r_e, e_edges))]
    angle = [{"theta_rad": g["theta_rad"], "generated": g, "reference": r}
             for g, r in zip(binned_angle(g_pca, g_th, t_edges), binned_angle(r_pca, r_th, t_edges))]
    for row in energy + angle:
        for g in (row["generated"], row["reference"]):
            g.pop("energy_gev", None)
            g.pop("theta_rad", None)
    return {"calibration": {"a_gev_per_unit": a, "b_gev": b, "fitted_on": "reference",
                            "form": "E_rec = a * visible_energy + b"},
            "energy": energy, "angle": angle}


def plot_reconstruction(check: dict, path, *, names=("generated", "reference")):
    """Two panels: calibrated resolution (and response) vs energy, axis-angle spread vs angle."""
    import matplotlib.pyplot as plt

    from pcshower.evaluate.plots import GEN_COLOR, REF_COLOR

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, color, label in (("generated", GEN_COLOR, names[0]), ("reference", REF_COLOR, names[1])):
        rows = [r for r in check["energy"] if "resolution" in r[key]]
        x = [0.5 * sum(r["energy_gev"]) for r in rows]
        axes[0].errorbar(x, [100 * r[key]["resolution"] for r in rows],
                         yerr=[100 * r[key]["resolution_err"] for r in rows], fmt="o-", color=color,
                         label=label, ms=4)
        axes[1].errorbar(x, [r[key]["response"] for r in rows],
                         yerr=[r[key]["response_err"] for r in rows], fmt="o-", color=color,
                         label=label, ms=4)
        rows = [r for r in check["angle"] if "std" in r[key]]
        x = [math.degrees(0.5 * sum(r["theta_rad"])) for r in rows]
        axes[2].errorbar(x, [r[key]["std"] for r in rows], yerr=[r[key]["std_err"] for r in rows],
                         fmt="o-", color=color, label=f"{label}: σ", ms=4)
        axes[2].errorbar(x, [r[key]["mean"] for r in rows], yerr=[r[key]["mean_err"] for r in rows],
                         fmt="s--", color=color, label=f"{label}: mean", ms=3, alpha=0.7)
    axes[0].set(xlabel="incident energy [GeV]", ylabel="σ(E_rec/E) / <E_rec/E> [%]",
                title="energy resolution (linear calibration on the reference)")
    axes[1].set(xlabel="incident energy [GeV]", ylabel="<E_rec / E>", title="energy response")
    axes[2].set(xlabel="incident θ [deg]", ylabel="θ_PCA − θ [mrad]", title="shower-axis angle")
    axes[2].axhline(0.0, color="k", lw=0.6)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
