"""pcshower: calorimeter shower simulation with point-cloud generative models, for any geometry."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pcshower")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

from pcshower.data import CellHits, Showers

__all__ = ["Showers", "CellHits", "__version__"]
