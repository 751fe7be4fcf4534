"""pcshower: calorimeter shower simulation with point-cloud generative models, for any geometry.

Units everywhere: lengths in mm, deposited energies in MeV, incident energies in GeV, angles in
radians inside the library (degrees where an API or the CLI says so). See ``pcshower.units``.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pcshower")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

from pcshower.data import CellHits, Showers

# Heavier entry points are imported on first use so that `import pcshower` stays fast.
# (The simulator is the subpackage `pcshower.simulate`; its function is `pcshower.simulate.simulate`.)
_LAZY = {
    "load_geometry": "pcshower.geometry",
    "generate": "pcshower.models.generate",
    "tune_allocator": "pcshower.allocator",
}

#: Subpackages reachable as attributes after a plain `import pcshower` (imported on first use).
_SUBPACKAGES = ("io", "physics", "simulate", "geometry", "models", "nn", "evaluate", "units")

__all__ = ["Showers", "CellHits", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return import_module(f"pcshower.{name}")
    raise AttributeError(f"module 'pcshower' has no attribute {name!r}")
