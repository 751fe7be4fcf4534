"""Kept for imports written before the objectives moved: :class:`EDM` lives in
:mod:`pcshower.models.objectives.edm`."""

from pcshower.models.objectives.edm import EDM

__all__ = ["EDM"]
