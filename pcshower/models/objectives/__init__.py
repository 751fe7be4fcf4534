"""Training objectives of the point network, each a loss and its matching sampler over any
backbone: a raw network callable ``net(x_in [P, D], t [B]) -> [P, D]`` on the flat ragged batch
(``batch [P]`` gives each point's shower), which sees the time feature ``t`` among its
conditions.

- :class:`EDM` (``edm.py``): denoising diffusion with EDM preconditioning; Heun/Euler samplers.
- :class:`FlowMatching` (``flow_matching.py``): conditional flow matching on straight paths;
  Euler/midpoint/Heun ODE samplers.
- :class:`Consistency` (``consistency.py``): consistency distillation from an EDM teacher, or
  consistency training; one network call per sampler step.

A new objective is a frozen dataclass with ``name``, ``samplers``, ``loss``, ``sample`` and
``network_calls`` registered in :data:`OBJECTIVES`; a model config selects it with
``objective:`` and sets its hyper-parameters in the section of the same name.
"""

from pcshower.models.objectives.consistency import Consistency
from pcshower.models.objectives.edm import EDM
from pcshower.models.objectives.flow_matching import FlowMatching

__all__ = ["EDM", "FlowMatching", "Consistency", "OBJECTIVES", "build_objective"]

OBJECTIVES = {"edm": EDM, "flow_matching": FlowMatching, "consistency": Consistency}


def build_objective(config: dict):
    """The objective a model config names (``objective``), with its section's settings; a
    consistency model takes its noise range and schedule from the ``edm`` section (those of
    its teacher)."""
    name = config.get("objective", "edm")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    if name == "edm":
        return EDM(**config["edm"])
    if name == "flow_matching":
        return FlowMatching(**config["flow_matching"])
    edm = config["edm"]
    return Consistency(sigma_data=edm["sigma_data"], sigma_min=edm["sigma_min"],
                       sigma_max=edm["sigma_max"], rho=edm["rho"], **config["consistency"])
