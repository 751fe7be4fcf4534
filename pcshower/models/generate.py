"""`pcshower.generate`: showers from the shipped (or a given) model, placed in a detector's cells.

Angles are in DEGREES here (the API edge) and radians inside pcshower; energies in GeV.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from pcshower.data.hits import CellHits
from pcshower.data.showers import Showers
from pcshower.units import deg_to_rad, particle_code, particle_name, resolve_device

__all__ = ["generate", "generate_batches", "load_default_model", "default_model_path", "resolve_model"]

#: Showers generated, placed and projected per pass when ``batch_size`` is not given: the
#: memory bound. With the shipped model (x4 split, ~15 800 detector points per shower) the README
#: command's 200 showers (one pass) peaked at 1.8 GB of host memory; with the previous default
#: (x16 split, ~20-30k points) one pass of 500 showers peaked at 4.6 GB (3000 showers in passes of
#: 500: 5.2 GB; 600 in passes of 256: 2.9 GB, `pcshower generate --steps 1`). 256 costs nothing
#: per shower on a CPU (docs/benchmarks.md, table 0).
DEFAULT_BATCH_SIZE = 256
#: Conditions within this fraction of the range's width outside the training range still count
#: as inside: a model trained on uniform 10-100 GeV saw 10.004-99.998 GeV, and 10 and 100 GeV
#: must be accepted.
_RANGE_TOLERANCE = 0.02

#: Digests of the models whose approximate-table warning was given (once per model and process).
_TABLES_WARNED: set = set()


def _warn_approximate_tables(info: dict) -> None:
    """Warn once per model when it learned from Geant4 run with approximate low-energy tables
    (the engine labels such files ``geant4_tables: approx-...``; docs/geant4.md)."""
    from pcshower.models.checkpoint import training_data

    key = info.get("sha256") or info.get("path")
    if key in _TABLES_WARNED:
        return
    labels = sorted({str(d["geant4_tables"]) for d in training_data(info.get("provenance", {}))
                     if str(d.get("geant4_tables", "")).startswith("approx")})
    if labels:
        _TABLES_WARNED.add(key)
        warnings.warn(f"model {info.get('path', '')} was trained on Geant4 showers simulated with "
                      f"approximate low-energy EM tables ({', '.join(labels)}; no Geant4 data "
                      "sets installed): its sampling fraction and resolution carry that "
                      "several-percent systematic (docs/geant4.md)", stacklevel=4)


def default_model_path() -> Path:
    """Path of the default checkpoint shipped inside the package."""
    return Path(str(files("pcshower") / "weights" / "default.pt"))


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, device: str):
    from pcshower.models.checkpoint import load_model

    return load_model(path, device=device)


def load_default_model(device=None):
    """The shipped default model (loaded once per device and cached)."""
    path = default_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"the default model {path} is missing from this installation; "
                                f"reinstall pcshower or pass model=PATH to a checkpoint")
    return _cached_model(str(path), str(resolve_device(device or "cpu")))


def resolve_model(model=None, device=None):
    """A ShowerModel from ``None`` (shipped default), a checkpoint path, or a model instance."""
    from pcshower.models.model import ShowerModel

    if model is None:
        return load_default_model(device)
    if isinstance(model, ShowerModel):
        return model.to(device) if device is not None else model
    if isinstance(model, (str, os.PathLike)):
        return _cached_model(str(Path(model).resolve()), str(resolve_device(device or "cpu")))
    raise TypeError(f"model must be None, a checkpoint path or a ShowerModel, got {type(model).__name__}")


def _check_range(model, energy: np.ndarray, theta: np.ndarray, allow: bool,
                 angle_note: str = "") -> None:
    checks = [("energy", energy, model.energy_range, "GeV", 1.0, ""),
              ("angle (theta)", theta, model.theta_range, "deg", 180.0 / math.pi, angle_note)]
    for name, values, (lo, hi), unit, scale, note in checks:
        tol = _RANGE_TOLERANCE * (hi - lo) + 1e-9 * max(abs(lo), abs(hi))
        bad = (values < lo - tol) | (values > hi + tol)
        if bad.any():
            v = float(values[bad][0]) * scale
            msg = (f"{name} {v:g} {unit}{note} is outside the range the model was trained on "
                   f"[{lo * scale:g}, {hi * scale:g}] {unit}")
            if not allow:
                raise ValueError(msg + "; pass allow_extrapolation=True (CLI: --allow-extrapolation) "
                                       "to generate anyway")
            warnings.warn(msg + "; extrapolating", stacklevel=4)


def _barrel_convention(model) -> bool:
    """True when the model's training showers carry a barrel geometry's global polar angle
    (90 deg = normal incidence), as every shower set ``pcshower simulate --stack ild`` (or cld,
    allegro) writes: such a model is conditioned on 90 deg minus the angle to the face normal."""
    names: set[str] = set()

    def walk(d):
        if isinstance(d, dict):
            for k, v in d.items():
                if k == "geometry_stack" and isinstance(v, str):
                    names.add(v)
                elif k == "angles" and isinstance(v, str) and v.startswith("global ("):
                    names.add(v[len("global ("):-1])
                else:
                    walk(v)

    walk(getattr(model, "checkpoint_info", None) or {})
    if not names:
        return False
    from pcshower.geometry import load_geometry

    for name in sorted(names):
        try:
            local, _ = load_geometry(name).local_direction(torch.tensor([math.pi / 2]),
                                                           torch.tensor([0.0]))
        except (ValueError, FileNotFoundError):
            continue
        if abs(float(local[0])) < 1e-6:
            return True
    return False


def normal_incidence_deg(geometry) -> float:
    """The global polar angle (degrees) at which particles enter ``geometry`` along its face
    normal at the default impact point: 90 for barrels, 0 for a plane facing +z."""
    from pcshower.geometry import load_geometry

    geom = load_geometry(geometry) if isinstance(geometry, str) else geometry
    local, _ = geom.local_direction(torch.tensor([0.0, math.pi / 2]), torch.tensor([0.0, 0.0]))
    local = torch.nan_to_num(local, nan=math.inf)
    return 0.0 if float(local[0]) <= float(local[1]) else 90.0


def generate(energy, angle, geometry: str | None = "ild", n: int = 1, *, phi=0.0, position=None,
             particle="photon", steps: int | None = None, seed: int | None = None, device=None,
             model=None, batch_size: int | None = None, sampler: str | None = None,
             allow_extrapolation: bool = False, response="auto", progress: bool = False) -> Showers:
    """Generate showers with a trained model and (optionally) project them on a detector.

    Args:
        energy: incident energy in GeV, scalar or array.
        angle: polar angle theta of the incident direction in DEGREES, scalar or array.
        geometry: geometry name or object (``pcshower.load_geometry``); ``None`` returns the
            model's physics-frame showers (x, y in R_M, z in X0, e fraction of incident energy).
        n: showers per condition: conditions are broadcast to a common length ``L`` and each is
            repeated ``n`` times, giving ``L * n`` showers.
        phi: azimuth of the incident direction in DEGREES.
        position: impact point(s) in mm, ``[3]`` or ``[L, 3]``; ``None`` lets the geometry
            choose its default impact point.
        particle: particle name or PDG code; must be one the model was trained on.
        steps: diffusion sampler steps (default: the model's, see its config).
        seed: random seed; the same seed and ``batch_size`` give identical showers.
        device: torch device (default: CUDA when available, else CPU).
        model: checkpoint path or ShowerModel (default: the model shipped with pcshower).
        batch_size: showers generated (and placed and projected) per pass: the memory bound of
            the work; default :func:`default_batch_size` (256, or a tenth of a smaller job so
            that its progress moves pass by pass); the returned points and hits of all passes stay in memory
            (:func:`generate_batches` yields them pass by pass instead).
        sampler: one of the model objective's samplers (``"heun"``, ``"euler"``; ``"midpoint"``
            for flow matching; ``"multistep"`` for consistency models); default: the model's.
        allow_extrapolation: warn instead of failing for conditions outside the training range.
        response: how the geometry reads the model's physics-frame deposits
            (:func:`pcshower.geometry.response.resolve_response`): ``"auto"`` uses the stack's
            measured Geant4 layer response when the model was taught by recorded Geant4 deposits
            (its provenance says ``physics_energy: per-cell deposit``), else the
            equivalent-medium sampling model; ``"sampling"`` forces the latter; a
            :class:`~pcshower.geometry.response.LayerResponse` or a response file path forces
            that response. The choice is recorded in ``metadata["layer_response"]``.
        progress: show a tqdm progress bar over the passes.

    Returns:
        ``Showers`` with the readout's cell hits attached as the attribute ``showers.hits``
        (:class:`~pcshower.data.CellHits`, visible MeV per cell; ``None`` without a geometry).
        With a geometry the points are in the detector frame (``geometry.to_detector``, at the
        given ``position`` or the default impact points, for every readout kind): offset from
        the impact point in the face plane and depth along the face normal (mm), visible energy
        (MeV), only the deposits the readout sees, sampling fluctuations included; the hits are
        exactly those points summed per cell (``geometry.project(showers)``). Without a
        geometry: physics frame. ``showers.metadata`` records model, seed, steps and sampler.
        The ``hits`` attribute is not carried by indexing or ``Showers.concat``.
    """
    parts = list(generate_batches(energy, angle, geometry, n, phi=phi, position=position,
                                  particle=particle, steps=steps, seed=seed, device=device,
                                  model=model, batch_size=batch_size, sampler=sampler,
                                  allow_extrapolation=allow_extrapolation, response=response,
                                  progress=progress))
    showers = Showers.concat(parts) if len(parts) > 1 else parts[0]  # keeps the metadata
    showers.hits = CellHits.concat([p.hits for p in parts]) if parts[0].hits is not None else None
    return showers


def default_batch_size(total: int) -> int:
    """Showers per pass when none is given: ``DEFAULT_BATCH_SIZE`` (256), but at least ten passes
    for jobs of fewer than 2560 showers (and at least 16 showers a pass), so that the progress
    of a small job moves and a one-call model's bar does not jump from 0 to done. On CPU the
    cost per shower is flat from batch 16 up (docs/bench/cpu_1thread_chunked.json)."""
    return int(min(DEFAULT_BATCH_SIZE, max(16, -(-int(total) // 10))))


def _positive_int(name: str, value) -> int:
    """``value`` as an int if it is a whole number >= 1 (2.0 passes, 2.5, 0, True do not)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(value) and value == int(value) and value >= 1
    if not ok:
        raise ValueError(f"{name} must be >= 1 and a whole number, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    """``seed`` if it is an integer in [0, 2**64) (what torch and NumPy take), else a clear error."""
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
            and 0 <= seed < 2 ** 64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def generate_batches(energy, angle, geometry: str | None = "ild", n: int = 1, *, phi=0.0,
                     position=None, particle="photon", steps: int | None = None,
                     seed: int | None = None, device=None, model=None,
                     batch_size: int | None = None, sampler: str | None = None,
                     allow_extrapolation: bool = False, response="auto", progress: bool = False):
    """:func:`generate`, pass by pass: yields a ``Showers`` (with its ``hits``) per pass of
    ``batch_size`` showers, so the caller can write each and drop it (``pcshower generate``
    does). Arguments as for :func:`generate`; concatenated, the passes are :func:`generate`'s
    result for the same seed and batch size. Arguments are checked before the first pass (this
    function is not itself a generator: it returns one)."""
    from tqdm.auto import tqdm

    n = _positive_int("n", n)
    steps = None if steps is None else _positive_int("steps", steps)
    batch_size = None if batch_size is None else _positive_int("batch_size", batch_size)
    if seed is not None:
        _check_seed(seed)
    device = resolve_device(device)
    net = resolve_model(model, device)
    e_arr = np.atleast_1d(np.asarray(energy, dtype=np.float64))
    theta_arr = np.atleast_1d(deg_to_rad(angle))
    phi_arr = np.atleast_1d(deg_to_rad(phi))
    try:
        e_arr, theta_arr, phi_arr = np.broadcast_arrays(e_arr, theta_arr, phi_arr)
    except ValueError:
        raise ValueError(f"energy ({e_arr.size}), angle ({theta_arr.size}) and phi ({phi_arr.size}) "
                         f"values cannot be broadcast to one length") from None
    if not np.all(np.isfinite(e_arr)) or np.any(e_arr <= 0):
        raise ValueError("energy must be finite and > 0 GeV")
    if not np.all(np.isfinite(theta_arr)) or np.any(theta_arr < 0) or np.any(theta_arr > math.pi):
        raise ValueError("angle (theta) must be a finite number in [0, 180] degrees")
    if not np.all(np.isfinite(phi_arr)):
        raise ValueError("phi must be a finite number of degrees")
    code = particle_code(particle)
    # a model read from a checkpoint must say what it was trained on; one built in memory
    # (no checkpoint_info) is its maker's to judge
    from_file = bool(getattr(net, "checkpoint_info", None))
    trained = (getattr(net, "checkpoint_info", {}) or {}).get("provenance", {}).get("particles")
    if (from_file and not trained) or (trained and code not in trained):
        names = ", ".join(particle_name(p) for p in trained or ())
        msg = (f"the model was trained on {names} only, not {particle_name(code)}" if trained else
               f"the model does not record which particles it was trained on, so "
               f"{particle_name(code)} showers from it are a guess")
        if not allow_extrapolation:
            raise ValueError(msg + "; pass allow_extrapolation=True (CLI: --allow-extrapolation) "
                                   "to generate anyway")
        warnings.warn(msg, stacklevel=3)
    geom = None
    if geometry is not None:
        from pcshower.geometry import load_geometry

        geom = load_geometry(geometry)
    # the model's angle: for a model trained on a barrel's global angles, 90 deg minus the
    # incidence to the face normal of the geometry the showers go to (the same angle for ILD)
    pos = None
    if position is not None:
        pos = np.asarray(position, dtype=np.float64)
        if pos.shape == (3,):
            pos = np.broadcast_to(pos, (e_arr.size, 3)).copy()
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] != e_arr.size:
            raise ValueError(f"position must be [3] or [{e_arr.size}, 3] mm, got shape {pos.shape}")
    model_theta, note = theta_arr, ""
    converted = geom is not None and _barrel_convention(net)
    if converted:
        # the incidence at each shower's own impact point (the default one without a position)
        local, _ = geom.local_direction(torch.as_tensor(theta_arr), torch.as_tensor(phi_arr),
                                        None if pos is None else torch.as_tensor(pos))
        local = local.double().numpy().reshape(theta_arr.shape)
        miss = ~np.isfinite(local)
        if miss.any():
            i = int(np.argmax(miss))
            raise ValueError(f"angle {math.degrees(theta_arr.flat[i]):g} deg, phi "
                             f"{math.degrees(phi_arr.flat[i]):g} deg misses the calorimeter of "
                             f"{geom.name}; its particles enter along the face normal at angle "
                             f"{normal_incidence_deg(geom):g} deg")
        model_theta = math.pi / 2 - local
        bad = (model_theta < net.theta_range[0] - 1e-6) | (model_theta > net.theta_range[1] + 1e-6)
        if bad.any():
            note = (f" (the model's angle: 90 deg minus the {math.degrees(float(local[bad][0])):g}"
                    f" deg incidence to the face normal of {geom.name}; normal incidence is "
                    f"angle {normal_incidence_deg(geom):g} deg there)")
    _check_range(net, e_arr, model_theta, allow_extrapolation, note)
    e_arr, theta_arr, phi_arr, model_theta = (np.repeat(a, n) for a in (e_arr, theta_arr, phi_arr,
                                                                         model_theta))
    total = e_arr.size
    if pos is not None:
        pos = np.repeat(pos, n, axis=0)

    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    gen = torch.Generator(device=device).manual_seed(int(seed))
    size = batch_size or default_batch_size(total)
    phi_range = (getattr(net, "checkpoint_info", {}) or {}).get("provenance", {}).get("phi_range_rad")
    # a model that only saw one azimuth (phi-symmetric physics-frame showers) is conditioned on
    # that azimuth; the showers keep the requested phi for their placement
    cond_phi = phi_range[0] if phi_range and phi_range[1] - phi_range[0] < 1e-9 else None
    info = getattr(net, "checkpoint_info", {}) or {}
    _warn_approximate_tables(info)
    meta = {"generator": "pcshower.generate", "seed": int(seed),
            "steps": int(steps or net.config["steps"]), "sampler": sampler or net.config["sampler"],
            "model": info.get("path", "in-memory model"),
            "model_sha256": info.get("sha256"), "particle": particle_name(code),
            "objective": net.objective.name}
    calls = net.network_calls(meta["steps"], meta["sampler"])
    meta["network_calls"] = calls
    layer_response = None
    if geom is not None:
        from pcshower.geometry.response import resolve_response

        layer_response, meta["layer_response"] = resolve_response(
            response, info.get("provenance"), geom)

    def passes():
        # the bar counts showers and moves with every network call of a pass (a pass of k
        # showers advances k / calls per call), so it moves and shows a rate for one pass too
        bar = tqdm(total=total, disable=not progress, desc="generate", unit="shower",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, "
                              "{rate_fmt}]")
        try:
            for start in range(0, total, size):
                sl = slice(start, start + size)
                k = len(e_arr[sl])
                part = net.sample(e_arr[sl], model_theta[sl], phi_arr[sl], steps=steps,
                                  sampler=sampler, generator=gen, cond_phi=cond_phi,
                                  on_call=lambda: bar.update(k / calls))
                if converted:  # placed at the angles asked for
                    part = part._replace(theta=torch.as_tensor(theta_arr[sl], dtype=torch.float64,
                                                               device=part.device))
                bar.n = min(start + k, total)  # exact after the pass, whatever the rounding
                bar.refresh()
                part = part._replace(particle=torch.full((len(part),), code, dtype=torch.int64,
                                                         device=part.device))
                if pos is not None:
                    part = part._replace(position=torch.as_tensor(pos[sl], dtype=torch.float64,
                                                                  device=part.device))
                part.hits = None
                if geom is not None:  # placed and projected batch by batch: memory stays per batch
                    part = _project(part, geom, gen, layer_response)
                part.metadata.update(meta)
                yield part
        finally:
            bar.close()

    return passes()


def _project(showers: Showers, geom, generator: torch.Generator, response=None) -> Showers:
    """Place physics-frame showers in a geometry: detector-frame points (the visible part, with
    sampling fluctuations) plus their cell hits, consistent with each other; ``response`` as
    for :meth:`~pcshower.geometry.Geometry.to_detector`."""
    # float32 points like the model's; the hits are projected from exactly these points
    placed = geom.to_detector(showers, generator=generator, response=response)
    detector = placed.to(dtype=showers.points.dtype)
    hits = geom.project(detector)
    # the hits count what missed the readout in placing the points too
    hits.outside_energy = hits.outside_energy + placed.outside_energy.to(hits.outside_energy)
    hits.outside_points = hits.outside_points + placed.outside_points.to(hits.outside_points)
    detector.hits = hits
    # energy that misses the readout is counted (outside_energy, MeV deposited); a batch that
    # loses most of it is almost certainly placed wrongly: say so loudly
    lost = float(detector.hits.outside_energy.double().sum())
    made = float((showers.energy.double() * 1000.0).sum())
    if made > 0 and lost > 0.5 * made:
        warnings.warn(f"{100 * lost / made:.0f} % of the showers' energy misses the readout of "
                      f"{geom.name} (outside its cells or depth): check the angles (normal "
                      f"incidence is angle {normal_incidence_deg(geom):g} deg) and positions",
                      stacklevel=2)
    return detector
