"""Validation plots: histograms and profiles with ratio panels and statistical bands, event displays.

Conventions (those of the CaloChallenge and CaloClouds papers): the reference is a filled grey
histogram with its statistical uncertainty as a hatched band, the generated sample a coloured
line with error bars; both normalised to unit area; the lower panel shows generated/reference
with the reference's relative uncertainty as a band around 1. Uncertainties are Poisson
(sqrt(n) per bin) for histograms and the standard error of the mean for profiles.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["histogram_panel", "profile_panel", "observable_grid", "profile_grid",
           "event_display_points", "event_display_cells", "GEN_COLOR", "REF_COLOR"]

GEN_COLOR = "#d62728"
REF_COLOR = "0.55"


def _hist(x, edges):
    x = np.clip(np.asarray(x, dtype=np.float64), edges[0], edges[-1])  # overflow into edge bins
    counts, _ = np.histogram(x, edges)
    total = max(counts.sum(), 1)
    width = np.diff(edges)
    return counts / total / width, np.sqrt(counts) / total / width


def _new_axes(fig, cell):
    gs = cell.subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
    top = fig.add_subplot(gs[0])
    bottom = fig.add_subplot(gs[1], sharex=top)
    plt.setp(top.get_xticklabels(), visible=False)
    return top, bottom


def _ratio(ax, x_edges, gen, gen_err, ref, ref_err, centers=None):
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ref > 0, gen / ref, np.nan)
        r_err = np.where(ref > 0, gen_err / ref, np.nan)
        band = np.where(ref > 0, ref_err / ref, np.nan)
    if centers is None:
        ax.fill_between(x_edges, np.append(1 - band, 1 - band[-1]), np.append(1 + band, 1 + band[-1]),
                        step="post", color=REF_COLOR, alpha=0.35, lw=0)
        centers = 0.5 * (x_edges[1:] + x_edges[:-1])
    else:
        ax.fill_between(centers, 1 - band, 1 + band, color=REF_COLOR, alpha=0.35, lw=0)
    ax.errorbar(centers, r, yerr=r_err, fmt="o", ms=2.5, color=GEN_COLOR, lw=1)
    ax.axhline(1.0, color="k", lw=0.7)
    ax.set_ylim(0.5, 1.5)
    ax.set_ylabel("gen/ref")


def histogram_panel(fig, cell, generated, reference, edges, *, label: str, unit: str = "",
                    log: bool = False, metrics: dict | None = None, names=("generated", "reference")):
    """One histogram with its ratio panel in a gridspec ``cell``; ``metrics`` (the W1 and
    separation power entries of :func:`~pcshower.evaluate.metrics.compare_with_floor`) is
    written in the corner as multiples of the floor."""
    edges = np.asarray(edges, dtype=np.float64)
    top, bottom = _new_axes(fig, cell)
    h_ref, e_ref = _hist(reference, edges)
    h_gen, e_gen = _hist(generated, edges)
    top.stairs(h_ref, edges, fill=True, color=REF_COLOR, alpha=0.5, label=names[1])
    top.stairs(h_ref + e_ref, edges, baseline=h_ref - e_ref, fill=True, color="none",
               hatch="////", edgecolor="0.3", lw=0)
    top.stairs(h_gen, edges, color=GEN_COLOR, lw=1.4, label=names[0])
    centers = 0.5 * (edges[1:] + edges[:-1])
    top.errorbar(centers, h_gen, yerr=e_gen, fmt="none", color=GEN_COLOR, lw=0.8)
    positive = h_ref[h_ref > 0]
    if log or (positive.size > 2 and positive.max() > 50 * np.median(positive)):
        top.set_yscale("log")  # a spike (e.g. at zero) would flatten everything else
    top.set_ylabel("normalised")
    if metrics:
        w, s = metrics["w1"], metrics["separation_power"]
        top.text(0.03, 0.95, f"W1 = {w['ratio']:.2g}× floor\nS = {s['ratio']:.2g}× floor",
                 transform=top.transAxes, va="top", fontsize=7)
    top.legend(fontsize=7, frameon=False, loc="upper right")
    _ratio(bottom, edges, h_gen, e_gen, h_ref, e_ref)
    bottom.set_xlabel(f"{label} [{unit}]" if unit else label)
    return top, bottom


def profile_panel(fig, cell, generated, reference, centers, *, label: str, ylabel: str,
                  xlabel: str, log: bool = False, names=("generated", "reference")):
    """Mean profile over showers (``[B, K]`` arrays) with the standard error as a band/bars."""
    top, bottom = _new_axes(fig, cell)
    g = np.asarray(generated, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    gm, rm = g.mean(0), r.mean(0)
    ge = g.std(0) / np.sqrt(max(len(g), 1))
    re = r.std(0) / np.sqrt(max(len(r), 1))
    top.fill_between(centers, rm - re, rm + re, color=REF_COLOR, alpha=0.5, lw=0)
    top.plot(centers, rm, color="0.3", lw=1.2, label=names[1])
    top.errorbar(centers, gm, yerr=ge, color=GEN_COLOR, fmt="o-", ms=2.5, lw=1, label=names[0])
    if log:
        top.set_yscale("log")
    top.set_ylabel(ylabel)
    top.set_title(label, fontsize=9)
    top.legend(fontsize=7, frameon=False)
    _ratio(bottom, None, gm, ge, rm, re, centers=centers)
    bottom.set_xlabel(xlabel)
    return top, bottom


def _panel_grid(panels: list[dict], path, draw, axis_key: str, *, ncols: int, title: str | None,
                names, hspace: float):
    n = len(panels)
    nrows = int(np.ceil(n / ncols))
    fig = plt.figure(figsize=(4.2 * ncols, 3.6 * nrows), dpi=110)
    gs = fig.add_gridspec(nrows, ncols, hspace=hspace, wspace=0.3)
    for k, p in enumerate(panels):
        p = dict(p)
        draw(fig, gs[k // ncols, k % ncols], p.pop("generated"), p.pop("reference"),
             p.pop(axis_key), names=names, **p)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def observable_grid(panels: list[dict], path, *, ncols: int = 3, title: str | None = None,
                    names=("generated", "reference")):
    """A PNG of several :func:`histogram_panel` (each a dict of its keyword arguments plus
    ``generated``, ``reference``, ``edges``)."""
    return _panel_grid(panels, path, histogram_panel, "edges", ncols=ncols, title=title,
                       names=names, hspace=0.35)


def profile_grid(panels: list[dict], path, *, ncols: int = 3, title: str | None = None,
                 names=("generated", "reference")):
    """A PNG of several :func:`profile_panel` (each with ``generated``, ``reference``, ``centers``)."""
    return _panel_grid(panels, path, profile_panel, "centers", ncols=ncols, title=title,
                       names=names, hspace=0.4)


def event_display_points(points: np.ndarray, path, *, title: str = "", units=("", "", "", "")):
    """3-D view and x-z / y-z projections of one point cloud ``[n, 4]`` (x, y, z, e); colour and
    size follow the point energy (log scale)."""
    p = np.asarray(points, dtype=np.float64)
    e = p[:, 3]
    fig = plt.figure(figsize=(15, 4.4), dpi=110)
    fig.subplots_adjust(wspace=0.35)
    ax3 = fig.add_subplot(1, 3, 1, projection="3d")
    logc = np.log10(np.clip(e, e[e > 0].min() if (e > 0).any() else 1e-12, None))
    size = 2 + 30 * (e / e.max() if e.size and e.max() > 0 else e)
    sc = ax3.scatter(p[:, 2], p[:, 0], p[:, 1], c=logc, s=size, cmap="viridis", lw=0)
    ax3.set_xlabel(f"z {units[2]}")
    ax3.set_ylabel(f"x {units[0]}")
    ax3.set_zlabel(f"y {units[1]}")
    for k, (i, j, lab) in enumerate(((2, 0, "x"), (2, 1, "y")), start=2):
        ax = fig.add_subplot(1, 3, k)
        ax.scatter(p[:, i], p[:, j], c=logc, s=size, cmap="viridis", lw=0)
        ax.set_xlabel(f"z {units[2]}")
        ax.set_ylabel(f"{lab} {units[j]}")
    fig.colorbar(sc, ax=fig.axes, shrink=0.8, label=f"log10 e {units[3]}")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def event_display_cells(layer: np.ndarray, xy: np.ndarray, energy: np.ndarray, path, *,
                        title: str = "", num_layers: int | None = None):
    """Cells of one shower: cell energies (log colour) against layer and the transverse
    coordinates u, v about the shower's centre of gravity (``xy`` [n, 2] in mm; u = x, v = y for
    a shower along z), and the u-v map of all layers; ``energy`` in MeV."""
    layer = np.asarray(layer)
    xy = np.asarray(xy, dtype=np.float64)
    e = np.asarray(energy, dtype=np.float64)
    nl = int(num_layers or (layer.max() + 1 if layer.size else 1))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9), dpi=110)
    fig.subplots_adjust(wspace=0.3)
    if e.size == 0:
        for ax in axes:
            ax.text(0.5, 0.5, "no hits", ha="center", transform=ax.transAxes)
    else:
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=max(e.min(), 1e-6), vmax=max(e.max(), 1e-6 * 1.01))
        lo = np.quantile(xy, 0.0, axis=0)
        hi = np.quantile(xy, 1.0, axis=0)
        for ax, k, lab in ((axes[0], 0, "u"), (axes[1], 1, "v")):
            ax.scatter(layer, xy[:, k], c=e, s=8, marker="s", cmap="inferno", norm=norm, lw=0)
            ax.set_xlim(-0.5, nl - 0.5)
            ax.set_ylim(lo[k] - 5, hi[k] + 5)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"{lab} [mm]")
        sc = axes[2].scatter(xy[:, 0], xy[:, 1], c=e, s=6, marker="s", cmap="inferno", norm=norm,
                             lw=0)
        axes[2].set_xlabel("u [mm]")
        axes[2].set_ylabel("v [mm]")
        axes[2].set_aspect("equal", adjustable="datalim")
        fig.colorbar(sc, ax=axes, shrink=0.85, label="cell energy [MeV]")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
