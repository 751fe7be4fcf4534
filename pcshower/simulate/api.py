"""``pcshower.simulate``: reference showers for a stack or a named geometry, in either frame.

An *engine* is any callable ``engine(energy_gev[n], theta[n], phi[n], particle: int,
stack: Stack, seed: int, frame: str) -> Showers`` returning unreduced showers, with ``theta``
and ``phi`` in radians in the stack's local frame. ``"parametrised"`` is the GFlash engine of
:mod:`pcshower.simulate.parametrised`; ``"geant4"`` resolves lazily to
``pcshower.simulate.geant4.simulate_geant4`` (needs ``pip install pcshower[geant4]``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from pcshower.data import Showers
from pcshower.physics.stack import Stack
from pcshower.simulate.parametrised import MAX_THETA_RAD, simulate_parametrised
from pcshower.simulate.reduce import reduce_points
from pcshower.units import FRAMES, particle_code

__all__ = ["simulate", "get_engine", "resolve_stack", "validate_conditions", "ENGINE_NAMES",
           "Engine"]

Engine = Callable[..., Showers]
ENGINE_NAMES = ("parametrised", "geant4")


def get_engine(name: str | Engine, **options) -> Engine:
    """The engine callable for a name (``"parametrised"``, ``"geant4"``) or a callable itself.

    ``options`` are keyword arguments bound to the engine (e.g. ``spot_scale``).
    """
    if callable(name):
        return functools.partial(name, **options) if options else name
    if name == "parametrised":
        inside = sorted(k for k in options if k == "upstream" or k.startswith("fastsim"))
        if inside:
            raise ValueError(f"{', '.join(inside)}: only with the geant4 engine (the "
                             "parametrised engine has no Geant4 tracks to stop or upstream "
                             "material)")
        fn = simulate_parametrised
    elif name == "geant4":
        try:
            from pcshower.simulate.geant4 import simulate_geant4 as fn
        except ImportError as err:
            raise ValueError(f"the geant4 engine is not available ({err}); install it with "
                             "pip install pcshower[geant4]") from None
    else:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    return functools.partial(fn, **options) if options else fn


def resolve_stack(stack) -> tuple[Stack, object | None, str]:
    """``(stack, geometry or None, name)`` for a :class:`Stack` or a geometry name.

    A name is looked up with :func:`pcshower.load_geometry`; its ``.stack`` is the layered
    stack the showers are simulated in.
    """
    if isinstance(stack, Stack):
        return stack, None, stack.name
    if isinstance(stack, str):
        if not stack.strip():
            raise ValueError("empty stack name: give a geometry name such as 'ild' or a Stack")
        try:
            from pcshower.geometry import load_geometry
        except ImportError as err:
            raise ValueError(f"cannot look up geometry {stack!r}: the geometry package is not "
                             f"available ({err}); pass a pcshower.physics.Stack instead") from None
        geometry = load_geometry(stack)
        layered = getattr(geometry, "stack", None)
        if not isinstance(layered, Stack):
            raise ValueError(f"geometry {stack!r} has no layered stack to simulate in")
        return layered, geometry, stack
    raise TypeError(f"stack must be a pcshower.physics.Stack or a geometry name, got "
                    f"{type(stack).__name__}")


def _as_array(value, n: int, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one value per shower ({n}), got "
                         f"shape {arr.shape}")
    return arr.copy()


def local_angles(geometry, theta: np.ndarray, phi: np.ndarray):
    """Stack-local ``(theta, phi)`` for global angles, via ``geometry.local_direction`` if any."""
    if geometry is None or not hasattr(geometry, "local_direction"):
        return theta, phi
    t, p = geometry.local_direction(torch.as_tensor(theta), torch.as_tensor(phi))
    to_np = (lambda a: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
    t = np.broadcast_to(to_np(t).astype(np.float64), theta.shape).copy()
    p = np.broadcast_to(to_np(p).astype(np.float64), phi.shape).copy()
    miss = ~np.isfinite(t) | ~np.isfinite(p)
    if miss.any():
        i = int(np.argmax(miss))
        name = getattr(geometry, "name", "the geometry")
        raise ValueError(f"shower {i}: direction theta = {math.degrees(theta[i]):.6g} deg, phi = "
                         f"{math.degrees(phi[i]):.6g} deg misses the calorimeter of {name} "
                         "(global angles; for a barrel, theta = 90 deg is normal incidence)")
    return t, p


def validate_conditions(energy: np.ndarray, theta_local: np.ndarray, phi: np.ndarray,
                        particle) -> int:
    """Check conditions common to every engine; return the PDG code. Raises ``ValueError``."""
    bad = ~np.isfinite(energy) | (energy <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"energy of shower {i} is {energy[i]}: incident energies must be "
                         "positive numbers of GeV")
    if not (np.isfinite(theta_local).all() and np.isfinite(phi).all()):
        raise ValueError("theta and phi must be finite numbers (radians)")
    out = (theta_local < 0) | (theta_local > MAX_THETA_RAD + 1e-12)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"shower {i} would enter the stack at {math.degrees(theta_local[i]):.6g}"
                         " deg to its normal; the angle to the stack normal must be in [0, 89] "
                         "deg (angles are radians in the Python API, degrees on the command line)")
    return particle_code(particle)


def simulate(n: int, energy, theta=0.0, phi=0.0, *, particle="photon", stack="ild",
             frame: str = "physics", seed: int = 0, reduce: bool = True, grid=None,
             engine: str | Engine = "parametrised", progress: bool = False,
             **engine_options) -> Showers:
    """Simulate ``n`` showers and return them as :class:`~pcshower.data.Showers`.

    Args:
        n: number of showers.
        energy: incident energy in GeV, a scalar or ``[n]`` values (1-1000 GeV for the
            parametrised engine).
        theta, phi: direction in **radians**, scalars or ``[n]``. For a :class:`Stack`, theta is
            the angle to the stack normal (0 = normal incidence, below 89 deg) and phi the azimuth
            about it. For a geometry name whose geometry has ``local_direction``, they are the
            global angles (e.g. ILD barrel: theta = pi/2 is normal incidence) and are converted
            to the stack-local ones; the returned conditions are the angles as given.
        particle: name or PDG code (photon, electron, positron for the parametrised engine).
        stack: a :class:`~pcshower.physics.Stack` or a geometry name for
            :func:`pcshower.load_geometry`.
        frame: ``"physics"`` (depth in X0, transverse in R_M, energy fractions of the full
            deposition in the stack's homogeneous equivalent) or ``"detector"`` (visible energy
            in active layers, mm and MeV, stack-local frame with the impact point at the origin).
        seed: the same seed gives identical showers.
        reduce: merge points on a virtual grid (:func:`reduce_points`) with ``grid``.
        grid: grid or preset name for :func:`reduce_points` (default: the frame's default).
        engine: ``"parametrised"``, ``"geant4"`` or an engine callable.
        progress: show a tqdm progress bar.
        **engine_options: passed to the engine (e.g. ``spot_scale``, ``crossing_rms``).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer number of showers, got {n!r}")
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    energy = _as_array(energy, int(n), "energy")
    theta = _as_array(theta, int(n), "theta")
    phi = _as_array(phi, int(n), "phi")
    layered, geometry, name = resolve_stack(stack)
    theta_l, phi_l = local_angles(geometry, theta, phi)
    code = validate_conditions(energy, theta_l, phi_l, particle)
    run = get_engine(engine, **engine_options)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(n), unit="shower", desc="simulate")
    try:
        if engine == "parametrised" or run is simulate_parametrised:
            showers = simulate_parametrised(energy, theta_l, phi_l, code, layered, int(seed), frame,
                                            progress=bar, **engine_options)
        else:
            showers = run(energy, theta_l, phi_l, code, layered, int(seed), frame)
            if bar is not None:
                bar.update(int(n))
    finally:
        if bar is not None:
            bar.close()
    showers = finish(showers, energy, theta, phi, code, name if geometry is not None else None,
                     angles_local=geometry is None or not hasattr(geometry, "local_direction"))
    return reduce_points(showers, grid) if reduce else showers


def finish(showers: Showers, energy, theta, phi, code: int, geometry_name: str | None,
           angles_local: bool) -> Showers:
    """Attach the conditions as given (global angles for geometries) and provenance."""
    if len(showers) != len(energy):
        raise RuntimeError(f"engine returned {len(showers)} showers for {len(energy)} requested")
    meta = dict(showers.metadata)
    meta.setdefault("generator", "pcshower")
    meta["angles"] = "stack-local" if angles_local else f"global ({geometry_name})"
    if geometry_name is not None:
        meta["geometry"] = geometry_name
    return Showers(points=showers.points, ptr=showers.ptr,
                   energy=torch.as_tensor(energy, dtype=torch.float64),
                   theta=torch.as_tensor(theta, dtype=torch.float64),
                   phi=torch.as_tensor(phi, dtype=torch.float64), particle=code,
                   position=showers.position, feature_names=showers.feature_names,
                   frame=showers.frame,
                   geometry=geometry_name if showers.frame == "detector" else None,
                   metadata=meta)
