"""The three readout kinds: planar cell grids, CaloChallenge r-alpha bins, inclined-plate theta-module cells.

Each readout turns (readout layer, position) into a flat cell id, vectorised over points, and
documents its numbering:

* ``planar`` — module ``m`` (barrel staves, then endcaps +z, -z), layer ``l``, cell column
  ``iu`` and row ``iv``: ``id = offset[m] + (l * nv[m] + iv) * nu[m] + iu``; the grid has a cell
  edge at the module centre: ``iu = floor(u / pitch_u) + nu / 2``.
* ``cylindrical`` — CaloChallenge order, r fastest, then alpha, then layer:
  ``id = offset[l] + ia * n_r[l] + ir`` with ``alpha = atan2(v, u)`` in ``[-pi, pi)``, binned from
  ``-pi`` (as ``XMLHandler`` of CaloChallenge/homepage), and ``r`` measured from the impact point
  in the face plane.
* ``inclined`` — layer ``l``, merged theta cell ``it``, merged module cell ``im``:
  ``id = offset[l] + it * n_module_cells[l] + im``; theta from the interaction point with bin
  centres at ``theta_offset + k * theta_grid`` (the FCCSW ``GridTheta`` convention), module ``k``
  is the gap that starts at azimuth ``2 pi k / num_planes`` on the inner radius.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pcshower.geometry.frames import Modules

__all__ = ["PlanarReadout", "CylindricalReadout", "InclinedReadout", "inclined_radii",
           "inclined_stack_groups"]


class PlanarReadout:
    """Square (or rectangular) cells on flat modules; see the module docstring for the numbering."""

    kind = "planar"

    def __init__(self, spec: dict, modules: Modules, num_layers: int, where: str,
                 thickness_mm: float = 0.0):
        self.pitch = torch.tensor(spec["cell_size_mm"], dtype=torch.float64)
        if not torch.isfinite(modules.half).all():
            from pcshower.geometry.schema import GeometryError
            raise GeometryError(f"{where}: placement.plane.half_width_mm: a planar readout needs the "
                                f"module size to number its cells (give [half_u, half_v] in mm)")
        self.modules = modules
        self.num_layers = num_layers
        # the grid covers the module at its back face (barrel staves widen with depth)
        widest = modules.half.clone()
        widest[:, 0] += thickness_mm * modules.widen
        n = 2 * torch.ceil(widest / self.pitch - 1e-9).long()  # [M, 2]
        self.nu, self.nv = n[:, 0], n[:, 1]
        per_module = num_layers * self.nu * self.nv
        self.offset = torch.zeros(len(modules) + 1, dtype=torch.int64)
        torch.cumsum(per_module, 0, out=self.offset[1:])
        self.num_cells = int(self.offset[-1])

    def cell_index(self, layer: torch.Tensor, uv: torch.Tensor, module: torch.Tensor,
                   per_module=None) -> torch.Tensor:
        """Flat cell ids (-1 off the module) of points at local ``uv`` (u, v, depth) [P, 3] in
        ``layer`` [P] of ``module`` [P]. ``per_module(table)`` may supply per-point values of a
        per-module table (a faster route than gathering by ``module``)."""
        dev = uv.device
        m = module.clamp_min(0)
        get = per_module or (lambda table: table.to(dev)[m])
        f64 = lambda t: t.to(torch.float64) if isinstance(t, torch.Tensor) else float(t)  # noqa: E731
        nu, nv = get(self.nu), get(self.nv)
        pitch = self.pitch.tolist()
        u, v, w = uv[:, 0], uv[:, 1], uv[:, 2]
        # integer arithmetic in float64 (exact below 2^53, and cheaper than int64 on CPU);
        # fu, fv are the column and row relative to the module centre
        fu, fv = torch.floor(u / pitch[0]), torch.floor(v / pitch[1])
        half_nu, half_nv = f64(nu // 2), f64(nv // 2)
        au, av = u.abs(), v.abs()
        widen = get(self.modules.widen)
        half_u = get(self.modules.half[:, 0])
        if not (isinstance(widen, torch.Tensor) and widen.ndim == 0 and float(widen) == 0.0):
            half_u = w * widen + half_u
        ok = ((fu >= -half_nu) & (fu < half_nu) & (fv >= -half_nv) & (fv < half_nv)
              & (au <= half_u) & (av <= get(self.modules.half[:, 1])) & (layer >= 0))
        if isinstance(module, torch.Tensor) and module.ndim:
            ok &= module >= 0
        elif int(module) < 0:
            ok &= False
        if bool((self.modules.hole > 0).any()):
            ok &= ~((au < get(self.modules.hole[:, 0])) & (av < get(self.modules.hole[:, 1])))
        nu_f = f64(nu)
        cell = (layer.to(torch.float64) * f64(nv) + (fv + half_nv)) * nu_f + (fu + half_nu)
        cell += f64(get(self.offset[:-1])) + 1.0
        cell *= ok.to(torch.float64)  # -1 off the module
        return cell.to(torch.int64) - 1

    def decode(self, cell_id: torch.Tensor):
        """``(module, layer, iu, iv)`` of flat cell ids."""
        cell_id = torch.as_tensor(cell_id, dtype=torch.int64)
        m = torch.searchsorted(self.offset.to(cell_id.device), cell_id, right=True) - 1
        nu, nv = self.nu.to(cell_id.device)[m], self.nv.to(cell_id.device)[m]
        local = cell_id - self.offset.to(cell_id.device)[m]
        return m, local // (nu * nv), local % nu, (local // nu) % nv

    def cell_layer(self, cell_id: torch.Tensor) -> torch.Tensor:
        return self.decode(cell_id)[1]

    def cell_centers(self, cell_id: torch.Tensor, layer_depth_mm: torch.Tensor) -> torch.Tensor:
        m, layer, iu, iv = self.decode(cell_id)
        pitch = self.pitch
        u = (iu - self.nu[m] // 2).double() * pitch[0] + 0.5 * pitch[0]
        v = (iv - self.nv[m] // 2).double() * pitch[1] + 0.5 * pitch[1]
        mods = self.modules
        return (mods.origin[m] + u[:, None] * mods.u[m] + v[:, None] * mods.v[m]
                + layer_depth_mm[layer][:, None] * mods.n[m])


class CylindricalReadout:
    """CaloChallenge-style r-alpha bins per layer, centred on each shower's impact point."""

    kind = "cylindrical"

    def __init__(self, spec: dict):
        layers = spec["layers"]
        self.num_layers = len(layers)
        self.r_edges = [torch.tensor(lay["r_edges_mm"], dtype=torch.float64) for lay in layers]
        self.layer_ids = [lay.get("id") for lay in layers]
        self.n_r = torch.tensor([len(e) - 1 for e in self.r_edges], dtype=torch.int64)
        self.n_alpha = torch.tensor([lay["n_alpha"] for lay in layers], dtype=torch.int64)
        k = int(self.n_r.max()) + 1
        self.edges = torch.full((self.num_layers, k), math.inf, dtype=torch.float64)
        for i, e in enumerate(self.r_edges):
            self.edges[i, :len(e)] = e
        self.offset = torch.zeros(self.num_layers + 1, dtype=torch.int64)
        torch.cumsum(self.n_r * self.n_alpha, 0, out=self.offset[1:])
        self.num_cells = int(self.offset[-1])

    def cell_index(self, layer: torch.Tensor, uv: torch.Tensor, module: torch.Tensor,
                   per_module=None) -> torch.Tensor:
        dev = uv.device
        lay = layer.clamp_min(0)
        r = torch.hypot(uv[:, 0], uv[:, 1])
        edges = self.edges.to(device=dev, dtype=uv.dtype)[lay]  # [P, K]
        ir = (r[:, None] >= edges).sum(dim=1) - 1
        n_r, n_a = self.n_r.to(dev)[lay], self.n_alpha.to(dev)[lay]
        alpha = torch.atan2(uv[:, 1], uv[:, 0])
        ia = torch.floor((alpha + math.pi) / (2 * math.pi) * n_a).long().clamp(max=n_a - 1)
        ia = ia.clamp_min(0)
        ok = (module >= 0) & (layer >= 0) & (ir >= 0) & (ir < n_r)
        cell = self.offset.to(dev)[lay] + ia * n_r + ir
        return torch.where(ok, cell, torch.full_like(cell, -1))

    def decode(self, cell_id: torch.Tensor):
        """``(layer, ia, ir)`` of flat voxel ids."""
        return _decode_layered(cell_id, self.offset, self.n_r)

    def cell_layer(self, cell_id: torch.Tensor) -> torch.Tensor:
        return self.decode(cell_id)[0]

    def cell_centers(self, cell_id: torch.Tensor, layer_depth_mm: torch.Tensor) -> torch.Tensor:
        """Centres in the local frame of a shower entering at the origin along +z: (u, v, depth)."""
        layer, ia, ir = self.decode(cell_id)
        r = 0.5 * (self.edges[layer, ir] + self.edges[layer, ir + 1])
        alpha = -math.pi + (ia.double() + 0.5) * 2 * math.pi / self.n_alpha[layer].double()
        return torch.stack([r * torch.cos(alpha), r * torch.sin(alpha), layer_depth_mm[layer]], -1)


def inclined_radii(spec: dict) -> np.ndarray:
    """Radii [L+1] of the layer boundaries of an inclined-plate barrel.

    A plate starts on the inner radius ``R`` at angle ``a`` to the radial direction; a point at
    length ``s`` along it lies at ``r^2 = R^2 + 2 R s cos a + s^2`` (layer lengths are given along
    the electrode, as in the k4geo ``ECalBarrel_NobleLiquid_InclinedTrapezoids`` description).
    """
    rmin = spec["inner_radius_mm"]
    a = math.radians(spec["inclination_deg"])
    s = np.concatenate([[0.0], np.cumsum(spec["layer_lengths_mm"])])
    return np.sqrt(rmin ** 2 + 2 * rmin * s * math.cos(a) + s ** 2)


def inclined_stack_groups(spec: dict):
    """The radial sampling structure of an inclined-plate barrel as planar stack groups.

    A particle from the interaction point crosses ``crossings[l]`` plates in layer ``l``. Between
    plates the perpendicular pitch at radius ``r`` is ``2 pi r / N cos(beta)``, with the plate's
    angle to the radial direction ``sin(beta) = R sin(a) / r``; the liquid gap is what the plate
    parts leave of it. Each crossing becomes one cell of the layer's radial thickness, with slab
    thicknesses in the same proportions as the perpendicular pitch (absorber, plate parts, then
    then the active gap), so the material fractions are exact.
    """
    from pcshower.geometry.schema import StackGroup

    radii = inclined_radii(spec)
    rmin, n_planes = spec["inner_radius_mm"], spec["num_planes"]
    a = math.radians(spec["inclination_deg"])
    groups = []
    for layer, crossings in enumerate(spec["crossings"]):
        r_mid = 0.5 * (radii[layer] + radii[layer + 1])
        beta = math.asin(min(1.0, rmin * math.sin(a) / r_mid))
        pitch = 2 * math.pi * r_mid / n_planes * math.cos(beta)
        parts = [(spec["absorber"][layer], spec["absorber_mm"], False)]
        parts += [(m, t, False) for m, t in spec["plate_mm"].items()]
        plate = sum(t for _, t, _ in parts)
        gap = pitch - plate
        if gap <= 0:
            raise ValueError(f"inclined readout layer {layer}: plates ({plate:.3f} mm) do not fit the "
                             f"pitch ({pitch:.3f} mm) at r = {r_mid:.1f} mm")
        scale = (radii[layer + 1] - radii[layer]) / crossings / pitch
        slabs = [(m, t * scale, False) for m, t, _ in parts] + [(spec["gap_material"], gap * scale, True)]
        groups.append(StackGroup(tuple(slabs), 1, True, None, crossings))
    return groups


class InclinedReadout:
    """Theta x module cells of a noble-liquid barrel with inclined absorber plates (ALLEGRO)."""

    kind = "inclined"

    def __init__(self, spec: dict):
        self.spec = spec
        self.radii = torch.tensor(inclined_radii(spec), dtype=torch.float64)
        self.num_layers = len(spec["layer_lengths_mm"])
        self.rmin, self.rmax = float(self.radii[0]), float(self.radii[-1])
        self.half_length = spec["half_length_mm"]
        self.alpha = math.radians(spec["inclination_deg"])
        self.num_planes = spec["num_planes"]
        self.grid, self.theta0 = spec["theta_grid_rad"], spec["theta_offset_rad"]
        self.n_theta_bins = int(round((math.pi - 2 * self.theta0) / self.grid)) + 1
        self.merged_theta = torch.tensor(spec["merged_theta"], dtype=torch.int64)
        self.merged_modules = torch.tensor(spec["merged_modules"], dtype=torch.int64)
        self.n_theta = (self.n_theta_bins + self.merged_theta - 1) // self.merged_theta
        self.n_mod = self.num_planes // self.merged_modules
        self.offset = torch.zeros(self.num_layers + 1, dtype=torch.int64)
        torch.cumsum(self.n_theta * self.n_mod, 0, out=self.offset[1:])
        self.num_cells = int(self.offset[-1])

    def plate_start_phi(self, r: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Azimuth on the inner radius where the plate through ``(r, phi)`` starts."""
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        s = -self.rmin * ca + torch.sqrt((r * r - (self.rmin * sa) ** 2).clamp_min(0.0))
        return phi - torch.atan2(s * sa, self.rmin + s * ca)

    def cell_index(self, layer: torch.Tensor, xyz: torch.Tensor, module: torch.Tensor,
                   per_module=None) -> torch.Tensor:
        dev = xyz.device
        lay = layer.clamp_min(0)
        r = torch.hypot(xyz[:, 0], xyz[:, 1])
        phi = torch.atan2(xyz[:, 1], xyz[:, 0])
        theta = torch.atan2(r, xyz[:, 2])
        k = torch.floor((theta - self.theta0) / self.grid + 0.5).long()
        start = torch.remainder(self.plate_start_phi(r, phi), 2 * math.pi)
        plate = torch.floor(start / (2 * math.pi / self.num_planes)).long().clamp(0, self.num_planes - 1)
        it = torch.div(k.clamp_min(0), self.merged_theta.to(dev)[lay], rounding_mode="floor")
        im = torch.div(plate, self.merged_modules.to(dev)[lay], rounding_mode="floor")
        ok = ((module >= 0) & (layer >= 0) & (k >= 0) & (k < self.n_theta_bins)
              & (xyz[:, 2].abs() <= self.half_length))
        cell = self.offset.to(dev)[lay] + it * self.n_mod.to(dev)[lay] + im
        return torch.where(ok, cell, torch.full_like(cell, -1))

    def decode(self, cell_id: torch.Tensor):
        """``(layer, theta cell, module cell)`` of flat cell ids."""
        return _decode_layered(cell_id, self.offset, self.n_mod)

    def cell_layer(self, cell_id: torch.Tensor) -> torch.Tensor:
        return self.decode(cell_id)[0]

    def cell_centers(self, cell_id: torch.Tensor, layer_depth_mm: torch.Tensor) -> torch.Tensor:
        """Global centres: mid-radius of the layer, mean theta of the merged bins, azimuth of the
        merged gap's mid-plate point at that radius."""
        layer, it, im = self.decode(cell_id)
        mt, mm = self.merged_theta[layer], self.merged_modules[layer]
        first, last = it * mt, (it * mt + mt - 1).clamp(max=self.n_theta_bins - 1)
        theta = self.theta0 + 0.5 * (first + last).double() * self.grid
        r = 0.5 * (self.radii[layer] + self.radii[layer + 1])
        start = (im * mm).double() * 2 * math.pi / self.num_planes + 0.5 * mm.double() * 2 * math.pi / self.num_planes
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        s = -self.rmin * ca + torch.sqrt(r * r - (self.rmin * sa) ** 2)
        phi = start + torch.atan2(s * sa, self.rmin + s * ca)
        return torch.stack([r * torch.cos(phi), r * torch.sin(phi), r / torch.tan(theta)], -1)


def _decode_layered(cell_id, offset: torch.Tensor, inner: torch.Tensor):
    """``(layer, outer, inner)`` of flat ids numbered layer by layer from ``offset [L]``, with
    ``inner[layer]`` the fastest-running index's size in each layer."""
    cell_id = torch.as_tensor(cell_id, dtype=torch.int64)
    layer = torch.searchsorted(offset, cell_id, right=True) - 1
    local = cell_id - offset[layer]
    width = inner[layer]
    return layer, local // width, local % width
