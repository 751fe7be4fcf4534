"""Real Geant4 transport (geant4-pybind) as a pcshower engine, offline: showers in a layered stack.

``simulate_geant4`` returns unreduced :class:`~pcshower.data.Showers`; ``run_geant4`` the raw
per-event record (active points, per-slab deposits in all materials, leakage). Importing this
package does not import Geant4: the data sets are configured first (see ``datasets``), on first use.
"""

from pcshower.simulate.geant4.api import run_geant4, shower_axis_basis, simulate_geant4, to_physics_frame
from pcshower.simulate.geant4.datasets import (APPROXIMATE_LABEL, REAL_DATA_LABEL, configure_geant4_data,
                                               write_approximate_tables)
from pcshower.simulate.geant4.engine import EventRecord

__all__ = ["simulate_geant4", "run_geant4", "to_physics_frame", "shower_axis_basis", "EventRecord",
           "configure_geant4_data", "write_approximate_tables", "APPROXIMATE_LABEL", "REAL_DATA_LABEL"]
