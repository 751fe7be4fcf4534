"""PNG drawings of a geometry: its material stack along the depth, and its cells on the face."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["draw_geometry"]

_COLOURS = {"W": "#4d4d4d", "Pb": "#6b6b8a", "Fe": "#a0522d", "Cu": "#b87333", "Si": "#e6b422",
            "LAr": "#7fb3d5", "PbWO4": "#8e44ad", "Scintillator": "#58d68d", "Air": "#f4f6f7"}


def draw_geometry(geometry, path: str | Path) -> Path:
    """Write a two-panel PNG: left, the slab sequence (active slabs outlined) with the readout
    layers; right, the cells: a corner of a planar module, the r-alpha bins of the first layer,
    or the inclined plates and layer boundaries in r-phi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle, Wedge

    fig, (ax_stack, ax_cells) = plt.subplots(1, 2, figsize=(12, 5.2))
    stack = geometry.stack
    edges = stack.z_edges_mm
    for i, slab in enumerate(stack.slabs):
        colour = _COLOURS.get(slab.material.name, "#cccccc")
        ax_stack.add_patch(Rectangle((edges[i], 0.0), edges[i + 1] - edges[i], 1.0, facecolor=colour,
                                     edgecolor="black" if slab.active else "none", linewidth=0.3))
    for k, (a, b) in enumerate(geometry.layer_span_mm):
        ax_stack.plot([a, b], [1.05 + 0.05 * (k % 2)] * 2, color="C3", linewidth=2)
    ax_stack.set_xlim(0, edges[-1])
    ax_stack.set_ylim(0, 1.25)
    ax_stack.set_yticks([])
    ax_stack.set_xlabel("depth from the front face [mm]")
    used = sorted({s.material.name for s in stack.slabs})
    ax_stack.legend(handles=[Patch(color=_COLOURS.get(m, "#cccccc"), label=m) for m in used]
                    + [Patch(color="C3", label="readout layers")], loc="lower right", fontsize=8, framealpha=0.9)
    ax_stack.set_title(f"{geometry.num_layers} readout layers, {stack.total_x0:.1f} X0, "
                       f"X0_eff {geometry.x0_eff_mm:.2f} mm, R_M,eff {geometry.rm_eff_mm:.1f} mm", fontsize=9)

    kind = geometry.readout.kind
    if kind == "planar":
        pitch = geometry.readout.pitch.numpy()
        half = geometry.modules.half.numpy()
        for i in range(21):
            ax_cells.axvline(i * pitch[0], color="grey", linewidth=0.4)
            ax_cells.axhline(i * pitch[1], color="grey", linewidth=0.4)
        ax_cells.set_xlim(0, 20 * pitch[0])
        ax_cells.set_ylim(0, 20 * pitch[1])
        ax_cells.set_aspect("equal")
        ax_cells.set_xlabel("u [mm] (from the module centre)")
        ax_cells.set_ylabel("v [mm]")
        ax_cells.set_title(f"{len(geometry.modules)} modules ({', '.join(sorted(set(n.rsplit(' ', 1)[0] for n in geometry.modules.names)))}), "
                           f"cells {pitch[0]:g} x {pitch[1]:g} mm, first module "
                           f"{2 * half[0, 0]:.0f} x {2 * half[0, 1]:.0f} mm", fontsize=9)
    elif kind == "cylindrical":
        ro = geometry.readout
        layer = int(np.argmax((ro.n_r * ro.n_alpha).numpy()))
        r_edges = ro.r_edges[layer].numpy()
        n_a = int(ro.n_alpha[layer])
        for j in range(n_a):
            a0 = -180.0 + 360.0 * j / n_a
            for k in range(len(r_edges) - 1):
                ax_cells.add_patch(Wedge((0, 0), r_edges[k + 1], a0, a0 + 360.0 / n_a,
                                         width=r_edges[k + 1] - r_edges[k], facecolor="none",
                                         edgecolor="C0", linewidth=0.4))
        rmax = r_edges[-1]
        ax_cells.set_xlim(-rmax * 1.05, rmax * 1.05)
        ax_cells.set_ylim(-rmax * 1.05, rmax * 1.05)
        ax_cells.set_aspect("equal")
        ax_cells.set_xlabel("u [mm] (from the impact point)")
        ax_cells.set_ylabel("v [mm]")
        calo_id = ro.layer_ids[layer] if ro.layer_ids[layer] is not None else layer
        ax_cells.set_title(f"layer {calo_id}: {len(r_edges) - 1} r x {n_a} alpha bins; "
                           f"{geometry.num_cells} voxels in all", fontsize=9)
    else:
        ro = geometry.readout
        radii = ro.radii.numpy()
        dphi = 2 * math.pi / ro.num_planes
        r = np.linspace(ro.rmin, ro.rmax, 100)
        ca, sa = math.cos(ro.alpha), math.sin(ro.alpha)
        s = -ro.rmin * ca + np.sqrt(r * r - (ro.rmin * sa) ** 2)
        lean = np.arctan2(s * sa, ro.rmin + s * ca)
        for k in range(12):
            phi = k * dphi + lean
            ax_cells.plot(r * np.cos(phi), r * np.sin(phi), color="C1" if k % 2 == 0 else "C7",
                          linewidth=0.8)
        phis = np.linspace(-0.5 * dphi, lean[-1] + 12 * dphi, 100)
        for rr in radii:
            ax_cells.plot(rr * np.cos(phis), rr * np.sin(phis), color="C3", linewidth=0.5)
        ax_cells.set_aspect("equal")
        ax_cells.set_xlabel("x [mm]")
        ax_cells.set_ylabel("y [mm]")
        ax_cells.set_title(f"{ro.num_planes} plates at {math.degrees(ro.alpha):.2f} deg (every "
                           f"2nd bounds a merged cell), {ro.num_layers} layers (red)", fontsize=9)
    fig.suptitle(f"{geometry.name}: {geometry.title}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
