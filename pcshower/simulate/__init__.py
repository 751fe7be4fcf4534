"""Reference shower simulation: the parametrised GFlash engine, point reduction and production.

``simulate(n, energy, theta, phi, particle=..., stack=..., frame=...)`` makes showers in memory;
``reduce_points`` merges their points on a virtual grid; ``produce`` (and ``pcshower simulate``)
writes large sharded Parquet data sets. Engines are plain callables (see :mod:`.api`).
"""

from pcshower.simulate.api import ENGINE_NAMES, get_engine, resolve_stack, simulate
from pcshower.simulate.parametrised import simulate_parametrised
from pcshower.simulate.reduce import GRID_PRESETS, PolarGrid, reduce_points

__all__ = ["simulate", "reduce_points", "simulate_parametrised", "get_engine", "resolve_stack",
           "GRID_PRESETS", "PolarGrid", "ENGINE_NAMES", "produce"]


def __getattr__(name):
    if name == "produce":  # the production loop pulls in pyarrow and multiprocessing
        from pcshower.simulate.production import produce
        return produce
    raise AttributeError(f"module 'pcshower.simulate' has no attribute {name!r}")

