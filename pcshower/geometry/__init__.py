"""Geometry adapters: detector readouts described by YAML files, and the projection of showers onto their cells."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pcshower.geometry.frames import direction_vectors, rotation_to_local
from pcshower.geometry.geometry import Geometry, Placement
from pcshower.geometry.schema import GeometryError, parse_geometry

__all__ = ["Geometry", "Placement", "GeometryError", "load_geometry", "list_geometries",
           "builtin_geometry_dir", "direction_vectors", "rotation_to_local"]


def builtin_geometry_dir() -> Path:
    """Folder of the geometry files shipped inside the package (``pcshower/geometries``)."""
    return Path(str(resources.files("pcshower") / "geometries"))


def list_geometries() -> list[str]:
    """Names of the built-in geometries (the stems of ``pcshower/geometries/*.yaml``)."""
    return sorted(p.stem for p in builtin_geometry_dir().glob("*.yaml"))


def load_geometry(name_or_path: str | os.PathLike | Geometry) -> Geometry:
    """A :class:`Geometry` from a built-in name (``"ild"``, ``"cld"``, ``"allegro"``,
    ``"calochallenge_ds2"``, ... see :func:`list_geometries`) or the path of a YAML file.

    Raises :class:`GeometryError` (a ``ValueError``) naming the file, the key and what was
    expected when the file is invalid, and ``ValueError`` listing the built-in names when the
    name is unknown.
    """
    if isinstance(name_or_path, Geometry):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") or os.sep in text or path.is_file():
        if path.is_dir():
            raise ValueError(f"geometry {text} is a directory; name a YAML file (or a built-in "
                             f"geometry: {', '.join(list_geometries())})")
        if not path.is_file():
            raise FileNotFoundError(f"geometry file {text} does not exist")
        return _load_file(str(path.resolve()), path.stat().st_mtime_ns)
    builtin = builtin_geometry_dir() / f"{text.lower()}.yaml"
    if not builtin.is_file():
        raise ValueError(f"unknown geometry {text!r}: use one of {', '.join(list_geometries())} "
                         "or the path of a YAML file")
    return _load_file(str(builtin), builtin.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _load_file(path: str, mtime_ns: int) -> Geometry:
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"geometry file {path} is not a text (YAML) file") from None
    spec = parse_geometry(text, path)
    return Geometry(spec)
