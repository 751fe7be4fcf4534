"""The one place where pcshower's units, frames and particle names are fixed.

Lengths are in mm, deposited energies in MeV, incident energies in GeV and angles in radians
inside the library. The public API accepts degrees where it says so (``pcshower.generate``, the
CLI) and converts at the edge with :func:`deg_to_rad`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LENGTH_UNIT",
    "DEPOSIT_UNIT",
    "INCIDENT_ENERGY_UNIT",
    "ANGLE_UNIT",
    "FRAMES",
    "BOTH_FRAMES",
    "PHYSICS_FRAME",
    "DETECTOR_FRAME",
    "PHYSICS_FRAME_UNITS",
    "DETECTOR_FRAME_UNITS",
    "PARTICLES",
    "particle_code",
    "particle_name",
    "deg_to_rad",
    "rad_to_deg",
    "GEV_TO_MEV",
    "parse_range",
    "resolve_device",
]

LENGTH_UNIT = "mm"
DEPOSIT_UNIT = "MeV"
INCIDENT_ENERGY_UNIT = "GeV"
ANGLE_UNIT = "rad"
GEV_TO_MEV = 1000.0

PHYSICS_FRAME = "physics"
DETECTOR_FRAME = "detector"
FRAMES = (PHYSICS_FRAME, DETECTOR_FRAME)
#: Productions and engines may record one simulation in both frames at once.
BOTH_FRAMES = "both"

# Units of the x, y, z, e point features in each frame (written into every file's metadata).
PHYSICS_FRAME_UNITS = {"x": "R_M", "y": "R_M", "z": "X0", "e": "fraction of incident energy"}
DETECTOR_FRAME_UNITS = {"x": "mm", "y": "mm", "z": "mm", "e": "MeV"}

# PDG Monte Carlo particle numbers of the particles a user names.
PARTICLES = {
    "photon": 22,
    "gamma": 22,
    "electron": 11,
    "e-": 11,
    "positron": -11,
    "e+": -11,
    "pi+": 211,
    "pion": 211,
    "pi-": -211,
    "pi0": 111,
    "muon": 13,
    "mu-": 13,
    "mu+": -13,
    "neutron": 2112,
    "proton": 2212,
}
_CANONICAL = {22: "photon", 11: "electron", -11: "positron", 211: "pi+", -211: "pi-",
              111: "pi0", 13: "mu-", -13: "mu+", 2112: "neutron", 2212: "proton"}


def particle_code(particle: str | int) -> int:
    """PDG code for a particle name (``"photon"``, ``"e-"``, ``"pi+"``…) or an integer code."""
    if isinstance(particle, (int, np.integer)) and not isinstance(particle, bool):
        return int(particle)
    key = str(particle).strip().lower()
    if key in PARTICLES:
        return PARTICLES[key]
    try:
        return int(key)
    except ValueError:
        known = ", ".join(sorted(set(PARTICLES)))
        raise ValueError(f"unknown particle {particle!r}: use a PDG code or one of {known}") from None


def particle_name(code: int) -> str:
    """Readable name of a PDG code (the code itself as text when it has no name here)."""
    return _CANONICAL.get(int(code), str(int(code)))


def deg_to_rad(angle_deg):
    """Degrees (the API edge) to radians (the library inside); works on scalars and arrays."""
    return np.asarray(angle_deg, dtype=np.float64) * (math.pi / 180.0)


def rad_to_deg(angle_rad):
    return np.asarray(angle_rad, dtype=np.float64) * (180.0 / math.pi)


def parse_range(text, name: str) -> tuple[float, float]:
    """``"10:100"`` -> (10, 100); ``"50"`` -> (50, 50). Raises a ``ValueError`` naming ``name``."""
    if isinstance(text, (int, float)):
        lo = hi = float(text)
    elif isinstance(text, (tuple, list)) and len(text) == 2:
        lo, hi = float(text[0]), float(text[1])
    else:
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                lo = hi = float(parts[0])
            elif len(parts) == 2:
                lo, hi = float(parts[0]), float(parts[1])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{name} must be a number or a range LOW:HIGH, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} range {lo}:{hi} must be finite numbers")
    if lo > hi:
        raise ValueError(f"{name} range {lo:g}:{hi:g} is empty: LOW must not exceed HIGH")
    return lo, hi


def resolve_device(device=None):
    """The ``torch.device`` to run on: ``device`` if this PyTorch can use it, else a clear error.

    ``None`` means CUDA when available, else the CPU. A CUDA device asked for on a PyTorch
    without CUDA (or past the last GPU) raises ``ValueError`` naming what is available, instead of
    PyTorch's assertion deep inside the first tensor operation.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this PyTorch ({torch.__version__}) cannot use CUDA "
                             "(a CPU build, or no GPU visible); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    return dev
