"""`Geometry`: one detector readout built from a YAML file, and the projection of showers onto its cells.

Projection of a physics-frame shower (x, y in Molière radii, z in X0 along the axis, e as a
fraction of the incident energy) follows DESIGN.md:

1. scale to millimetres of the stack's homogeneous equivalent (R_M,eff, X0,eff; Grindhammer &
   Peters, hep-ex/0001020, eqs. 7-9, :meth:`pcshower.physics.Stack.effective_medium`);
2. rotate the shower axis to the incident direction in the local frame of the face it enters
   (:mod:`pcshower.geometry.frames`) and translate it to the impact point;
3. convert the depth along the face normal from X0 to mm through the real slab sequence
   (:func:`pcshower.physics.sampling.depth_x0_to_mm`), so thin and thick absorbers are crossed at
   the right depth;
4. keep what the active layers see, with the sampling fraction and its fluctuations
   (:func:`pcshower.physics.sampling.to_active_layers`), the fraction scaled by the stack's
   Geant4-tuned sampling response and fluctuation ``kappa`` where pcshower ships a tune
   (:func:`pcshower.simulate.tuning.sampling_scale`);
5. sum per cell. Points outside the readout (beyond the stack, off the module or the bins, in a
   hole) are counted per shower in ``outside_points`` and their deposited energy (MeV, before
   sampling) in ``outside_energy``; nothing is dropped silently.

Detector-frame showers carry visible energies (MeV) at local positions (x, y transverse about the
impact point, z depth from the front face, mm); they are translated to the impact point and
assigned to cells directly. :meth:`Geometry.to_detector` turns physics-frame showers into such
showers with steps 1-4 (the same code as :meth:`Geometry.project`), so that projecting them
gives the same cells.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pcshower.data.hits import CellHits
from pcshower.data.showers import Showers
from pcshower.geometry.frames import CylinderSurface, Modules, ShowerFrames, direction_vectors, rotation_to_local
from pcshower.geometry.readouts import (CylindricalReadout, InclinedReadout, PlanarReadout,
                                        inclined_stack_groups)
from pcshower.geometry.schema import GeometryError, GeometrySpec
from pcshower.physics.stack import Slab, Stack
from pcshower.units import DETECTOR_FRAME, GEV_TO_MEV, PHYSICS_FRAME

__all__ = ["Geometry", "Placement"]

#: Largest number of cells for which ``cell_centers()`` without ids or a dense projection is allowed.
MAX_DENSE_CELLS = 20_000_000


class Placement:
    """Explicit placement of a batch of showers: impact points [B, 3] (global mm) and incident
    direction (``theta``, ``phi`` [B], radians, global). Use it to override the conditions stored
    in the showers; ``position`` rows of all zeros mean "the default impact for that direction"."""

    def __init__(self, position=None, theta=None, phi=None):
        self.position = None if position is None else torch.as_tensor(position, dtype=torch.float64)
        self.theta = None if theta is None else torch.as_tensor(theta, dtype=torch.float64)
        self.phi = None if phi is None else torch.as_tensor(phi, dtype=torch.float64)

    def resolve(self, showers: Showers):
        n, dev = len(showers), showers.device

        def pick(value, default, shape):
            if value is None:
                return default.to(torch.float64)
            value = value.to(dev)
            if value.ndim == len(shape) - 1:
                value = value.expand(*shape)
            if tuple(value.shape) != shape:
                raise ValueError(f"placement has shape {tuple(value.shape)}, expected {shape} "
                                 f"for {n} showers")
            return value

        return (pick(self.position, showers.position, (n, 3)), pick(self.theta, showers.theta, (n,)),
                pick(self.phi, showers.phi, (n,)))


class Geometry:
    """A calorimeter readout: material stack, cells, and placement in the detector.

    Build with :func:`pcshower.geometry.load_geometry`. Attributes: ``name``, ``title``,
    ``source`` (citations), ``stack`` (:class:`pcshower.physics.Stack`), ``readout`` (one of the
    readout kinds), ``num_layers``, ``num_cells``.
    """

    def __init__(self, spec: GeometrySpec):
        self.spec = spec
        self.name, self.title, self.source, self.path = spec.name, spec.title, spec.source, spec.path
        #: CaloChallenge voxel energy per visible MeV (the datasets' convention), 1 without one
        self.calochallenge_energy_scale = (spec.calochallenge or {}).get("energy_scale", 1.0)
        kind = spec.readout["kind"]
        groups = inclined_stack_groups(spec.readout) if kind == "inclined" else spec.stack
        self.stack, self._active_to_layer, self.layer_span_mm = _build_stack(groups, spec.name)
        self.num_layers = int(self.layer_span_mm.shape[0])
        # readout layer of each active layer, shifted by one so that index 0 (no layer) gives -1
        self._layer_of_active = torch.as_tensor(np.concatenate([[-1], self._active_to_layer]),
                                                dtype=torch.int64)
        self._eff = self.stack.effective_medium()
        self.x0_eff_mm, self.rm_eff_mm = self._eff.x0_mm, self._eff.rm_mm
        barrel = spec.placement.get("polygon_barrel")
        self._staves = barrel["symmetry"] if barrel and kind == "planar" else 0
        self._phi0 = math.radians(barrel["phi0_deg"]) if barrel else 0.0
        if kind == "planar":
            self.modules = Modules(spec.placement)
            self.readout = PlanarReadout(spec.readout, self.modules, self.num_layers, spec.path,
                                         self.stack.total_thickness_mm)
            self.surface = None
        elif kind == "cylindrical":
            self.readout = CylindricalReadout(spec.readout)
            if "cylinder_barrel" in spec.placement:
                p = spec.placement["cylinder_barrel"]
                self.surface, self.modules = CylinderSurface(p["inner_radius_mm"], p["half_length_mm"]), None
            else:
                self.modules, self.surface = Modules(spec.placement), None
        else:
            self.readout = InclinedReadout(spec.readout)
            self.surface = CylinderSurface(self.readout.rmin, self.readout.half_length)
            self.modules = None
            if self.num_layers != self.readout.num_layers:
                raise GeometryError(f"{spec.path}: derived stack has {self.num_layers} layers, "
                                    f"readout {self.readout.num_layers}")
        self.num_cells = self.readout.num_cells
        # depth of the middle of each readout layer's active material (for cell centres)
        edges = self.stack.z_edges_mm
        mids = 0.5 * (edges[:-1] + edges[1:])
        act = self.stack.active_mask
        lay = np.full(len(self.stack.slabs), -1)
        lay[act] = self._active_to_layer
        self.layer_depth_mm = torch.tensor([mids[lay == k].mean() for k in range(self.num_layers)],
                                           dtype=torch.float64)

    # ------------------------------------------------------------------ description
    def calochallenge_voxels(self, hits: CellHits) -> torch.Tensor:
        """``[B, num_cells]`` float64: the hits as a CaloChallenge ``showers`` array in this
        geometry's convention (``calochallenge.energy_scale`` of its YAML: the datasets' voxel
        energy per visible MeV; 1 for geometries without one)."""
        return hits.to_dense().double() * float(self.calochallenge_energy_scale)

    def calochallenge_metadata(self) -> dict:
        """What a CaloChallenge file written with :meth:`calochallenge_voxels` records about its
        energy scale."""
        note = (self.spec.calochallenge or {}).get("note") or "visible (active-layer) energy"
        return {"energy_scale": float(self.calochallenge_energy_scale),
                "energy_convention": note, "geometry": self.name}

    def __repr__(self) -> str:
        return (f"Geometry({self.name!r}, readout={self.readout.kind}, layers={self.num_layers}, "
                f"cells={self.num_cells}, depth={self.stack.total_x0:.2f} X0)")

    def summary(self) -> dict:
        """Plain numbers describing the geometry (for ``pcshower geometry show``)."""
        out = {"name": self.name, "title": self.title, "file": str(self.path),
               "readout": self.readout.kind, "layers": self.num_layers, "cells": self.num_cells,
               **{k: v for k, v in self.stack.summary().items() if k not in ("name", "layers")}}
        if self.modules is not None:
            out["modules"] = len(self.modules)
        out["source"] = self.source
        if self.spec.calochallenge:
            out["calochallenge_energy_scale"] = self.calochallenge_energy_scale
        return out

    def cell_layer(self, cell_id) -> torch.Tensor:
        """Readout layer index of each flat cell id."""
        cell_id = torch.as_tensor(cell_id, dtype=torch.int64)
        self._check_ids(cell_id)
        return self.readout.cell_layer(cell_id.cpu()).to(cell_id.device)

    def cell_centers(self, cell_id=None) -> torch.Tensor:
        """``[N, 3]`` cell centres in mm (all cells, or those of ``cell_id``).

        Planar and inclined readouts give global coordinates at the middle of the layer's active
        material; CaloChallenge bins are relative to the impact point, so their centres are given
        in the local frame (u, v, depth) of a shower entering at the origin.
        """
        if cell_id is None:
            if self.num_cells > MAX_DENSE_CELLS:
                raise ValueError(f"{self.name} has {self.num_cells} cells: pass the cell ids you need "
                                 f"(cell_centers(ids)) instead of asking for all of them")
            cell_id = torch.arange(self.num_cells)
        cell_id = torch.as_tensor(cell_id, dtype=torch.int64)
        self._check_ids(cell_id)
        return self.readout.cell_centers(cell_id.cpu(), self.layer_depth_mm).to(cell_id.device)

    def _check_ids(self, cell_id: torch.Tensor) -> None:
        if cell_id.numel() and (int(cell_id.min()) < 0 or int(cell_id.max()) >= self.num_cells):
            raise ValueError(f"cell ids must lie in [0, {self.num_cells}) for {self.name}, got "
                             f"[{int(cell_id.min())}, {int(cell_id.max())}]")

    # ------------------------------------------------------------------ placement
    def _frames(self, position: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> ShowerFrames:
        direction = direction_vectors(theta.double(), phi.double())
        given = position.abs().sum(dim=1) > 0
        if self.surface is not None:
            point = self.surface.hit_by_ray(direction)
            point = torch.where(given[:, None], position.double(), point)
            return self.surface.frames(point, direction)
        module, impact = self.modules.hit_by_ray(direction)
        if given.any():
            m2, i2 = self.modules.containing(position.double())
            module = torch.where(given, m2, module)
            impact = torch.where(given[:, None], i2, impact)
        return self.modules.frames(module, impact, direction)

    def default_impact(self, theta, phi) -> torch.Tensor:
        """``[B, 3]`` point (mm) where a particle from the interaction point with direction
        (``theta``, ``phi``, radians) enters the calorimeter face; NaN where it misses."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1)
        phi = torch.as_tensor(phi, dtype=torch.float64).reshape(-1).expand_as(theta)
        f = self._frames(torch.zeros(theta.numel(), 3, dtype=torch.float64), theta, phi)
        point = f.origin + f.impact_uv[:, :1] * f.u + f.impact_uv[:, 1:] * f.v
        return torch.where((f.module >= 0)[:, None], point, torch.full_like(point, math.nan))

    def local_direction(self, theta, phi, position=None):
        """``(theta_local, phi_local)``: the incident direction at the default impact point (or
        at ``position`` [B, 3] mm, on the face of the module containing it) as the angle to the
        face normal and the azimuth about it (radians). Identity for a single plane facing +z;
        for a barrel, global theta = 90 deg is normal incidence. NaN where the particle misses
        the calorimeter."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1)
        phi = torch.as_tensor(phi, dtype=torch.float64).reshape(-1).expand_as(theta)
        where = torch.zeros(theta.numel(), 3, dtype=torch.float64) if position is None else \
            torch.as_tensor(position, dtype=torch.float64).reshape(-1, 3).expand(theta.numel(), 3)
        f = self._frames(where, theta, phi)
        miss = f.module < 0
        nan = torch.full_like(f.theta_local, math.nan)
        return torch.where(miss, nan, f.theta_local), torch.where(miss, nan, f.phi_local)

    # ------------------------------------------------------------------ projection
    def project(self, showers: Showers, placement: Placement | None = None, *,
                generator: torch.Generator | None = None, fluctuate: bool = True,
                dense: bool = False, response=None):
        """Cell hits of a batch of showers in this readout (see the module docstring).

        Args:
            showers: physics- or detector-frame showers (``showers.frame``).
            placement: impact points and directions; by default each shower's ``position``
                (when non-zero) or the default impact of its (``theta``, ``phi``).
            generator: ``torch.Generator`` for the sampling fluctuations (same seed, same hits).
            fluctuate: draw sampling fluctuations (physics frame only).
            dense: return a ``[B, num_cells]`` tensor (MeV) instead of :class:`CellHits`.
            response: a :class:`~pcshower.geometry.response.LayerResponse` for physics-frame
                showers made of recorded Geant4 deposits (or a model taught by them): Geant4's
                visible/deposited ratio per layer instead of the equivalent-medium sampling
                model (see :mod:`pcshower.geometry.response`); None: the sampling model.
        """
        if not isinstance(showers, Showers):
            raise TypeError(f"project() takes a pcshower Showers batch, got {type(showers).__name__}")
        if showers.frame == DETECTOR_FRAME and showers.geometry not in (None, self.name):
            raise ValueError(f"these detector-frame showers belong to geometry {showers.geometry!r}, "
                             f"not {self.name!r}: project physics-frame showers, or use their own geometry")
        if dense and self.num_cells > MAX_DENSE_CELLS:
            raise ValueError(f"{self.name} has {self.num_cells} cells, too many for a dense "
                             f"[showers, cells] tensor; use the sparse CellHits (dense=False)")
        p = self._place(showers, placement, generator, fluctuate, response)
        n = len(showers)
        outside = (~p.inside).to(torch.float64)  # (same-dtype products: mixed dtypes are slow)
        ptr = showers.ptr.to(p.energy.device)
        out_e = _sum_per_shower(p.energy * outside, ptr)
        out_n = _sum_per_shower(outside, ptr).round().to(torch.int64)
        kept = torch.nonzero(p.keep).flatten()
        cell_id, e_cell, hit_ptr = _sum_per_cell(p.batch.index_select(0, kept), p.cell.index_select(0, kept),
                                                 p.visible.index_select(0, kept), n, self.num_cells)
        result = CellHits(cell_id=cell_id, energy=e_cell.to(torch.float32), ptr=hit_ptr,
                          num_cells=self.num_cells, geometry=self.name,
                          outside_energy=out_e.to(torch.float32), outside_points=out_n,
                          metadata={"frame": showers.frame, "fluctuate": bool(fluctuate)})
        return result.to_dense() if dense else result

    def to_detector(self, showers: Showers, placement: Placement | None = None, *,
                    generator: torch.Generator | None = None, fluctuate: bool = True,
                    response=None) -> Showers:
        """Physics-frame showers as this detector sees them: the visible deposits, in mm and MeV.

        The points are placed exactly as :meth:`project` places them (steps 1-4 of the module
        docstring, one shared implementation) and only those it would sum into a cell are kept:
        in an active layer's sampling cell, with visible energy > 0, on a cell of the readout.

        Args:
            showers: physics-frame showers. Detector-frame showers of this geometry are returned
                unchanged (without ``placement``); any others raise ``ValueError``.
            placement: impact points and directions, as for :meth:`project`; the returned
                showers carry them as their ``position``, ``theta`` and ``phi``.
            generator: ``torch.Generator`` for the sampling fluctuations.
            fluctuate: draw sampling fluctuations (else the mean visible energy).
            response: Geant4's recorded layer response, as for :meth:`project`.

        Returns:
            Detector-frame :class:`Showers` (``geometry=self.name``, same conditions, metadata
            plus ``"geometry"``) with float64 points, per shower in the local frame of the face
            it enters: ``x, y`` the offset from the impact point along ``u, v`` (mm), ``z`` the
            depth along the face normal ``n`` from the front face (mm), ``e`` the visible energy
            (MeV); extra point features are carried along. ``project`` of the result gives the
            same cells and energies as ``project`` of ``showers`` with an identically seeded
            ``generator``, and the visible energies sum to the hits' total. The points outside
            the readout are dropped here; the result's attributes ``outside_energy`` and
            ``outside_points`` (``[B]``, as in :class:`CellHits`) count them (attributes of this
            object only: copies made from it do not carry them).

        A deposit keeps its position, with one exception. Its visible energy belongs to the
        active layer of its sampling cell (the active slab and the passive slabs in front of
        it), while a detector-frame point is read out by the readout layer whose depth span holds
        it; where a cell's passive slabs lie in the previous readout layer's span (CLD: the
        boards behind each silicon layer; CaloChallenge DS1: the unread cryostat in front of the
        Tile layer), the deposit is moved along the face normal to the middle of its active
        slab (for a point handed over to the neighbouring barrel stave: along that stave's
        normal, then expressed in the frame of the stave the shower entered). The move keeps the
        cell: the cell grids do not depend on depth, and barrel staves only widen with it. The
        inclined readout (ALLEGRO) needs no move: each cell of its derived stack lies in one
        readout layer; its sampling depth is radial, and ``project`` recomputes it from the
        position, so ``z`` stays the depth along the normal at the impact point. A point handed
        over to another stave may have ``z`` outside ``[0, thickness)`` of the stave the shower
        entered. The cells are reproduced up to float64 round-off; a float32 copy of the points
        may move a point lying within ~1e-5 mm of a cell edge into the neighbouring cell.
        """
        if not isinstance(showers, Showers):
            raise TypeError(f"to_detector() takes a pcshower Showers batch, got {type(showers).__name__}")
        if showers.frame != PHYSICS_FRAME:
            if showers.geometry == self.name and placement is None:
                return showers
            where = (f"of geometry {showers.geometry!r}" if showers.geometry != self.name
                     else "already placed (a placement cannot move them)")
            raise ValueError(f"to_detector() takes physics-frame showers; these are {showers.frame}-"
                             f"frame showers {where}, not physics-frame ones for {self.name!r}")
        position, theta, phi = (placement or Placement()).resolve(showers)
        p = self._place(showers, placement, generator, fluctuate, response)
        du, dv, w, kept = self._visible_points(p)
        batch = p.batch.index_select(0, kept)
        n = len(showers)
        ptr = torch.zeros(n + 1, dtype=torch.int64, device=batch.device)
        torch.cumsum(torch.bincount(batch, minlength=n), 0, out=ptr[1:])
        points = torch.stack([du, dv, w, p.visible.index_select(0, kept)], dim=1)
        if showers.points.shape[1] > 4:
            points = torch.cat([points, showers.points.index_select(0, kept)[:, 4:].to(points.dtype)], 1)
        result = Showers(points=points, ptr=ptr, energy=showers.energy, theta=theta, phi=phi,
                         particle=showers.particle, position=position,
                         feature_names=showers.feature_names, frame=DETECTOR_FRAME,
                         geometry=self.name, metadata={**showers.metadata, "geometry": self.name})
        # what was dropped because it missed the readout, as project() counts it
        outside = (~p.inside).to(torch.float64)
        sptr = showers.ptr.to(p.energy.device)
        result.outside_energy = _sum_per_shower(p.energy * outside, sptr).to(torch.float32)
        result.outside_points = _sum_per_shower(outside, sptr).round().to(torch.int64)
        return result

    def _visible_points(self, p: "_Placed"):
        """``(du, dv, w, kept)``: the detector-frame position (mm) of each point of a placement
        that is summed into a cell, and the indices ``kept`` of those points (see
        :meth:`to_detector` for the one move it makes)."""
        kept = torch.nonzero(p.keep).flatten()
        du, dv, w, layer, depth = (t.index_select(0, kept) for t in (p.du, p.dv, p.w, p.layer, p.depth))
        moved = torch.nonzero(self._layer_of_depth(depth) != layer).flatten()
        if moved.numel() or torch.jit.is_tracing():  # traced: kept whatever the traced shower had
            du, dv, w = du.clone(), dv.clone(), w.clone()
            du[moved], dv[moved], w[moved] = self._into_active_slab(p, kept.index_select(0, moved))
        return du, dv, w, kept

    def _place(self, showers: Showers, placement: Placement | None,
               generator: torch.Generator | None, fluctuate: bool, response=None) -> "_Placed":
        """Every point of ``showers`` placed in the readout: local position, sampling depth,
        layer, visible energy, cell and acceptance (steps 1-4 of the module docstring for
        physics-frame points). The one implementation behind :meth:`project` and
        :meth:`to_detector`, so that both see each deposit in the same cell."""
        position, theta, phi = (placement or Placement()).resolve(showers)
        return self._place_in(showers, self._frames(position, theta, phi), generator, fluctuate,
                              recorded=response)

    def _place_in(self, showers: Showers, frames: ShowerFrames,
                  generator: torch.Generator | None, fluctuate: bool,
                  hand_over: bool = True, recorded=None) -> "_Placed":
        """:meth:`_place` in given shower frames (one per shower); ``hand_over=False`` keeps every
        point in the frame of the module its shower entered (the local frame an exported
        pipeline returns, ``pcshower export``), even where it has crossed into a neighbouring
        barrel stave."""
        pts = showers.points
        dev = pts.device
        n = len(showers)
        counts = showers.num_points
        total = pts.shape[0]
        physics = showers.frame == PHYSICS_FRAME
        batch = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=total)
        # per-shower numbers expanded to points column by column (1-D repeat_interleave is several
        # times cheaper than gathering rows by the batch index); a number shared by every shower
        # of the batch (same module, same direction) stays a scalar that broadcasts (not when
        # traced: the scalar's value would be frozen into the graph, pcshower export)
        def expand(per_shower: torch.Tensor) -> torch.Tensor:
            if n and not torch.jit.is_tracing() and bool((per_shower == per_shower[0]).all()):
                return per_shower[0]
            return torch.repeat_interleave(per_shower, counts, output_size=total)

        module = expand(frames.module)
        # per-point columns as rows of one [4, P] float64 block: each column contiguous
        cols = pts[:, :4].T.to(torch.float64)
        x, y, z, energy = cols[0], cols[1], cols[2], cols[3]
        if physics:
            rot = rotation_to_local(frames.theta_local, frames.phi_local).reshape(n, 9)
            r = [expand(rot[:, k].contiguous()) for k in range(9)]
            from pcshower.simulate.tuning import shipped_tune

            energy = energy * expand(showers.energy.double() * GEV_TO_MEV)
            # the stack's Geant4-tuned sampling response, where it has a tune, scales what the
            # layers see (the deposits stay unscaled: they are what outside_energy counts)
            response, kappa = None, {}
            tune = shipped_tune(self.stack) if recorded is None else None
            if tune is not None:
                response = expand(tune.sampling_scale(showers.energy.double(),
                                                      frames.theta_local.double()).to(dev))
                kappa = {"crossing_rms": tune.crossing_rms}
        impact_u = expand(frames.impact_uv[:, 0].contiguous())
        impact_v = expand(frames.impact_uv[:, 1].contiguous())
        slab = active = None
        tilted = False
        if physics:
            from pcshower.physics.sampling import depth_x0_to_mm, to_active_layers

            # the effective-medium scales folded into the rotation: one multiply per term
            rm, x0 = self.rm_eff_mm, self.x0_eff_mm
            # the shower axis is a straight line in mm: its point at axial depth z (X0) lies at
            # the layered stack's normal depth d = depth_x0_to_mm(z cos(theta)) and has drifted
            # d tan(theta) along the face. The equivalent medium's z X0_eff sin(theta) instead put
            # oblique showers up to ~3 mm behind along the tilt where the local mm per X0
            # differs from the stack's mean (ILD's thin-absorber first section at 30-45 deg).
            # The transverse offset (R_M of the equivalent medium) adds to it in mm.
            tilted = not (_all_zero(r[2]) and _all_zero(r[5]))
            axis_depth, slab = depth_x0_to_mm(r[8] * z, self.stack, return_slab=True)
            # path length along the axis (unused at normal incidence: r[2], r[5] are zero there)
            axis_mm = axis_depth / r[8] if tilted else axis_depth
            du = _dot3(r[0] * rm, r[1] * rm, r[2], x, y, axis_mm)  # offset from the impact point
            dv = _dot3(r[3] * rm, r[4] * rm, r[5], x, y, axis_mm)
            w = axis_depth
            if tilted:
                w = _dot3(r[6] * rm, r[7] * rm, 1.0, x, y, axis_depth)
                slab = None  # w is no longer the looked-up depth
        else:
            du, dv, w = x, y, z
        # [P, 3] view of a [3, P] block (stacking rows is several times cheaper than columns)
        local = torch.stack([du + impact_u, dv + impact_v, w], dim=0).T
        handed_over = False
        if hand_over and self.modules is not None and self._staves:
            module, handed_over = self._hand_over(local, module)
        depth = self._sampling_depth(local, frames, batch)
        if handed_over or self.readout.kind == "inclined":
            slab = None  # the sampling depth is no longer the depth along the shower's face normal
        if physics:
            # depths outside the stack fall in no sampling cell (layer -1)
            seen = energy if response is None else energy * response
            active, visible = to_active_layers(depth, seen, batch, self.stack,
                                               fluctuate=fluctuate and recorded is None,
                                               generator=generator, slab=slab, **kappa)
            layer = self._layer_of_active.to(dev).index_select(0, active + 1)
            if recorded is not None:  # recorded Geant4 deposits: Geant4's ratio per layer and age
                visible = recorded.visible(energy, layer, batch, n, z, fluctuate=fluctuate,
                                           generator=generator)
            if tilted and self.readout.kind != "inclined":
                du, dv, w = self._onto_sensor(local, du, dv, w, depth, active, r[2] / r[8],
                                              r[5] / r[8], module if handed_over else None,
                                              frames.module, batch)
        else:
            visible, layer = energy, self._layer_of_depth(depth)
        if self.readout.kind == "inclined":
            where = frames.to_global(local, batch)
        elif self.readout.kind == "cylindrical":
            where = torch.stack([du, dv], dim=0).T  # bins are centred on the impact point
        else:
            where = local  # u, v and the depth (barrel staves widen with depth)
        # acceptance: every point must fall on a cell of its layer (the sampling cell's layer, or
        # for passive points the read-out group its depth lies in); unread material is inside
        eff_layer = layer
        passive = torch.nonzero(layer < 0).flatten()
        if passive.numel():
            eff_layer = layer.clone()
            eff_layer[passive] = self._layer_of_depth(depth[passive])
        in_depth = (depth >= 0) & (depth < self.stack.total_thickness_mm)
        if isinstance(module, torch.Tensor) and module.ndim:
            in_depth &= module >= 0
        elif int(module) < 0:
            in_depth &= False
        shower_module = frames.module.clamp_min(0)
        per_module = None if handed_over else (lambda table: expand(table.to(dev)[shower_module]))
        cell = self.readout.cell_index(eff_layer, where, module, per_module=per_module)
        inside = in_depth & ((cell >= 0) | (eff_layer < 0))
        keep = inside & (layer >= 0) & (cell >= 0) & (visible > 0)
        return _Placed(batch, frames, du, dv, w, local, module, depth, energy, active, layer,
                       visible, cell, inside, keep)

    def _active_centre_mm(self, device) -> torch.Tensor:
        """``[L]`` float64: depth (mm) of the middle of each active slab of the stack."""
        from pcshower.physics.sampling import sampling_layers

        return torch.as_tensor(sampling_layers(self.stack).active_center_mm, dtype=torch.float64,
                               device=device)

    def _onto_sensor(self, local, du, dv, w, depth, active, tan_u, tan_v, module, shower_module,
                     batch):
        """Move every sampled point of a tilted physics-frame shower along the shower's direction
        onto the middle plane of the active slab that sees it, as the shower's particles cross
        the sensor there (the readout records them where they cross it; the parametrised
        engine's detector frame and Geant4's hits do the same). Along the normal instead, an
        oblique shower's deposits would stay (depth of the deposit - depth of the sensor) x
        tan(theta) behind along the tilt: ~1.3 mm x tan(theta) in ILD. ``local`` is updated in
        place; returns the new ``(du, dv, w)``. Points handed over to another stave
        (``module`` differs from their shower's) stay where they are."""
        dev = depth.device
        centre = self._active_centre_mm(dev)
        shift = torch.where(active >= 0, centre.index_select(0, active.clamp_min(0)) - depth,
                            torch.zeros((), dtype=torch.float64, device=dev))
        if module is not None:
            same = module == shower_module.to(dev).index_select(0, batch)
            shift = torch.where(same, shift, torch.zeros((), dtype=torch.float64, device=dev))
        du = du + shift * tan_u
        dv = dv + shift * tan_v
        w = w + shift
        local[:, 0] += shift * tan_u
        local[:, 1] += shift * tan_v
        local[:, 2] += shift
        return du, dv, w

    def _into_active_slab(self, p: "_Placed", idx: torch.Tensor):
        """``(du, dv, w)`` of the points ``idx`` moved along their sampling depth to the middle
        of the active slab that saw them (see :meth:`to_detector`), in their shower's frame.
        Planar and cylindrical readouts only: every cell of the inclined readout's derived stack
        (plates, then the liquid gap) lies within one readout layer, so none of its points moves."""
        f, b = p.frames, p.batch.index_select(0, idx)
        dev = p.depth.device
        target = self._active_centre_mm(dev).index_select(0, p.active.index_select(0, idx))
        local = p.local[idx].clone()
        local[:, 2] = target
        module = p.module.expand(p.depth.shape[0]).index_select(0, idx)
        other = torch.nonzero(module != f.module[b]).flatten()
        if other.numel():  # handed over: moved along the reading stave's normal, then expressed
            # in the frame of the stave the shower entered
            mods, k, bo = self.modules, module[other], b[other]
            o, u, v, nrm = (t.to(dev)[k] for t in (mods.origin, mods.u, mods.v, mods.n))
            lo = local[other]
            rel = o + lo[:, 0:1] * u + lo[:, 1:2] * v + lo[:, 2:3] * nrm - f.origin[bo]
            local[other] = torch.stack([(rel * f.u[bo]).sum(1), (rel * f.v[bo]).sum(1),
                                        (rel * f.n[bo]).sum(1)], 1)
        return local[:, 0] - f.impact_uv[b, 0], local[:, 1] - f.impact_uv[b, 1], local[:, 2]

    def _hand_over(self, local: torch.Tensor, module: torch.Tensor) -> torch.Tensor:
        """Move points that left their barrel stave sideways into the stave whose azimuthal
        sector holds them (local coordinates rewritten in place); returns ``(modules, changed)``."""
        mods = self.modules
        dev = local.device
        m0 = module.clamp_min(0)
        half_u = mods.half[:, 0].to(dev)[m0] + local[:, 2].clamp_min(0) * mods.widen.to(dev)[m0]
        stave = (module >= 0) & (module < self._staves)
        off = torch.nonzero(stave & (local[:, 0].abs() > half_u)).flatten()
        if not off.numel():
            return module, False
        o, u, v, n = (t.to(dev) for t in (mods.origin, mods.u, mods.v, mods.n))
        m = module.expand(local.shape[0])[off]
        p = local[off]
        g = o[m] + p[:, 0:1] * u[m] + p[:, 1:2] * v[m] + p[:, 2:3] * n[m]
        step = 2 * math.pi / self._staves
        k = torch.remainder(torch.round((torch.atan2(g[:, 1], g[:, 0]) - self._phi0) / step),
                            self._staves).long()
        rel = g - o[k]
        local[off] = torch.stack([(rel * u[k]).sum(1), (rel * v[k]).sum(1), (rel * n[k]).sum(1)], 1)
        module = module.expand(local.shape[0]).clone()
        module[off] = k
        return module, True

    def _sampling_depth(self, local: torch.Tensor, frames: ShowerFrames, batch: torch.Tensor):
        """Depth (mm) used for layers and sampling: along the face normal, or the radial distance
        from the inner radius for the inclined barrel."""
        if self.readout.kind != "inclined":
            return local[:, 2]
        g = frames.to_global(local, batch)
        return torch.hypot(g[:, 0], g[:, 1]) - self.readout.rmin

    def _layer_of_depth(self, depth: torch.Tensor) -> torch.Tensor:
        """Readout layer whose group spans ``depth`` (mm), -1 for unread material or outside."""
        span = torch.as_tensor(self.layer_span_mm, dtype=torch.float64, device=depth.device)
        k = torch.searchsorted(span[:, 0].contiguous(), depth.contiguous(), right=True) - 1
        kk = k.clamp(0, span.shape[0] - 1)
        ok = (k >= 0) & (depth < span[kk, 1])
        return torch.where(ok, kk, torch.full_like(kk, -1))


class _Placed(NamedTuple):
    """Per-point result of :meth:`Geometry._place` (``[P]`` tensors unless said otherwise;
    ``module`` may be a scalar shared by all points)."""

    batch: torch.Tensor
    frames: ShowerFrames  # per shower
    du: torch.Tensor  # offset from the impact point along u (mm), in the shower's own frame
    dv: torch.Tensor  # ... along v
    w: torch.Tensor  # depth along the shower's face normal (mm)
    local: torch.Tensor  # [P, 3] position in the frame of the module reading it (after hand-over)
    module: torch.Tensor
    depth: torch.Tensor  # sampling depth (mm): local depth, or radial for the inclined readout
    energy: torch.Tensor  # deposited energy (MeV)
    active: torch.Tensor | None  # active layer of the sampling cell (physics frame), -1 for none
    layer: torch.Tensor  # readout layer, -1 for none
    visible: torch.Tensor  # visible energy (MeV)
    cell: torch.Tensor  # flat cell id, -1 for none
    inside: torch.Tensor  # within the readout's acceptance
    keep: torch.Tensor  # summed into a cell


def _build_stack(groups, name: str):
    """Flatten stack groups into a :class:`Stack`, the readout layer of each active slab and the
    depth span [L, 2] (mm) of each readout layer; gaps between groups are filled with air."""
    slabs, active_to_layer, spans = [], [], []
    z = 0.0
    layer = 0
    for g in groups:
        if g.start_mm is not None and g.start_mm > z + 1e-9:
            slabs.append(Slab("Air", g.start_mm - z, False))
            z = g.start_mm
        for _ in range(g.repeat):
            start = z
            for material, thickness, active in g.slabs * g.sublayers:
                slabs.append(Slab(material, thickness, bool(active and g.readout)))
                if active and g.readout:
                    active_to_layer.append(layer)
                z += thickness
            if g.readout:
                spans.append((start, z))
                layer += 1
    return (Stack(tuple(slabs), name), np.asarray(active_to_layer, dtype=np.int64),
            np.asarray(spans, dtype=np.float64).reshape(-1, 2))


def _all_zero(value) -> bool:
    """Whether a per-point column (or a scalar shared by all points) is zero everywhere."""
    if isinstance(value, torch.Tensor):
        return bool((value == 0).all())
    return value == 0


def _dot3(a, b, c, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``a x + b y + c z`` with per-point or scalar coefficients, skipping zero scalars."""
    out = None
    for coef, t in ((a, x), (b, y), (c, z)):
        if not isinstance(coef, torch.Tensor) or coef.ndim == 0:
            coef = float(coef)
            if coef == 0.0:
                continue
            out = t * coef if out is None else out.add_(t, alpha=coef)
        else:
            out = t * coef if out is None else out.addcmul_(t, coef)
    return torch.zeros_like(x) if out is None else out


def _sum_per_shower(values: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` [P] over each shower's contiguous range ``ptr`` [B+1] (float64)."""
    csum = torch.zeros(values.numel() + 1, dtype=torch.float64, device=values.device)
    torch.cumsum(values, 0, out=csum[1:])
    return csum.index_select(0, ptr[1:]) - csum.index_select(0, ptr[:-1])


def _sum_per_cell(batch: torch.Tensor, cell: torch.Tensor, energy: torch.Tensor, n: int,
                  num_cells: int):
    """Sum ``energy`` per (shower, cell) of points sorted by shower: ``(cell_id [H], energy [H],
    ptr [n+1])``, cells sorted within each shower.

    Cell ids are first made small: relative to one cell of their own shower, so that the
    (shower, cell) key spans ``n * R`` values with ``R`` the largest spread of ids within a shower.
    When that is at most a few times the number of points, the sums go into a dense array (no
    sort); otherwise the key is sorted, in int32 when it fits (radix passes scale with its width).
    """
    dev = energy.device
    m = cell.numel()
    if m == 0:
        return (torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=energy.dtype, device=dev),
                torch.zeros(n + 1, dtype=torch.int64, device=dev))
    first = torch.searchsorted(batch, torch.arange(n, device=dev)).clamp_(max=m - 1)
    ref = cell.index_select(0, first)  # a cell of each shower (any one will do)
    rel = cell - ref.index_select(0, batch)
    lo = int(rel.min())
    spread = int(rel.max()) - lo + 1
    size = n * spread
    key = batch * spread + (rel - lo)
    if size <= max(4 * m, 1 << 16):
        dense = torch.zeros(size, dtype=energy.dtype, device=dev).index_add_(0, key, energy)
        ukey = torch.nonzero(dense).flatten()  # every kept point has visible energy > 0
        summed = dense.index_select(0, ukey)
    else:
        small = size < 2 ** 31
        sorted_key, order = torch.sort(key.to(torch.int32) if small else key)
        sorted_key = sorted_key.to(torch.int64)
        new = torch.ones(m, dtype=torch.bool, device=dev)
        torch.ne(sorted_key[1:], sorted_key[:-1], out=new[1:])
        group = torch.cumsum(new.to(torch.int64), 0) - 1
        starts = torch.nonzero(new).flatten()
        summed = torch.zeros(starts.numel(), dtype=energy.dtype, device=dev).index_add_(
            0, group, energy.index_select(0, order))
        ukey = sorted_key.index_select(0, starts)
    shower = torch.div(ukey, spread, rounding_mode="floor")
    cell_id = ukey - shower * spread + lo + ref.index_select(0, shower)
    counts = torch.bincount(shower, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=ptr[1:])
    return cell_id, summed, ptr
