"""Physical constants of materials and layered sampling stacks (below every other layer)."""

from pcshower.physics.materials import MATERIALS, Material, get_material
from pcshower.physics.stack import Slab, Stack

__all__ = ["Material", "MATERIALS", "get_material", "Slab", "Stack"]
