"""Reading and validating geometry YAML files, with errors that name the file, the key and what was expected.

A geometry file has four top-level keys (see ``docs/geometry.md`` for the full schema)::

    name: ild                      # short name (defaults to the file stem)
    title: ...                     # one line
    source: ...                    # where every number comes from (required)
    stack:                         # readout layers from the front face backwards
      - repeat: 20                 # 20 identical readout layers, each made of these slabs
        slabs:
          - {material: W, thickness_mm: 2.1}
          - {material: Si, thickness_mm: 0.5, active: true}
      - {slabs: [{material: Fe, thickness_mm: 50}], readout: false}   # unread material
    readout:   {kind: planar | cylindrical | inclined, ...}
    placement: {plane | polygon_barrel + endcaps | cylinder_barrel: {...}}

Validation happens once, here, at the edge; the rest of the package trusts the parsed spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pcshower.physics.materials import get_material

__all__ = ["GeometryError", "GeometrySpec", "StackGroup", "parse_geometry", "READOUT_KINDS",
           "PLACEMENT_KINDS"]

READOUT_KINDS = ("planar", "cylindrical", "inclined")
PLACEMENT_KINDS = ("plane", "polygon_barrel", "endcaps", "cylinder_barrel")


class GeometryError(ValueError):
    """A geometry file is invalid; the message names the file, the key path and what was expected."""


@dataclass(frozen=True)
class StackGroup:
    """``repeat`` copies of one readout layer made of ``slabs`` (material, thickness_mm, active)."""

    slabs: tuple[tuple[str, float, bool], ...]
    repeat: int = 1
    readout: bool = True
    start_mm: float | None = None
    sublayers: int = 1  # the slabs repeat this many times inside one readout layer


@dataclass
class GeometrySpec:
    """The validated content of a geometry file (plain Python values)."""

    name: str
    title: str
    source: str
    path: str
    stack: list[StackGroup]
    readout: dict[str, Any]
    placement: dict[str, dict[str, Any]]
    #: CaloChallenge export convention: ``{"energy_scale": factor, "note": text}`` (voxel energy
    #: = factor x visible energy), or None for geometries without one
    calochallenge: dict[str, Any] | None = None


_MISSING = object()


class _Checker:
    """Small typed accessors that raise :class:`GeometryError` with ``file: key.path: ...``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, message: str):
        raise GeometryError(f"{self.where}: {path}: {message}")

    def mapping(self, value, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping (key: value), got {_kind(value)}")
        return value

    def get(self, d: dict, key: str, path: str, kind: str, default=_MISSING):
        full = f"{path}.{key}" if path else key
        if key not in d:
            if default is _MISSING:
                self.fail(full, f"missing required key (expected {kind})")
            return default
        return self.typed(d[key], full, kind)

    def typed(self, value, path: str, kind: str):
        if kind == "str":
            if not isinstance(value, str) or not value.strip():
                self.fail(path, f"expected a non-empty string, got {_kind(value)}")
            return value.strip()
        if kind == "bool":
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {_kind(value)}")
            return value
        if kind in ("int", "positive int"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {_kind(value)}")
            if kind == "positive int" and value <= 0:
                self.fail(path, f"expected a positive integer, got {value}")
            return int(value)
        if kind in ("number", "positive number", "non-negative number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a {kind}, got {_kind(value)}")
            if not math.isfinite(value):
                self.fail(path, f"expected a finite {kind}, got {value}")
            if kind == "positive number" and value <= 0:
                self.fail(path, f"expected a positive number, got {value}")
            if kind == "non-negative number" and value < 0:
                self.fail(path, f"expected a non-negative number, got {value}")
            return float(value)
        if kind.startswith("list of "):
            if not isinstance(value, list):
                self.fail(path, f"expected {kind}, got {_kind(value)}")
            item = {"numbers": "number", "positive numbers": "positive number",
                    "non-negative numbers": "non-negative number", "ints": "int",
                    "positive ints": "positive int", "str": "str"}[kind[len("list of "):]]
            return [self.typed(v, f"{path}[{i}]", item) for i, v in enumerate(value)]
        raise AssertionError(kind)


def _kind(value) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def parse_geometry(text_or_dict: str | dict, where: str) -> GeometrySpec:
    """Validate a geometry description (YAML text or an already-parsed dict) from ``where``."""
    c = _Checker(where)
    if isinstance(text_or_dict, str):
        try:
            doc = yaml.safe_load(text_or_dict)
        except yaml.YAMLError as err:
            raise GeometryError(f"{where}: not valid YAML: {err}") from None
    else:
        doc = text_or_dict
    doc = c.mapping(doc, "(top level)")
    known = {"name", "title", "source", "stack", "readout", "placement", "calochallenge"}
    unknown = sorted(set(doc) - known)
    if unknown:
        c.fail(unknown[0], f"unknown key; expected one of {', '.join(sorted(known))}")
    name = c.get(doc, "name", "", "str", default=Path(where).stem)
    title = c.get(doc, "title", "", "str", default=name)
    source = c.get(doc, "source", "", "str")
    stack = _parse_stack(c, doc)
    if "readout" not in doc:
        c.fail("readout", "missing required key (expected a mapping with 'kind')")
    readout = _parse_readout(c, c.mapping(doc["readout"], "readout"))
    placement = _parse_placement(c, doc.get("placement"), readout["kind"])
    calochallenge = None
    if "calochallenge" in doc:
        raw = c.mapping(doc["calochallenge"], "calochallenge")
        extra = sorted(set(raw) - {"energy_scale", "note"})
        if extra:
            c.fail(f"calochallenge.{extra[0]}", "unknown key; expected energy_scale, note")
        calochallenge = {"energy_scale": float(c.get(raw, "energy_scale", "calochallenge",
                                                     "positive number")),
                         "note": c.get(raw, "note", "calochallenge", "str", default="")}
    spec = GeometrySpec(name=name, title=title, source=source, path=where, stack=stack,
                        readout=readout, placement=placement, calochallenge=calochallenge)
    _cross_check(c, spec)
    return spec


# ---------------------------------------------------------------------------------- stack
def _parse_stack(c: _Checker, doc: dict) -> list[StackGroup]:
    if "stack" not in doc:
        if isinstance(doc.get("readout"), dict) and doc["readout"].get("kind") == "inclined":
            return []  # derived from the inclined-plate parameters
        c.fail("stack", "missing required key (expected a list of layer groups with 'slabs')")
    raw = doc["stack"]
    if not isinstance(raw, list) or not raw:
        c.fail("stack", f"expected a non-empty list of layer groups, got {_kind(raw)}")
    groups = []
    previous_end = 0.0
    for i, g in enumerate(raw):
        path = f"stack[{i}]"
        g = c.mapping(g, path)
        unknown = sorted(set(g) - {"slabs", "repeat", "sublayers", "readout", "start_mm", "name"})
        if unknown:
            c.fail(f"{path}.{unknown[0]}", "unknown key; expected slabs, repeat, sublayers, readout, "
                                           "start_mm or name")
        repeat = c.get(g, "repeat", path, "positive int", default=1)
        sublayers = c.get(g, "sublayers", path, "positive int", default=1)
        readout = c.get(g, "readout", path, "bool", default=True)
        start = c.get(g, "start_mm", path, "non-negative number", default=None)
        slabs_raw = g.get("slabs")
        if slabs_raw is None:
            c.fail(f"{path}.slabs", "missing required key (expected a list of {material, thickness_mm})")
        if not isinstance(slabs_raw, list) or not slabs_raw:
            c.fail(f"{path}.slabs", f"expected a non-empty list of slabs, got {_kind(slabs_raw)}")
        slabs = []
        for j, s in enumerate(slabs_raw):
            spath = f"{path}.slabs[{j}]"
            s = c.mapping(s, spath)
            unknown = sorted(set(s) - {"material", "thickness_mm", "active", "note"})
            if unknown:
                c.fail(f"{spath}.{unknown[0]}", "unknown key; expected material, thickness_mm, active or note")
            material = c.get(s, "material", spath, "str")
            try:
                get_material(material)
            except ValueError as err:
                c.fail(f"{spath}.material", str(err))
            thickness = c.get(s, "thickness_mm", spath, "number")
            if thickness <= 0:
                c.fail(f"{spath}.thickness_mm", f"thickness must be positive (mm), got {thickness}")
            active = c.get(s, "active", spath, "bool", default=False)
            slabs.append((material, thickness, active))
        if readout and not any(a for _, _, a in slabs):
            c.fail(f"{path}.slabs", "a read-out layer needs at least one slab with 'active: true' "
                                    "(or mark the group 'readout: false')")
        if start is not None:
            if start < previous_end - 1e-9:
                c.fail(f"{path}.start_mm", f"overlapping layers: this group starts at {start} mm but "
                                           f"the previous one ends at {previous_end:g} mm")
        else:
            start = previous_end
        previous_end = start + repeat * sublayers * sum(t for _, t, _ in slabs)
        groups.append(StackGroup(tuple(slabs), repeat, readout, start, sublayers))
    return groups


# -------------------------------------------------------------------------------- readout
def _parse_readout(c: _Checker, r: dict) -> dict:
    kind = c.get(r, "kind", "readout", "str")
    if kind not in READOUT_KINDS:
        c.fail("readout.kind", f"unknown readout kind {kind!r}; expected one of {', '.join(READOUT_KINDS)}")
    out: dict[str, Any] = {"kind": kind}
    if kind == "planar":
        size = r.get("cell_size_mm")
        if size is None:
            c.fail("readout.cell_size_mm", "missing required key (expected a positive number or [u, v])")
        if isinstance(size, list):
            size = c.typed(size, "readout.cell_size_mm", "list of positive numbers")
            if len(size) != 2:
                c.fail("readout.cell_size_mm", f"expected two numbers [u, v], got {len(size)}")
        else:
            size = [c.typed(size, "readout.cell_size_mm", "positive number")] * 2
        out["cell_size_mm"] = size
    elif kind == "cylindrical":
        layers = r.get("layers")
        if not isinstance(layers, list) or not layers:
            c.fail("readout.layers", f"expected a non-empty list of {{r_edges_mm, n_alpha}}, got {_kind(layers)}")
        parsed = []
        for i, layer in enumerate(layers):
            path = f"readout.layers[{i}]"
            layer = c.mapping(layer, path)
            repeat = c.get(layer, "repeat", path, "positive int", default=1)
            edges = c.get(layer, "r_edges_mm", path, "list of non-negative numbers")
            n_alpha = c.get(layer, "n_alpha", path, "positive int")
            if len(edges) < 2:
                c.fail(f"{path}.r_edges_mm", f"expected at least two edges, got {len(edges)}")
            for k in range(1, len(edges)):
                if edges[k] <= edges[k - 1]:
                    c.fail(f"{path}.r_edges_mm", f"overlapping radial bins: edges must increase, but "
                                                 f"edge {k} ({edges[k]}) <= edge {k - 1} ({edges[k - 1]})")
            calo_id = c.get(layer, "id", path, "int", default=None)
            parsed += [{"r_edges_mm": edges, "n_alpha": n_alpha, "id": calo_id}] * repeat
        out["layers"] = parsed
    else:  # inclined
        num = lambda key, kind="positive number": c.get(r, key, "readout", kind)  # noqa: E731
        out.update(inner_radius_mm=num("inner_radius_mm"), outer_radius_mm=num("outer_radius_mm"),
                   half_length_mm=num("half_length_mm"), inclination_deg=num("inclination_deg"),
                   num_planes=num("num_planes", "positive int"),
                   theta_grid_rad=num("theta_grid_rad"), theta_offset_rad=num("theta_offset_rad"))
        out["layer_lengths_mm"] = c.get(r, "layer_lengths_mm", "readout", "list of positive numbers")
        n = len(out["layer_lengths_mm"])
        for key, kind in (("crossings", "list of positive ints"), ("merged_theta", "list of positive ints"),
                          ("merged_modules", "list of positive ints")):
            values = c.get(r, key, "readout", kind)
            if len(values) != n:
                c.fail(f"readout.{key}", f"expected {n} entries (one per layer in layer_lengths_mm), "
                                         f"got {len(values)}")
            out[key] = values
        absorbers = r.get("absorber")
        if not isinstance(absorbers, list) or len(absorbers) != n:
            c.fail("readout.absorber", f"expected a list of {n} absorber materials (one per layer), "
                                       f"got {_kind(absorbers)}")
        for i, m in enumerate(absorbers):
            try:
                get_material(c.typed(m, f"readout.absorber[{i}]", "str"))
            except ValueError as err:
                c.fail(f"readout.absorber[{i}]", str(err))
        out["absorber"] = absorbers
        if "plate_mm" not in r:
            c.fail("readout.plate_mm", "missing required key (expected {material: thickness_mm} of "
                                       "the non-absorber plate parts)")
        plate = c.mapping(r["plate_mm"], "readout.plate_mm")
        out["plate_mm"] = {}
        for key, value in plate.items():
            try:
                get_material(key)
            except ValueError as err:
                c.fail(f"readout.plate_mm.{key}", str(err))
            out["plate_mm"][key] = c.typed(value, f"readout.plate_mm.{key}", "positive number")
        out["absorber_mm"] = c.get(r, "absorber_mm", "readout", "positive number")
        out["gap_material"] = c.get(r, "gap_material", "readout", "str", default="LAr")
        if out["outer_radius_mm"] <= out["inner_radius_mm"]:
            c.fail("readout.outer_radius_mm", f"must exceed inner_radius_mm ({out['inner_radius_mm']})")
        if not 0 <= out["inclination_deg"] < 90:
            c.fail("readout.inclination_deg", f"expected an angle in [0, 90) degrees, got {out['inclination_deg']}")
        for key, values in (("merged_modules", out["merged_modules"]),):
            for i, m in enumerate(values):
                if out["num_planes"] % m:
                    c.fail(f"readout.{key}[{i}]", f"{m} does not divide num_planes ({out['num_planes']})")
    return out


# ------------------------------------------------------------------------------ placement
def _parse_placement(c: _Checker, raw, readout_kind: str) -> dict:
    if raw is None:
        if readout_kind == "inclined":
            return {}
        c.fail("placement", f"missing required key (expected a mapping with one of {', '.join(PLACEMENT_KINDS)})")
    raw = c.mapping(raw, "placement")
    unknown = sorted(set(raw) - set(PLACEMENT_KINDS))
    if unknown:
        c.fail(f"placement.{unknown[0]}", f"unknown placement kind; expected {', '.join(PLACEMENT_KINDS)}")
    out = {}
    for kind, p in raw.items():
        path = f"placement.{kind}"
        p = c.mapping(p, path)
        if kind == "plane":
            hw = c.get(p, "half_width_mm", path, "list of positive numbers", default=None)
            if hw is not None and len(hw) != 2:
                c.fail(f"{path}.half_width_mm", f"expected two numbers [u, v], got {len(hw)}")
            out[kind] = {"distance_mm": c.get(p, "distance_mm", path, "non-negative number", default=0.0),
                         "half_width_mm": hw}
        elif kind == "polygon_barrel":
            out[kind] = {"symmetry": c.get(p, "symmetry", path, "positive int"),
                         "inner_radius_mm": c.get(p, "inner_radius_mm", path, "positive number"),
                         "half_length_mm": c.get(p, "half_length_mm", path, "positive number"),
                         "phi0_deg": c.get(p, "phi0_deg", path, "number", default=0.0)}
            if out[kind]["symmetry"] < 3:
                c.fail(f"{path}.symmetry", f"a polygon needs at least 3 sides, got {out[kind]['symmetry']}")
        elif kind == "endcaps":
            out[kind] = {"z_min_mm": c.get(p, "z_min_mm", path, "positive number"),
                         "outer_half_width_mm": c.get(p, "outer_half_width_mm", path, "positive number"),
                         "hole_half_width_mm": c.get(p, "hole_half_width_mm", path, "non-negative number",
                                                     default=0.0)}
            if out[kind]["hole_half_width_mm"] >= out[kind]["outer_half_width_mm"]:
                c.fail(f"{path}.hole_half_width_mm", "the central hole must be smaller than outer_half_width_mm")
        else:  # cylinder_barrel
            out[kind] = {"inner_radius_mm": c.get(p, "inner_radius_mm", path, "positive number"),
                         "half_length_mm": c.get(p, "half_length_mm", path, "positive number")}
    if "plane" in out and len(out) > 1:
        c.fail("placement.plane", "a plane placement stands alone; do not combine it with other kinds")
    if "cylinder_barrel" in out and ("polygon_barrel" in out):
        c.fail("placement.cylinder_barrel", "choose either cylinder_barrel or polygon_barrel")
    return out


def _cross_check(c: _Checker, spec: GeometrySpec) -> None:
    kind = spec.readout["kind"]
    n_layers = sum(g.repeat for g in spec.stack if g.readout)
    if kind == "cylindrical" and len(spec.readout["layers"]) != n_layers:
        c.fail("readout.layers", f"expected {n_layers} layers (the stack has {n_layers} read-out layers), "
                                 f"got {len(spec.readout['layers'])}")
    if kind == "planar" and not ({"plane", "polygon_barrel", "endcaps"} & set(spec.placement)):
        c.fail("placement", "a planar readout needs plane, polygon_barrel or endcaps modules")
    if kind == "inclined" and spec.stack:
        c.fail("stack", "an inclined readout derives its radial stack from the plate description; "
                        "leave stack out")
    if kind == "inclined" and spec.placement:
        c.fail("placement", "an inclined readout is placed by its own radii; leave placement out")
