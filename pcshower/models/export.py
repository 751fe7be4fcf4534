"""Exported generation pipelines: a model's whole chain in one TorchScript file for full simulation.

``export_model`` writes the chain of :func:`pcshower.generate` for one geometry (shower flow,
point network with its fixed number of sampler steps, calibration, sub-voxel split, placement in
the local frame of the face a shower enters, and the reading of deposits as visible energy: the
sampling fraction and fluctuations, or for a model taught by recorded Geant4 deposits the stack's
measured Geant4 layer response, :mod:`pcshower.geometry.response`) as one
TorchScript file that ``torch.jit.load`` (Python) or ``torch::jit::load`` (libtorch, C++) runs in
a process that never imports pcshower. Layouts:

``ddml-caloclouds``
    What Key4hep's DDFastShowerML (DDML) feeds its ``CaloCloudsTwoAngleModel`` (``src/
    CaloCloudsTwoAngleModel.cc``, ``src/TorchInference.cc`` in key4hep/DDML): three ``[1, 1]``
    float32 inputs, the kinetic energy (GeV) and the local polar and azimuthal angles of the
    direction (degrees; DDML's local frame of a barrel stave: x along the beam axis, z into the
    calorimeter); one flat float32 output of exactly ``DDML_MAX_ELEMENTS`` numbers: the point
    count of each readout layer, then ``(x, y, layer, E)`` per point (mm from the impact point in
    that frame, MeV), zero-padded. DDML copies exactly that many numbers out (its
    ``m_maxNumElements``), so a shower with more points than fit is merged first: the points
    of a layer are summed on a square grid (energy-weighted centroids; energy kept exactly), the
    finest grid of :data:`DDML_MERGE_FRACTIONS` of the cell pitch that makes them fit.
``native``
    Batched: inputs ``energy [B]`` (GeV), ``theta [B]``, ``phi [B]`` (local angles in pcshower's
    frame of the face: theta to the face normal, phi from the face's u axis towards v, degrees),
    any B; outputs ``points [B, M, 5]`` float32 (u, v offsets from the impact point and depth
    along the normal in mm, readout layer, visible MeV; zero rows after each shower's
    points) and ``counts [B]`` int64. ``M`` is the model's most network points times its split
    factor: no shower is ever cut.

Randomness is drawn inside the graph from the process's global generator (``torch.manual_seed``
in Python, ``torch::manual_seed`` in C++), in the order :func:`pcshower.generate` draws from its
own generator, so that after ``torch.manual_seed(s)`` an exported file gives exactly the showers
of ``pcshower.generate(..., seed=s, batch_size=B)`` (B = the file's batch, 1 for DDML).

How: the chain is traced (``torch.jit.trace``) through pcshower's own code, so there is one
implementation of each step. Tracing records the tensor operations of one run, so the chain is
traced once per branch it takes on data (normal and oblique incidence) and a scripted module
chooses; the data-dependent loops (the Gamma sampler's rejection loop, the merge to fit) are
TorchScript functions inside the trace. Every export is checked before it is written: the
traced graph must reproduce the Python chain on probe showers across the model's range
(:func:`check_export`), else no file is written.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["export_model", "check_export", "read_export_metadata", "LAYOUTS", "DDML_MAX_ELEMENTS",
           "DDML_MERGE_FRACTIONS", "EXPORT_FORMAT_VERSION"]

#: Layouts :func:`export_model` writes.
LAYOUTS = ("ddml-caloclouds", "native")
#: Version of the exported files' interface (inputs, outputs, metadata keys).
EXPORT_FORMAT_VERSION = 1
#: Numbers DDML's CaloClouds adapter copies out of the model's output
#: (``CaloCloudsTwoAngleModel::m_maxNumElements`` in key4hep/DDML, 35000 = 4 per point + counts).
DDML_MAX_ELEMENTS = 35000
#: Per-layer counts DDML's CaloClouds adapter reads (``CaloCloudsTwoAngleModel::m_nLayer``:
#: ILD's 30 layers).
DDML_LAYERS = 30
#: Grid pitches (fractions of the readout's cell pitch) tried, finest first, to merge a shower
#: that has more points than DDML's output holds.
DDML_MERGE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
#: Name of the JSON metadata inside an exported file (``torch.jit.load(..., _extra_files=)``).
METADATA_NAME = "pcshower.json"


class _LocalChain(nn.Module):
    """The Python chain, showers in the local frame of one face: ``forward(energy [B] GeV,
    theta_local [B], phi_local [B] rad, float64) -> (points [K, 5] float64 (u, v, w mm, layer,
    visible MeV), batch [K])``, exactly what :func:`pcshower.generate` computes for the same
    directions at the face centre (without hand-over to neighbouring barrel staves)."""

    def __init__(self, net, geom, module: int, steps: int, sampler: str, cond_phi,
                 barrel_convention: bool, response=None):
        super().__init__()
        self.net, self.geom, self.response = net, geom, response
        self.module, self.steps, self.sampler = int(module), int(steps), sampler
        self.cond_phi, self.barrel = cond_phi, bool(barrel_convention)
        m = geom.modules
        self.axes = [m.u[self.module], m.v[self.module], m.n[self.module]]

    def forward(self, energy: torch.Tensor, theta_local: torch.Tensor, phi_local: torch.Tensor):
        from pcshower.geometry.frames import ShowerFrames

        u, v, n = self.axes
        s = torch.sin(theta_local)
        direction = ((s * torch.cos(phi_local))[:, None] * u + (s * torch.sin(phi_local))[:, None] * v
                     + torch.cos(theta_local)[:, None] * n)
        module = torch.full_like(energy, self.module, dtype=torch.int64)
        frames: ShowerFrames = self.geom.modules.frames(module, torch.zeros_like(direction[:, :2]),
                                                        direction)
        theta_model = (math.pi / 2 - frames.theta_local) if self.barrel else frames.theta_local
        # the model saw one azimuth (export_model refuses others): it is conditioned on that one
        showers = self.net.sample(energy, theta_model, frames.phi_local, steps=self.steps,
                                  sampler=self.sampler, cond_phi=self.cond_phi)
        placed = self.geom._place_in(showers, frames, None, True, hand_over=False,
                                     recorded=self.response)
        du, dv, w, kept = self.geom._visible_points(placed)
        layer = placed.layer.index_select(0, kept).to(torch.float64)
        visible = placed.visible.index_select(0, kept)
        # float32 like pcshower.generate's detector points
        points = torch.stack([du, dv, w, layer, visible], 1).to(torch.float32).to(torch.float64)
        return points, placed.batch.index_select(0, kept)


def _merge_on_grid(points: torch.Tensor, pitch: float) -> torch.Tensor:
    """Points ``[K, 5]`` (u, v, w, layer, E) summed per (layer, u, v) square of ``pitch`` mm:
    energy-weighted centroids, the energy kept exactly."""
    iu = torch.floor(points[:, 0] / pitch).to(torch.int64) + (1 << 20)
    iv = torch.floor(points[:, 1] / pitch).to(torch.int64) + (1 << 20)
    key = (points[:, 3].to(torch.int64) << 42) + (iu << 21) + iv
    uniq, inverse = torch.unique(key, return_inverse=True)
    k = uniq.shape[0]
    e = points[:, 4]
    sums = torch.zeros(k, 4, dtype=points.dtype)
    sums.index_add_(0, inverse, torch.stack([e, e * points[:, 0], e * points[:, 1],
                                             e * points[:, 2]], 1))
    layer = torch.zeros(k, dtype=points.dtype).scatter_(0, inverse, points[:, 3])
    safe = sums[:, 0].clamp_min(1e-300)
    return torch.stack([sums[:, 1] / safe, sums[:, 2] / safe, sums[:, 3] / safe, layer,
                        sums[:, 0]], 1)


def _merge_to_fit(points: torch.Tensor, capacity: int, pitches: List[float]) -> torch.Tensor:
    """``points`` if there are at most ``capacity``, else merged on the finest grid of
    ``pitches`` (mm) that leaves at most ``capacity``; an error if none does."""
    if points.shape[0] <= capacity:
        return points
    for pitch in pitches:
        merged = _merge_on_grid(points, pitch)
        if merged.shape[0] <= capacity:
            return merged
    raise RuntimeError("pcshower export: a shower has more points than the output holds even "
                       "merged on the coarsest grid")


def _check_inputs(e: torch.Tensor, th: torch.Tensor, ph: torch.Tensor):
    """The inputs of an exported file (GeV, rad), refused unless physical."""
    if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
        raise RuntimeError("pcshower export: energy must be finite and > 0 GeV")
    if not bool(torch.isfinite(th).all()) or bool((th < 0).any()) \
            or bool((th >= 0.5 * math.pi).any()):
        raise RuntimeError("pcshower export: theta must be in [0, 90) degrees (the angle to the "
                           "face normal of a particle entering the calorimeter)")
    if not bool(torch.isfinite(ph).all()):
        raise RuntimeError("pcshower export: phi must be finite")


class _DDMLCaloClouds(nn.Module):
    """DDML's CaloClouds interface over two traced chains (normal and oblique incidence)."""

    def __init__(self, normal, oblique, layers: int, max_elements: int, pitches: List[float]):
        super().__init__()
        self.normal, self.oblique = normal, oblique
        self.layers, self.max_elements, self.pitches = int(layers), int(max_elements), pitches

    def forward(self, energy: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        e = energy.reshape(-1).to(torch.float64)
        th = torch.deg2rad(theta.reshape(-1).to(torch.float64))
        ph = torch.deg2rad(phi.reshape(-1).to(torch.float64))
        if e.shape[0] != 1 or th.shape[0] != 1 or ph.shape[0] != 1:
            raise RuntimeError("the ddml-caloclouds layout takes one shower per call ([1, 1] inputs)")
        _check_inputs(e, th, ph)
        # DDML's local frame (x along the stave's v = beam axis, y = n x v = -u, z = n) to the
        # face frame: a direction (sin t cos p, sin t sin p, cos t) there has u = -sin t sin p,
        # v = sin t cos p
        su = -torch.sin(th) * torch.sin(ph)
        sv = torch.sin(th) * torch.cos(ph)
        ph_face = torch.atan2(sv, su)
        if bool((th == 0).all()):
            points, batch = self.normal(e, th, torch.zeros_like(ph))
        else:
            points, batch = self.oblique(e, th, ph_face)
        points = _merge_to_fit(points, (self.max_elements - self.layers) // 4, self.pitches)
        order = torch.argsort(points[:, 3], stable=True)
        points = points[order]
        layer = points[:, 3].to(torch.int64)
        out = torch.zeros(self.max_elements, dtype=torch.float32)
        out[:self.layers] = torch.bincount(layer, minlength=self.layers)[:self.layers].to(torch.float32)
        body = torch.stack([points[:, 1], -points[:, 0], points[:, 3], points[:, 4]], 1)
        out[self.layers:self.layers + 4 * points.shape[0]] = body.reshape(-1).to(torch.float32)
        return out


class _Native(nn.Module):
    """Batched interface over two traced chains of a fixed batch; any number of showers."""

    def __init__(self, normal, oblique, batch: int, max_points: int):
        super().__init__()
        self.normal, self.oblique = normal, oblique
        self.batch, self.max_points = int(batch), int(max_points)

    def forward(self, energy: torch.Tensor, theta: torch.Tensor,
                phi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        e = energy.reshape(-1).to(torch.float64)
        th = torch.deg2rad(theta.reshape(-1).to(torch.float64))
        ph = torch.deg2rad(phi.reshape(-1).to(torch.float64))
        if th.shape[0] != e.shape[0] or ph.shape[0] != e.shape[0]:
            raise RuntimeError("energy, theta and phi must hold one number per shower each")
        _check_inputs(e, th, ph)
        n = e.shape[0]
        out = torch.zeros(n, self.max_points, 5, dtype=torch.float32)
        counts = torch.zeros(n, dtype=torch.int64)
        b = self.batch
        for start in range(0, n, b):
            stop = min(start + b, n)
            k = stop - start
            idx = torch.arange(start, start + b) % n if k < b else torch.arange(start, stop)
            if bool((th[idx] == 0).all()):
                points, which = self.normal(e[idx], th[idx], torch.zeros_like(ph[idx]))
            else:
                points, which = self.oblique(e[idx], th[idx], ph[idx])
            per = torch.bincount(which, minlength=b)
            first = torch.cumsum(per, 0) - per
            slot = torch.arange(which.shape[0]) - first[which]
            mine = which < k  # padding showers (a short last pass) are dropped
            out[start + which[mine], slot[mine]] = points[mine].to(torch.float32)
            counts[start:stop] = per[:k]
        return out, counts


def _probe_conditions(net, batch: int, oblique: bool,
                      theta_max: float) -> List[Tuple[torch.Tensor, ...]]:
    """Conditions inside the model's range: energies about both ends and the middle, local
    angles (oblique) spread over (0, ``theta_max``] rad; rows distinct, never outside."""
    lo, hi = net.energy_range
    probes = []
    rows = torch.arange(batch, dtype=torch.float64)
    spread = rows / max(batch, 1)  # [0, 1)
    for i, f in enumerate((0.02, 0.5, 0.93)):
        e = lo + (f + 0.05 * spread) * (hi - lo)
        if oblique:
            th = theta_max * (0.3 + 0.3 * i + 0.1 * spread)
            ph = 0.3 + i + 6.0 * spread
        else:
            th, ph = torch.zeros(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)
        probes.append((e, th, ph))
    return probes


def check_export(traced, chain, probes, seed: int = 12345) -> float:
    """Largest difference between ``traced`` and the Python ``chain`` on ``probes`` (same
    seeds); raises ``RuntimeError`` if they disagree in a point count or beyond round-off."""
    worst = 0.0
    for i, args in enumerate(probes):
        torch.manual_seed(seed + i)
        a, ia = chain(*args)
        torch.manual_seed(seed + i)
        b, ib = traced(*args)
        if a.shape != b.shape or not torch.equal(ia, ib):
            raise RuntimeError(f"export check failed: the traced graph gives {b.shape[0]} points, "
                               f"the Python chain {a.shape[0]} (probe {i}); the chain took a "
                               f"data-dependent branch the trace did not record")
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
    if worst > 1e-3:
        raise RuntimeError(f"export check failed: traced and Python points differ by {worst:g}")
    return worst


def export_model(model, out, *, layout: str = "ddml-caloclouds", geometry: str = "ild",
                 steps: int | None = None, sampler: str | None = None, batch: int = 1,
                 overwrite: bool = False, max_elements: int = DDML_MAX_ELEMENTS) -> dict:
    """Write the generation chain of ``model`` (a checkpoint path, ``None`` for the shipped
    default, or a ShowerModel) for ``geometry`` as one TorchScript file ``out`` in ``layout``
    (:data:`LAYOUTS`). ``batch``: showers per pass of the ``native`` layout (its input may hold
    any number). Returns the metadata written into the file."""
    from pcshower import __version__
    from pcshower.geometry import load_geometry
    from pcshower.io._atomic import atomic_path, check_output
    from pcshower.io.digest import file_sha256
    from pcshower.models.generate import _barrel_convention, _positive_int, resolve_model

    if layout not in LAYOUTS:
        raise ValueError(f"unknown export layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    if layout == "ddml-caloclouds" and batch != 1:
        raise ValueError("the ddml-caloclouds layout is one shower per call: batch must be 1")
    net = resolve_model(model)  # not moved: the file's copy is made below
    geom = load_geometry(geometry)
    if geom.modules is None:
        raise ValueError(f"geometry {geom.name} is a cylindrical surface readout; exported "
                         f"pipelines place showers on flat faces (planes, barrel staves) only")
    staves = int(getattr(geom, "_staves", 0) or 0)
    if layout == "ddml-caloclouds" and not staves:
        raise ValueError(f"the ddml-caloclouds layout is DDML's polygon-barrel interface; "
                         f"{geom.name} has no barrel staves (use --layout native)")
    layers = int(geom.num_layers)
    if layout == "ddml-caloclouds" and layers != DDML_LAYERS:
        warnings.warn(f"{geom.name} has {layers} readout layers, but DDML's CaloClouds adapter "
                      f"reads {DDML_LAYERS} per-layer counts (CaloCloudsTwoAngleModel::m_nLayer, "
                      f"not a steering property): the file writes {layers} counts, so DDML needs "
                      f"m_nLayer = {layers} to read it", stacklevel=2)
    info = getattr(net, "checkpoint_info", {}) or {}
    from pcshower.geometry.response import resolve_response

    # as pcshower.generate reads them: a model taught by recorded Geant4 deposits with the
    # stack's measured Geant4 layer response (its log-normal layer factors drawn in the graph)
    response, response_label = resolve_response("auto", info.get("provenance"), geom)
    phi_range = info.get("provenance", {}).get("phi_range_rad")
    if not (phi_range and phi_range[1] - phi_range[0] < 1e-9):
        raise ValueError("this model is conditioned on the azimuth of its training showers (the "
                         "detector's global phi); an exported file sees only the local direction "
                         "at the face, so it cannot give that model's showers: export a model "
                         "trained at one azimuth (azimuthally symmetric physics-frame showers)")
    cond_phi = float(phi_range[0])
    steps = net.config["steps"] if steps is None else _positive_int("steps", steps)
    sampler = sampler or net.config["sampler"]
    net.objective.network_calls(sampler, int(steps))  # unknown samplers fail here, before tracing
    steps = int(steps)
    out = check_output(out, overwrite=overwrite)  # before the work, after the cheap checks
    barrel = _barrel_convention(net)
    theta_range = _local_theta_range(net, barrel)
    # the file gets its own copy of the weights (on the CPU): the trace's parameters are made
    # inference-only below, which must not touch the caller's model
    own = copy.deepcopy(net).to("cpu")
    own.chunk_points = None  # one pass: the chunked loop is Python control flow
    chain = _LocalChain(own, geom, 0, steps, sampler, cond_phi, barrel, response)
    traced = {}
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        for name, oblique in (("normal", False), ("oblique", True)):
            probes = _probe_conditions(net, batch, oblique, math.radians(theta_range[1]))
            torch.manual_seed(0)
            with warnings.catch_warnings():
                # the tracer's notes on the Python values it froze (the check below is the test)
                warnings.simplefilter("ignore")
                traced[name] = torch.jit.trace(chain, probes[1], check_trace=False)
            for p in traced[name].parameters():  # inference only: no autograd in the graph
                p.requires_grad_(False)
            check_export(traced[name], chain, probes)
    if layout == "ddml-caloclouds":
        pitch = float(min(geom.readout.pitch.tolist()))
        top = _DDMLCaloClouds(traced["normal"], traced["oblique"], layers, max_elements,
                              [f * pitch for f in DDML_MERGE_FRACTIONS])
        inputs = {"energy": "[1, 1] float32, kinetic energy (GeV)",
                  "theta": "[1, 1] float32, local polar angle to the face normal (deg)",
                  "phi": "[1, 1] float32, local azimuth, DDML's barrel-stave frame (deg)"}
        outputs = {"output": f"[{max_elements}] float32: {layers} per-layer point counts, then "
                             f"(x mm, y mm, layer, E MeV) per point, zero-padded"}
    else:
        max_points = int(net.config["max_points"]) * int(net.config["split"]["factor"])
        top = _Native(traced["normal"], traced["oblique"], batch, max_points)
        inputs = {"energy": "[B] GeV", "theta": "[B] deg, local polar angle to the face normal",
                  "phi": "[B] deg, local azimuth from the face's u axis towards v"}
        outputs = {"points": f"[B, {max_points}, 5] float32: u mm, v mm, depth mm, layer, "
                             "visible MeV (zero rows after counts[b])",
                   "counts": "[B] int64 points per shower"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's: DDML loads TorchScript
        scripted = torch.jit.script(top)
    meta = {"format": "pcshower-export", "format_version": EXPORT_FORMAT_VERSION,
            "pcshower_version": __version__, "torch_version": torch.__version__,
            "layout": layout, "geometry": geom.name, "layers": layers,
            "model": str(info.get("path", "in-memory model")), "model_sha256": info.get("sha256"),
            "steps": steps, "sampler": sampler, "network_calls": net.network_calls(steps, sampler),
            "batch": batch, "layer_response": response_label,
            "energy_range_gev": list(net.energy_range),
            "theta_local_range_deg": _local_theta_range(net, barrel),
            "units": {"energy": "GeV", "angles": "deg", "length": "mm",
                      "deposit": "MeV (visible)"},
            "inputs": inputs, "outputs": outputs,
            "random_numbers": "torch's global generator (torch.manual_seed / torch::manual_seed)"}
    if layout == "ddml-caloclouds":
        meta["max_elements"] = max_elements
        meta["merge_pitch_mm"] = [f * pitch for f in DDML_MERGE_FRACTIONS]
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta, indent=1)})
        _check_saved(torch.jit.load(str(tmp), map_location="cpu"), scripted, layout, batch,
                     net.energy_range, theta_range)
    meta["sha256"] = file_sha256(out)
    return meta


def _check_saved(loaded, scripted, layout: str, batch: int, energy_range, theta_range_deg):
    """The file as written must give the in-memory module's output (same seed), at normal and
    oblique incidence, through the layout's own inputs (degrees, DDML's frame, merging)."""
    e = 0.5 * (energy_range[0] + energy_range[1])
    th = 0.5 * theta_range_deg[1]
    for i, (theta, phi) in enumerate(((0.0, 0.0), (th, 60.0))):
        if layout == "ddml-caloclouds":
            args = tuple(torch.tensor([[v]], dtype=torch.float32) for v in (e, theta, phi))
        else:
            rows = torch.arange(batch, dtype=torch.float64) / max(batch, 1)
            args = (e * (1 + 0.05 * rows), torch.full((batch,), theta, dtype=torch.float64),
                    torch.full((batch,), phi, dtype=torch.float64))
        torch.manual_seed(777 + i)
        want = scripted(*args)
        torch.manual_seed(777 + i)
        got = loaded(*args)
        want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
        if any(not torch.equal(a, b) for a, b in zip(want, got)):
            raise RuntimeError("export check failed: the written file does not reproduce the "
                               "module it was saved from")


def _local_theta_range(net, barrel: bool) -> list:
    lo, hi = (math.degrees(a) for a in net.theta_range)
    return sorted([90.0 - hi, 90.0 - lo]) if barrel else [lo, hi]


def read_export_metadata(path) -> dict:
    """The metadata written into an exported file."""
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_NAME]:
        raise ValueError(f"{path} is a TorchScript file but not one pcshower exported "
                         f"(no {METADATA_NAME} inside)")
    return json.loads(extra[METADATA_NAME])
