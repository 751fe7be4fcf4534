"""One-dimensional distances between samples and their reference-vs-reference statistical floor.

Wasserstein-1 between two 1-D samples u, v is the area between their empirical CDFs,
W1 = integral |F_u(t) - F_v(t)| dt (as in ``scipy.stats.wasserstein_distance``; used per
observable by CaloClouds II, arXiv 2309.05704).

Separation power (CaloChallenge 2022, arXiv 2410.21611; Krause & Shih, CaloFlow,
arXiv 2106.05285): with the two histograms normalised to unit sum over shared bins,
S = 1/2 sum_i (h_i - g_i)^2 / (h_i + g_i), 0 for identical and 1 for disjoint histograms.

A number alone says little: both measures are positive for two finite samples of the same
distribution. The **floor** is the same measure between two disjoint halves A, B of the
reference; the **value** is the measure between an equally large random subsample of the
generated sample and the same half A. Repeating this over ``n_boot`` random splits gives mean and
standard deviation of both (a bootstrap of the split), and ``ratio = value / floor`` reads as
"n times the statistical floor": ~1 means indistinguishable at this sample size.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["wasserstein_1d", "separation_power", "histogram_edges", "compare_with_floor",
           "FloorResult"]


def wasserstein_1d(u: np.ndarray, v: np.ndarray) -> float:
    """Exact W1 distance between the empirical distributions of ``u`` and ``v``."""
    u = np.sort(np.asarray(u, dtype=np.float64).ravel())
    v = np.sort(np.asarray(v, dtype=np.float64).ravel())
    if u.size == 0 or v.size == 0:
        return float("nan")
    if u.size == v.size:
        return float(np.mean(np.abs(u - v)))
    allv = np.sort(np.concatenate([u, v]))
    deltas = np.diff(allv)
    cu = np.searchsorted(u, allv[:-1], side="right") / u.size
    cv = np.searchsorted(v, allv[:-1], side="right") / v.size
    return float(np.sum(np.abs(cu - cv) * deltas))


def histogram_edges(reference: np.ndarray, bins: int = 40, *, integer: bool | None = None,
                    quantiles=(0.001, 0.999)) -> np.ndarray:
    """Shared bin edges from the reference: ``bins`` equal bins over its central quantile range
    (unit-wide bins for integer-valued observables with a small range). Values outside are put
    into the first/last bin by :func:`separation_power`, so a shift still counts."""
    x = np.asarray(reference, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = np.quantile(x, quantiles)
    if integer is None:
        integer = bool(np.all(x == np.round(x)))
    if integer and hi - lo + 1 <= bins:
        return np.arange(np.floor(lo), np.floor(hi) + 2) - 0.5
    if hi <= lo:
        span = abs(lo) * 1e-3 or 1e-3
        lo, hi = lo - span, hi + span
    return np.linspace(lo, hi, bins + 1)


def _hist(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
    h = np.bincount(idx, minlength=edges.size - 1).astype(np.float64)
    return h / max(h.sum(), 1.0)


def separation_power(u: np.ndarray, v: np.ndarray, edges: np.ndarray) -> float:
    """Separation power of two samples histogrammed in ``edges`` (overflow into the edge bins)."""
    u = np.asarray(u, dtype=np.float64).ravel()
    v = np.asarray(v, dtype=np.float64).ravel()
    if u.size == 0 or v.size == 0:
        return float("nan")
    h, g = _hist(u, edges), _hist(v, edges)
    den = h + g
    nz = den > 0
    return float(0.5 * np.sum((h[nz] - g[nz]) ** 2 / den[nz]))


class FloorResult(dict):
    """Mean and spread of a metric and of its floor: keys ``value``, ``value_err``, ``floor``,
    ``floor_err``, ``ratio`` (value / floor) and ``pull`` = (value - floor) /
    sqrt(value_err^2 + floor_err^2), the distance from the floor in units of the split-to-split
    spread (below ~3: consistent with the floor)."""


def _summarise(values: list[float], floors: list[float]) -> FloorResult:
    v, f = np.asarray(values), np.asarray(floors)
    mean_f = float(np.nanmean(f))
    mean_v = float(np.nanmean(v))
    err_v, err_f = float(np.nanstd(v)), float(np.nanstd(f))
    spread = math.hypot(err_v, err_f)
    if spread > 0:
        pull = (mean_v - mean_f) / spread
    else:
        pull = 0.0 if mean_v == mean_f else math.copysign(math.inf, mean_v - mean_f)
    return FloorResult(value=mean_v, value_err=err_v, floor=mean_f, floor_err=err_f,
                       ratio=float(mean_v / mean_f) if mean_f > 0 else
                       (1.0 if mean_v == mean_f else float("inf")), pull=float(pull))


def split_indices(n_ref: int, n_gen: int, n_boot: int, seed: int):
    """The bootstrap splits: per replica ``(A, B, G)`` shower indices: A half of the reference,
    B a disjoint part of the other half and G a subsample of the generated sample, B and G of the
    same size ``min(n_ref // 2, n_gen)``. W1(G, A) is then compared with W1(B, A) at equal
    statistics: a floor from a larger B would be too low (by ~1.7x for 1000 generated against a
    9000-shower reference) and every ratio too high."""
    rng = np.random.default_rng(seed)
    half = n_ref // 2
    if half < 2:
        raise ValueError(f"the reference has {n_ref} showers: need at least 4 to estimate a floor")
    m = min(half, n_gen)
    out = []
    for _ in range(n_boot):
        perm = rng.permutation(n_ref)
        a, b = np.sort(perm[:half]), np.sort(perm[half:half + m])
        g = np.sort(rng.permutation(n_gen)[:m])
        out.append((a, b, g))
    return out


def _gather(values: np.ndarray, owner: np.ndarray | None, showers: np.ndarray, n: int) -> np.ndarray:
    if owner is None:
        return values[showers]
    mask = np.zeros(n, dtype=bool)
    mask[showers] = True
    return values[mask[owner]]


def compare_with_floor(generated: dict, reference: dict, *, n_gen: int, n_ref: int,
                       generated_owner: dict | None = None, reference_owner: dict | None = None,
                       n_boot: int = 10, bins: int = 40, seed: int = 0) -> dict[str, dict]:
    """W1 and separation power of every observable, each with its floor.

    Args:
        generated, reference: name -> 1-D array. Per-shower observables have one entry per
            shower; per-deposit spectra have one entry per deposit and an ``owner`` array.
        n_gen, n_ref: numbers of showers of the two samples.
        generated_owner, reference_owner: name -> shower index of each entry, for spectra.
        n_boot: number of random reference splits.
        bins: histogram bins for the separation power; fewer (down to 10) when a reference half
            has under ``bins**2`` showers, so that bins are not mostly empty.

    Returns:
        name -> ``{"w1": FloorResult, "separation_power": FloorResult, "edges": [...]}`` for
        the observables both samples have (e.g. a sample read as cell hits has no point count).
    """
    common = [k for k in reference if k in generated]
    if not common:
        raise ValueError("the two samples share no observable: compare like with like (points "
                         "with points, cells with cells)")
    generated_owner, reference_owner = generated_owner or {}, reference_owner or {}
    splits = split_indices(n_ref, n_gen, n_boot, seed)
    bins = int(min(bins, max(10, math.isqrt(max(n_ref // 2, 1)))))
    results = {}
    for name in common:
        ref = np.asarray(reference[name], dtype=np.float64)
        gen = np.asarray(generated[name], dtype=np.float64)
        ref_own, gen_own = reference_owner.get(name), generated_owner.get(name)
        edges = histogram_edges(ref, bins)
        w, wf, s, sf = [], [], [], []
        for a, b, g in splits:
            ra = _gather(ref, ref_own, a, n_ref)
            rb = _gather(ref, ref_own, b, n_ref)
            gg = _gather(gen, gen_own, g, n_gen)
            w.append(wasserstein_1d(gg, ra))
            wf.append(wasserstein_1d(rb, ra))
            s.append(separation_power(gg, ra, edges))
            sf.append(separation_power(rb, ra, edges))
        results[name] = {"w1": _summarise(w, wf), "separation_power": _summarise(s, sf),
                         "edges": edges.tolist()}
    return results
