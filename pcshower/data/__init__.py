"""The data model: ragged point-cloud batches (`Showers`) and per-cell hits (`CellHits`)."""

from pcshower.data.hits import CellHits
from pcshower.data.showers import CONDITION_FIELDS, DEFAULT_FEATURES, Showers

__all__ = ["Showers", "CellHits", "DEFAULT_FEATURES", "CONDITION_FIELDS"]
