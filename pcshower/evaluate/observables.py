"""Physics observables of showers, computed batched from flat deposits (points or cell hits).

Every observable is computed from explicit flat tensors — the energy of each deposit, the index
of the shower it belongs to, its layer and its (x, y, z) position — so that the same code serves
point clouds (:func:`point_observables`), cell hits (:func:`cell_observables`) and handmade test
showers. All reductions are scatter-adds over ``shower * bins + bin``: no Python loop over
showers or deposits, and the same code runs on CPU and GPU.

Definitions (per shower, over deposits with energy >= threshold):

- ``visible_energy`` = sum e_i; ``energy_ratio`` = visible_energy / incident energy (same unit);
- ``num_hits`` = number of deposits above threshold (cells above threshold, or points);
- ``cog_{x,y,z}`` = sum e_i x_i / sum e_i (in the coordinates of the deposits);
- ``width_{u,v,long}`` = sqrt(sum e_i (w_i - w_cog)^2 / sum e_i) for the coordinate w along the
  transverse unit vectors u, v and along the shower axis (u = x, v = y for an axis along z);
- ``layer_energy[l]`` = energy in layer l, ``layer_occupancy[l]`` = deposits in layer l;
- ``radial_energy[k]`` = energy at distance r from the shower axis (through the centre of
  gravity, along the incident direction) in bin k
  (the last bin collects everything beyond the last edge);
- ``energy_first_layers`` / ``energy_last_layers`` = fraction of the visible energy in the
  first / last ``edge_layers`` layers;
- spectra (per deposit, not per shower): ``hit_energy`` (cell-energy or point-energy spectrum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pcshower.units import DETECTOR_FRAME, GEV_TO_MEV

__all__ = [
    "Observables",
    "deposit_observables",
    "point_observables",
    "cell_observables",
    "geometry_cell_observables",
    "shower_axes",
    "default_layer_edges",
    "default_radial_edges",
    "transverse_basis",
    "mip_threshold_mev",
]

SCALAR_UNITS_DETECTOR = {
    "visible_energy": "MeV", "energy_ratio": "", "num_hits": "", "num_points": "",
    "cog_x": "mm", "cog_y": "mm", "cog_z": "mm", "width_u": "mm", "width_v": "mm",
    "width_long": "mm", "pca_theta": "rad", "energy_first_layers": "", "energy_last_layers": "",
}


@dataclass
class Observables:
    """Observables of a batch of ``B`` showers.

    Attributes:
        scalars: name -> ``[B]`` float64 tensor (one number per shower).
        profiles: name -> ``[B, K]`` float64 tensor (layer and radial profiles).
        spectra: name -> ``([H] float64 values, [H] int64 shower index)`` (per-deposit spectra,
            possibly a random subsample of the deposits; see ``spectrum_fraction``).
        conditions: ``energy`` [GeV], ``theta``, ``phi`` [rad] of each shower, ``[B]``.
        units: unit of each observable (for plot labels).
        edges: the bin edges used for profiles (``radial`` and, for points, ``layer``).
    """

    scalars: dict[str, torch.Tensor]
    profiles: dict[str, torch.Tensor]
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]]
    conditions: dict[str, torch.Tensor]
    units: dict[str, str] = field(default_factory=dict)
    edges: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.conditions["energy"].numel())

    def to(self, device) -> "Observables":
        return Observables({k: v.to(device) for k, v in self.scalars.items()},
                           {k: v.to(device) for k, v in self.profiles.items()},
                           {k: (v.to(device), i.to(device)) for k, (v, i) in self.spectra.items()},
                           {k: v.to(device) for k, v in self.conditions.items()},
                           dict(self.units), dict(self.edges))

    def select(self, mask_or_index) -> "Observables":
        """The observables of a subset of showers (boolean mask or index tensor)."""
        index = torch.as_tensor(mask_or_index)
        n = len(self)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).flatten()
        index = index.to(torch.int64).cpu()
        new_pos = torch.full((n,), -1, dtype=torch.int64)
        new_pos[index] = torch.arange(index.numel())
        spectra = {}
        for k, (values, owner) in self.spectra.items():
            mapped = new_pos[owner.cpu()]
            keep = mapped >= 0
            spectra[k] = (values[keep.to(values.device)], mapped[keep].to(owner.device))
        return Observables({k: v[index.to(v.device)] for k, v in self.scalars.items()},
                           {k: v[index.to(v.device)] for k, v in self.profiles.items()},
                           spectra, {k: v[index.to(v.device)] for k, v in self.conditions.items()},
                           dict(self.units), dict(self.edges))

    @staticmethod
    def concat(parts: list["Observables"]) -> "Observables":
        """Concatenate the observables of consecutive batches (shower indices are shifted)."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of Observables")
        first = parts[0]
        for k, p in enumerate(parts[1:], 1):
            if set(p.scalars) != set(first.scalars) or set(p.profiles) != set(first.profiles):
                raise ValueError(f"batch {k} has different observables than batch 0")
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        spectra = {k: (torch.cat([p.spectra[k][0] for p in parts]),
                       torch.cat([p.spectra[k][1] + int(o) for p, o in zip(parts, offsets)]))
                   for k in first.spectra}
        return Observables({k: torch.cat([p.scalars[k] for p in parts]) for k in first.scalars},
                           {k: torch.cat([p.profiles[k] for p in parts]) for k in first.profiles},
                           spectra,
                           {k: torch.cat([p.conditions[k] for p in parts]) for k in first.conditions},
                           dict(first.units), dict(first.edges))

    def one_dimensional(self) -> dict[str, np.ndarray]:
        """Every per-shower observable as a 1-D numpy array; profile bins become
        ``name[k]`` entries (the CaloClouds/CaloChallenge way of comparing profiles)."""
        out = {k: v.detach().cpu().double().numpy() for k, v in self.scalars.items()}
        for name, prof in self.profiles.items():
            p = prof.detach().cpu().double().numpy()
            for k in range(p.shape[1]):
                out[f"{name}[{k}]"] = p[:, k]
        return out

    def feature_matrix(self, include_conditions: bool = False, exclude=()) -> np.ndarray:
        """``[B, D]`` high-level feature vector (scalars, then the profiles normalised to the
        visible energy), the input of the classifier test and of FPD/KPD; scalars named in
        ``exclude`` are left out."""
        cols = [v.detach().cpu().double().numpy() for k, v in self.scalars.items()
                if k not in exclude]
        vis = self.scalars["visible_energy"].detach().cpu().double().numpy()
        safe = np.where(vis > 0, vis, 1.0)
        for name, prof in self.profiles.items():
            p = prof.detach().cpu().double().numpy()
            cols.extend((p / safe[:, None]).T if name.endswith("energy") else p.T)
        if include_conditions:
            cols.append(np.log(self.conditions["energy"].cpu().double().numpy()))
            cols.append(self.conditions["theta"].cpu().double().numpy())
        return np.stack(cols, axis=1) if cols else np.zeros((len(self), 0))

    def feature_names(self, include_conditions: bool = False, exclude=()) -> list[str]:
        names = [k for k in self.scalars if k not in exclude]
        for name, prof in self.profiles.items():
            names.extend(f"{name}[{k}]" + ("/visible" if name.endswith("energy") else "")
                         for k in range(prof.shape[1]))
        if include_conditions:
            names += ["log_incident_energy", "theta"]
        return names


def _scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def transverse_basis(axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors ``(u, v)`` [B, 3] orthogonal to ``axis`` [B, 3] (and to each other), with
    ``u = x`` and ``v = y`` for an axis along z; continuous for axes within ~25 deg of z."""
    d = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ref = torch.zeros_like(d)
    near_z = d[:, 2].abs() > 0.9
    ref[:, 1] = torch.where(near_z, 1.0, 0.0)
    ref[:, 2] = torch.where(near_z, 0.0, 1.0)
    u = torch.linalg.cross(ref, d)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return u, torch.linalg.cross(d, u)


def _pca_polar_angle(e, shower, b, local, var, safe, hits, u, v, axis) -> torch.Tensor:
    """``[B]`` polar angle (rad) of each shower's principal axis: the eigenvector of the largest
    eigenvalue of the energy-weighted covariance of its deposits (the shower-axis angle that
    CaloClouds3, arXiv 2511.01460, checks after reconstruction), oriented along the
    incident ``axis`` and taken in the deposits' coordinates. Showers with fewer than three
    deposits have no axis; they get the incident axis' own polar angle."""
    cross = torch.stack([_scatter_sum(e * local[:, i] * local[:, j], shower, b)
                         for i, j in ((0, 1), (0, 2), (1, 2))], 1)
    cov = torch.zeros(b, 3, 3, dtype=torch.float64, device=e.device)
    cov[:, [0, 1, 2], [0, 1, 2]] = var
    for k, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
        cov[:, i, j] = cov[:, j, i] = cross[:, k]
    cov = cov / safe[:, None, None]
    w = torch.linalg.eigh(cov)[1][:, :, -1]  # local (u, v, axis) components, largest eigenvalue
    w = torch.where(w[:, 2:3] < 0, -w, w)
    w = torch.where((hits >= 3)[:, None], w, torch.tensor([0.0, 0.0, 1.0], dtype=w.dtype,
                                                               device=w.device))
    direction = w[:, :1] * u + w[:, 1:2] * v + w[:, 2:] * axis
    return torch.acos((direction[:, 2] / direction.norm(dim=1).clamp_min(1e-12)).clamp(-1, 1))


def deposit_observables(energy: torch.Tensor, shower: torch.Tensor, num_showers: int, *,
                        xyz: torch.Tensor, layer: torch.Tensor, num_layers: int,
                        incident_energy: torch.Tensor, radial_edges, axis: torch.Tensor | None = None,
                        threshold: float = 0.0, edge_layers: int = 3, conditions: dict | None = None,
                        spectrum_name: str = "hit_energy", max_spectrum_entries: int | None = None,
                        generator: torch.Generator | None = None) -> Observables:
    """Observables from flat deposits.

    Args:
        energy: ``[H]`` deposit energies (MeV for cells, MeV or energy fraction for points).
        shower: ``[H]`` int64 index of the shower of each deposit, in ``[0, num_showers)``.
        xyz: ``[H, 3]`` deposit positions (cell centres, or point coordinates).
        layer: ``[H]`` int64 layer of each deposit in ``[0, num_layers)``.
        incident_energy: ``[B]`` incident energy in the unit of ``energy`` (for ``energy_ratio``).
        radial_edges: increasing bin edges of the distance from the shower axis, in the unit of
            ``xyz``; the axis runs along ``axis`` through the shower's centre of gravity.
        axis: ``[B, 3]`` shower direction in the coordinates of ``xyz`` (default: +z). Widths
            are energy-weighted standard deviations along the transverse unit vectors u, v
            (``width_u``, ``width_v``; u = x and v = y for an axis along z) and along the axis
            (``width_long``).
        threshold: deposits below it are ignored (0.5 MIP for cells; 0 for points).
        edge_layers: how many layers count as "first" and "last".
        max_spectrum_entries: keep a uniform random subset of at most this many deposits for
            the per-deposit spectrum (memory stays bounded on 100k-shower samples).
    """
    b = int(num_showers)
    dev = energy.device
    e = energy.to(torch.float64)
    keep = e >= threshold if threshold > 0 else e > 0
    e, shower = e[keep], shower[keep].to(torch.int64)
    pos = xyz[keep].to(torch.float64)
    layer = layer[keep].to(torch.int64).clamp(0, num_layers - 1)
    ones = torch.ones_like(e)
    if axis is None:
        axis = torch.zeros(b, 3, dtype=torch.float64, device=dev)
        axis[:, 2] = 1.0
    axis = axis.to(dev, torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    u, v = transverse_basis(axis)

    vis = _scatter_sum(e, shower, b)
    hits = _scatter_sum(ones, shower, b)
    safe = torch.where(vis > 0, vis, torch.ones_like(vis))
    cog = torch.stack([_scatter_sum(e * pos[:, k], shower, b) for k in range(3)], 1) / safe[:, None]
    d = pos - cog[shower]
    local = torch.stack([(d * u[shower]).sum(1), (d * v[shower]).sum(1),
                         (d * axis[shower]).sum(1)], 1)
    var = torch.stack([_scatter_sum(e * local[:, k] ** 2, shower, b) for k in range(3)], 1)
    width = (var / safe[:, None]).clamp_min(0).sqrt()
    pca_theta = _pca_polar_angle(e, shower, b, local, var, safe, hits, u, v, axis)

    layer_energy = _scatter_sum(e, shower * num_layers + layer, b * num_layers).view(b, num_layers)
    layer_occ = _scatter_sum(ones, shower * num_layers + layer, b * num_layers).view(b, num_layers)
    k_edge = max(1, min(int(edge_layers), num_layers))

    edges = torch.as_tensor(np.asarray(radial_edges, dtype=np.float64), device=dev)
    nr = edges.numel() - 1
    if nr < 1:
        raise ValueError(f"radial_edges needs at least two edges, got {edges.tolist()}")
    r = torch.hypot(local[:, 0], local[:, 1])
    rbin = (torch.bucketize(r, edges, right=True) - 1).clamp(0, nr - 1)
    radial = _scatter_sum(e, shower * nr + rbin, b * nr).view(b, nr)

    inc = incident_energy.to(dev, torch.float64)
    scalars = {
        "visible_energy": vis,
        "energy_ratio": vis / inc,
        "num_hits": hits,
        "cog_x": cog[:, 0], "cog_y": cog[:, 1], "cog_z": cog[:, 2],
        "width_u": width[:, 0], "width_v": width[:, 1], "width_long": width[:, 2],
        "pca_theta": pca_theta,
        "energy_first_layers": layer_energy[:, :k_edge].sum(1) / safe,
        "energy_last_layers": layer_energy[:, -k_edge:].sum(1) / safe,
    }
    spec_e, spec_i = e, shower
    if max_spectrum_entries is not None and e.numel() > max_spectrum_entries:
        pick = torch.randperm(e.numel(), generator=generator)[:max_spectrum_entries].to(dev)
        pick = pick.sort().values
        spec_e, spec_i = e[pick], shower[pick]
    cond = {"energy": inc.new_ones(b), "theta": inc.new_zeros(b), "phi": inc.new_zeros(b)}
    if conditions:
        cond.update({k: torch.as_tensor(val).to(dev, torch.float64) for k, val in conditions.items()})
    return Observables(scalars=scalars,
                       profiles={"layer_energy": layer_energy, "layer_occupancy": layer_occ,
                                 "radial_energy": radial},
                       spectra={spectrum_name: (spec_e, spec_i)}, conditions=cond,
                       edges={"radial": edges.cpu().numpy()})


def _conditions(showers) -> dict:
    return {"energy": showers.energy, "theta": showers.theta, "phi": showers.phi}


def default_layer_edges(showers, num_layers: int = 30) -> np.ndarray:
    """Depth bins for point clouds: 1 X0 bins from 0 in the physics frame (``num_layers`` of
    them), otherwise ``num_layers`` equal bins over the 0.1-99.9 % range of the points' z."""
    if showers.frame != DETECTOR_FRAME:
        return np.arange(num_layers + 1, dtype=np.float64)
    z = showers.z.detach().cpu().double().numpy()
    if z.size == 0:
        return np.linspace(0.0, 1.0, num_layers + 1)
    lo, hi = np.quantile(z, [0.001, 0.999])
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, num_layers + 1)


def default_radial_edges(r_max: float, bins: int = 10) -> np.ndarray:
    """``bins`` equal radial bins from 0 to ``r_max`` (beyond it: the last bin)."""
    if not np.isfinite(r_max) or r_max <= 0:
        raise ValueError(f"radial range must be a positive number, got {r_max}")
    return np.linspace(0.0, float(r_max), bins + 1)


def _incident_in_deposit_units(showers) -> torch.Tensor:
    """Incident energy in the unit of the point energies: MeV (detector) or 1 (physics frame,
    where point energies are fractions of the incident energy)."""
    if showers.frame == DETECTOR_FRAME:
        return showers.energy.to(torch.float64) * GEV_TO_MEV
    return torch.ones_like(showers.energy, dtype=torch.float64)


def point_observables(showers, *, layer_edges=None, radial_edges=None, threshold: float = 0.0,
                      edge_layers: int = 3, max_spectrum_entries: int | None = 2_000_000,
                      seed: int = 0) -> Observables:
    """Observables of point clouds: those of :func:`deposit_observables` with layers = bins of
    the point depth z, plus ``num_points`` (all points) and the ``point_energy`` spectrum.

    ``layer_edges``/``radial_edges`` default to :func:`default_layer_edges` and 0-3 R_M (physics
    frame) or 0-60 mm (detector frame) in 10 bins; pass explicit edges to compare two samples.
    """
    edges = np.asarray(layer_edges if layer_edges is not None else default_layer_edges(showers),
                       dtype=np.float64)
    if radial_edges is None:
        radial_edges = default_radial_edges(60.0 if showers.frame == DETECTOR_FRAME else 3.0)
    z = showers.z.to(torch.float64)
    zt = torch.as_tensor(edges, device=z.device)
    nl = edges.size - 1
    layer = (torch.bucketize(z, zt, right=True) - 1).clamp(0, nl - 1)
    g = torch.Generator().manual_seed(seed)
    obs = deposit_observables(showers.e, showers.batch, len(showers), xyz=showers.points[:, :3],
                              layer=layer, num_layers=nl,
                              incident_energy=_incident_in_deposit_units(showers),
                              radial_edges=radial_edges, threshold=threshold,
                              edge_layers=edge_layers, conditions=_conditions(showers),
                              spectrum_name="point_energy",
                              max_spectrum_entries=max_spectrum_entries, generator=g)
    obs.scalars["num_points"] = showers.num_points.to(torch.float64)
    obs.edges["layer"] = edges
    obs.units = _units(showers.frame == DETECTOR_FRAME, points=True)
    return obs


def _units(detector: bool, points: bool) -> dict:
    if detector:
        units = dict(SCALAR_UNITS_DETECTOR)
        units.update(layer_energy="MeV", radial_energy="MeV", hit_energy="MeV", point_energy="MeV")
    else:
        units = {"visible_energy": "E/E_inc", "cog_x": "R_M", "cog_y": "R_M", "cog_z": "X0",
                 "width_u": "R_M", "width_v": "R_M", "width_long": "X0", "pca_theta": "rad",
                 "layer_energy": "E/E_inc", "radial_energy": "E/E_inc",
                 "point_energy": "E/E_inc"}
    return units


def mip_threshold_mev(geometry, fraction: float = 0.5) -> float:
    """``fraction`` of the most probable MIP signal of a cell of ``geometry`` in MeV.

    Uses ``geometry.mip_mev`` when the geometry defines it; otherwise the mean minimum-ionising
    loss in the thinnest active slab of its stack (``geometry.stack``), which for 0.5 mm of
    silicon is 0.19 MeV (CaloClouds' ILD threshold of 0.1 MeV is "half a MIP").
    """
    mip = getattr(geometry, "mip_mev", None)
    if mip is None:
        stack = getattr(geometry, "stack", None)
        if stack is None:
            raise ValueError(f"geometry {getattr(geometry, 'name', geometry)!r} has neither "
                             "mip_mev nor a stack: give the threshold in MeV explicitly")
        active = [s for s in stack.slabs if s.active]
        if not active:
            raise ValueError(f"stack {stack.name!r} has no active slab: give the threshold in MeV")
        mip = min(s.material.mip_mev_per_mm * s.thickness_mm for s in active)
    return float(fraction) * float(mip)


def _lookup(table_or_fn, ids: torch.Tensor) -> torch.Tensor:
    if callable(table_or_fn):
        return torch.as_tensor(table_or_fn(ids))
    return torch.as_tensor(table_or_fn).to(ids.device)[ids]


def shower_axes(geometry, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor | None:
    """``[B, 3]`` shower direction in the coordinates of ``geometry.cell_centers()``: the incident
    direction (theta, phi) for readouts with global cell centres, +z (None) for CaloChallenge-style
    cylindrical readouts, whose centres are local to a shower entering along +z."""
    readout = getattr(geometry, "readout", None)
    if getattr(readout, "kind", None) == "cylindrical":
        return None
    st = torch.sin(theta.double())
    return torch.stack([st * torch.cos(phi.double()), st * torch.sin(phi.double()),
                        torch.cos(theta.double())], -1)


def cell_observables(hits, incident_energy_gev, *, cell_layer, cell_centers, num_layers: int,
                     threshold_mev: float, radial_edges, axis: torch.Tensor | None = None,
                     edge_layers: int = 3, conditions: dict | None = None,
                     max_spectrum_entries: int | None = 2_000_000, seed: int = 0) -> Observables:
    """Observables of cell hits (:class:`~pcshower.data.CellHits`, energies in MeV).

    ``cell_layer`` and ``cell_centers`` give each flat cell id its layer and centre (mm): either
    lookup tensors indexed by cell id, or functions of the ids (``geometry.cell_layer``,
    ``geometry.cell_centers``). Cells below ``threshold_mev`` are not hits. ``axis`` [B, 3] is
    the shower direction in the coordinates of the centres (see :func:`shower_axes`).
    """
    dev = hits.energy.device
    ids = hits.cell_id.to(torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"negative cell id {int(ids.min())} in the hits")
    g = torch.Generator().manual_seed(seed)
    inc = torch.as_tensor(incident_energy_gev).to(dev, torch.float64).reshape(-1)
    if inc.numel() != len(hits):
        raise ValueError(f"{inc.numel()} incident energies for {len(hits)} showers of hits")
    cond = {"energy": inc}
    cond.update(conditions or {})
    obs = deposit_observables(hits.energy, hits.batch, len(hits),
                              xyz=_lookup(cell_centers, ids).to(dev),
                              layer=_lookup(cell_layer, ids).to(dev), num_layers=num_layers,
                              incident_energy=inc * GEV_TO_MEV, radial_edges=radial_edges,
                              axis=axis, threshold=threshold_mev, edge_layers=edge_layers,
                              conditions=cond, spectrum_name="cell_energy",
                              max_spectrum_entries=max_spectrum_entries, generator=g)
    obs.units = _units(True, points=False)
    obs.units["cell_energy"] = "MeV"
    return obs


def geometry_cell_observables(hits, geometry, conditions: dict, *, threshold_mev: float | None = None,
                              radial_edges=None, **kwargs) -> Observables:
    """:func:`cell_observables` with layers, centres and shower axes from a geometry adapter;
    ``conditions`` holds ``energy`` [GeV], ``theta``, ``phi`` [rad] per shower. The threshold
    defaults to half a MIP (:func:`mip_threshold_mev`), the radial bins to 12 bins of
    R_M/4 of the geometry's effective medium."""
    if threshold_mev is None:
        threshold_mev = mip_threshold_mev(geometry)
    if radial_edges is None:
        radial_edges = default_radial_edges(3.0 * float(geometry.rm_eff_mm), bins=12)
    theta = torch.as_tensor(conditions.get("theta", torch.zeros(len(hits)))).reshape(-1)
    phi = torch.as_tensor(conditions.get("phi", torch.zeros(len(hits)))).reshape(-1)
    return cell_observables(hits, conditions["energy"], cell_layer=geometry.cell_layer,
                            cell_centers=geometry.cell_centers, num_layers=int(geometry.num_layers),
                            threshold_mev=threshold_mev, radial_edges=radial_edges,
                            axis=shower_axes(geometry, theta, phi),
                            conditions={"theta": theta, "phi": phi}, **kwargs)
