"""The fast-simulation hook of pcshower's Geant4 engine: EM particles entering the stack become model showers.

What Key4hep's DDFastShowerML does per shower inside DD4hep/Geant4 (trigger, model input,
inference, local-to-global placement, hits; docs/integration.md), done here for a whole batch of
particles in Python:

1. **Trigger.** A 1 mm vacuum layer (:data:`ENTRANCE_MM`) sits in front of the stack's front face.
   Its steps are scored by a Python primitive scorer behind Geant4's C++
   ``G4SDParticleWithEnergyFilter`` (photons, electrons, positrons with a kinetic energy in the
   hook's window), so Python runs only for those few crossings, not per step of the event (the
   wheel binds ``G4UserSteppingAction`` but not ``G4VFastSimulationModel``; a stepping action
   would call Python on every step of every shower). A crossing whose post-step point lies on
   the front face (``fGeomBoundary``, moving inwards) and whose direction is in the model's
   angular range is *stopped*: its entry point, direction and kinetic energy are kept and the
   track is killed there (``fStopAndKill``), before it has deposited anything (vacuum).
2. **Inference, batched.** At the end of the event in which the number of stopped particles
   reaches ``batch_size`` (and at the end of the run) all of them are generated in one call of
   :func:`pcshower.generate` per particle species, conditioned on their energy and local angles
   and placed at their entry points on a *flat twin* of the stack (:func:`twin_geometry`: the same
   slabs and name, a plane facing +z at z = 0, so the geometry's local frame is the engine's
   frame and the stack's shipped Geant4 tune of the sampling response applies as it does for
   the named geometry).
3. **Hits.** The generated detector-frame points (visible MeV, mm about the entry point, depth
   from the front face) are moved to the entry point and appended to their event's Geant4
   points: the engine's output path (Showers, reduction, Parquet) takes them as any other hits.

Energy bookkeeping (:class:`FastSimRecord`): the energy the hook takes out of Geant4 is the
stopped particles' kinetic energy, plus 2 m_e c² for a positron (its annihilation, as the
engine's leakage counts it), so Geant4's deposits in the stack and the upstream slab, its
leakage and the stopped energy add up to the primary energy exactly. What the model makes of a
stopped particle is its visible energy (``visible_mev``) and what fell outside the stack
(``outside_mev``, deposited energy, from ``hits.outside_energy``); the visible energy over the
sampling fraction of its layer (:func:`pcshower.physics.sampling.sampling_layers` times the
stack's tune, :func:`pcshower.simulate.tuning.sampling_scale`) is the model's deposit.

Particles outside the model's training range (energy, angle, species) are left to Geant4 unless
``extrapolate`` is set: energies inside the model's training range, angles inside what
``pcshower.generate`` accepts for it (its training range plus generate's tolerance of 2 % of the
range's width), species among those it was trained on.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from pcshower.io.digest import file_sha256
from pcshower.physics.stack import Stack
from pcshower.simulate.geant4.datasets import ELECTRON_MASS_MEV
from pcshower.units import particle_code, particle_name

__all__ = ["FastSim", "FastSimHook", "FastSimRecord", "Upstream", "twin_geometry", "plan_hook",
           "check_upstream_material",
           "DEFAULT_THRESHOLD_GEV", "DEFAULT_BATCH_SIZE", "ENTRANCE_MM", "HOOK_PARTICLES"]

#: Default kinetic-energy threshold (GeV) above which the hook takes a particle over (set it with
#: ``--fastsim-threshold``); the window also ends where the model's training range does.
DEFAULT_THRESHOLD_GEV = 1.0
#: Stopped particles that trigger a generation pass (at the end of the event that reaches it).
DEFAULT_BATCH_SIZE = 256
#: Thickness (mm) of the vacuum layer in front of the stack in which crossings are watched.
ENTRANCE_MM = 1.0
#: The particles a hook may stop (PDG codes).
HOOK_PARTICLES = (22, 11, -11)
#: Thickest upstream slab accepted (X0): more is a pre-shower detector, not upstream material.
MAX_UPSTREAM_X0 = 1.0
_POSITRON = -11
#: Angles probed for the model's accepted range (degrees to the face normal).
_PROBE_DEG = np.arange(0.0, 89.75, 0.25)


# ---------------------------------------------------------------------------------- upstream slab
@dataclass(frozen=True)
class Upstream:
    """A slab of ``thickness_x0`` radiation lengths of ``material`` in front of the stack.

    ``material``: a pcshower material name (Si, W, ..., :func:`pcshower.physics.get_material`) or
    a Geant4 NIST name (``G4_Al``, ``G4_C``, ``G4_KAPTON``; ``Al`` and ``C`` mean those). The
    thickness in mm is ``thickness_x0`` times Geant4's own radiation length of the material
    (``G4Material::GetRadlen``), so it is exact for what Geant4 transports. The slab has the
    stack's transverse size and its back face is :data:`ENTRANCE_MM` in front of the stack's
    front face (the vacuum gap the hook watches; the same gap without the hook, so that the two
    ways see the same material); the primaries start just in front of it.
    """

    material: str
    thickness_x0: float

    def __post_init__(self):
        x0 = self.thickness_x0
        if isinstance(x0, bool) or not isinstance(x0, (int, float, np.floating, np.integer)) \
                or not math.isfinite(x0) or not 0 < x0 <= MAX_UPSTREAM_X0:
            raise ValueError(f"upstream thickness must be a number of radiation lengths in (0, "
                             f"{MAX_UPSTREAM_X0:g}] (a tracker is 0.1-0.3 X0), got {x0!r}")
        object.__setattr__(self, "thickness_x0", float(x0))
        if not isinstance(self.material, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.material):
            raise ValueError(f"upstream material must be a material name such as Si, G4_Al or "
                             f"G4_C, got {self.material!r}")

    @classmethod
    def parse(cls, spec) -> "Upstream | None":
        """``None``, an :class:`Upstream`, or the text ``MATERIAL:X0`` (``"Si:0.2"``)."""
        if spec is None or isinstance(spec, Upstream):
            return spec
        text = str(spec)
        material, sep, x0 = text.rpartition(":")
        try:
            value = float(x0)
        except ValueError:
            value = None
        if not sep or not material.strip() or value is None:
            raise ValueError(f"upstream {text!r}: write MATERIAL:X0, e.g. Si:0.2 (0.2 radiation "
                             "lengths of silicon) or G4_Al:0.15")
        return cls(material.strip(), value)

    @property
    def g4_name(self) -> str:
        from pcshower.physics.materials import get_material

        try:
            return get_material(self.material).g4_name
        except ValueError:
            name = self.material
            return name if name.upper().startswith("G4_") else f"G4_{name}"

    def __str__(self) -> str:
        return f"{self.material}:{self.thickness_x0:g}"


def check_upstream_material(upstream: Upstream) -> float:
    """The slab's thickness in mm, or a clear error if Geant4 has no such NIST material (imports
    Geant4, which only reads its data configuration: no run manager is made)."""
    from pcshower.simulate.geant4.datasets import configure_geant4_data

    configure_geant4_data()
    import geant4_pybind as g4  # noqa: PLC0415  (after the data variables are set)

    return upstream_material(upstream, g4.G4NistManager.Instance(), g4)[1]


def upstream_material(upstream: Upstream, nist, g4):
    """``(G4Material, thickness_mm)`` of an upstream slab (called while Geant4 builds the world)."""
    mat = nist.FindOrBuildMaterial(upstream.g4_name)
    if mat is None:
        raise ValueError(f"upstream material {upstream.material!r}: Geant4 has no NIST material "
                         f"{upstream.g4_name!r} (try Si, G4_Al, G4_C, G4_KAPTON)")
    return mat, upstream.thickness_x0 * mat.GetRadlen() / g4.mm


# ---------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class FastSim:
    """What the hook uses: the model and which particles it takes over.

    Args:
        model: a checkpoint path, or ``"default"`` for the model shipped with pcshower.
        threshold_gev: kinetic energy (GeV, >= 0) above which photons and electrons entering the
            stack are stopped (default :data:`DEFAULT_THRESHOLD_GEV`); the model's training range
            narrows the window unless ``extrapolate``.
        particles: names or PDG codes among photon, electron, positron; default: those the model
            was trained on (the shipped model: photons only; electrons and positrons entering the
            stack, e.g. from conversions upstream, then stay with Geant4).
        steps: sampler steps (default: the model's).
        batch_size: stopped particles per generation pass (a pass runs at the end of the event
            that reaches it, and at the end of the run).
        extrapolate: also stop particles outside the model's training range (energy, angle,
            species) and generate them with ``allow_extrapolation``.
        device: torch device of the model (``"cpu"``: Geant4 runs there anyway).
        threads: torch threads of the generation passes (restored after each), default 1: a
            Geant4 job is one serial process per core, and torch's intra-op threads on cores
            that are busy run one batch-1 shower ~30-100x slower (measured on this project's
            2-core machine with two other jobs running: 0.1-0.4 s -> 10-15 s per shower).
    """

    model: str = "default"
    threshold_gev: float = DEFAULT_THRESHOLD_GEV
    particles: tuple | None = None
    steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    extrapolate: bool = False
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"fastsim model must be a checkpoint path or 'default', got "
                             f"{self.model!r}")
        t = self.threshold_gev
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) \
                or not math.isfinite(t) or t < 0:
            raise ValueError(f"fastsim threshold must be a non-negative number of GeV, got {t!r}")
        object.__setattr__(self, "threshold_gev", float(t))
        if self.particles is not None:
            names = self.particles.split(",") if isinstance(self.particles, str) else self.particles
            codes = []
            for p in names:
                code = particle_code(p.strip() if isinstance(p, str) else p)
                if code not in HOOK_PARTICLES:
                    raise ValueError(f"the fastsim hook stops photons, electrons and positrons; "
                                     f"got {particle_name(code)}")
                codes.append(code)
            if not codes:
                raise ValueError("fastsim particles: name at least one of photon, electron, positron")
            object.__setattr__(self, "particles", tuple(sorted(set(codes))))
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size),
                            ("threads", self.threads)):
            if value is None and name == "steps":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"fastsim {name} must be a whole number >= 1, got {value!r}")
        object.__setattr__(self, "extrapolate", bool(self.extrapolate))

    @classmethod
    def from_options(cls, model, threshold_gev=None, particles=None, steps=None,
                     batch_size=None, extrapolate=False, device="cpu") -> "FastSim":
        """The configuration from engine options (``None`` values take the defaults)."""
        return cls(model=model if model is not None else "default",
                   threshold_gev=DEFAULT_THRESHOLD_GEV if threshold_gev is None else threshold_gev,
                   particles=particles, steps=steps,
                   batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                   extrapolate=extrapolate, device=device)

    def model_path(self):
        """The checkpoint file (``Path``); a clear error if it does not exist."""
        from pathlib import Path

        if self.model == "default":
            # lazy: the simulator sits below the models in pcshower's layers (models train on
            # its showers, and pcshower.models.production imports pcshower.simulate), so a
            # module-level import would make the engine depend on the model package and cycle
            from pcshower.models.generate import default_model_path

            path = default_model_path()
            if not path.is_file():
                raise FileNotFoundError(f"the default model {path} is missing from this "
                                        "installation; give --fastsim a checkpoint path")
            return path
        path = Path(self.model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"fastsim model {self.model!r} does not exist: give a "
                                    "checkpoint file (pcshower train writes one) or 'default' "
                                    "for the shipped model")
        return path.resolve()


def twin_geometry(stack: Stack, transverse_mm=1000.0):
    """A geometry made of ``stack``'s slabs (same name, so its shipped tune applies) read out on
    one plane facing +z at z = 0 with the engine's transverse size: its local frame is the
    engine's frame, so showers placed on it land where Geant4 would have put them. Each readout
    layer is an active slab and the passive slabs in front of it (its sampling cell); passive
    slabs behind the last active one are unread material. The 10 mm cells only decide what lies
    on the readout (all of the slabs' area): the hook keeps the points, not the cells."""
    import yaml

    from pcshower.geometry import Geometry
    from pcshower.geometry.schema import parse_geometry

    tx, ty = (transverse_mm, transverse_mm) if np.isscalar(transverse_mm) else transverse_mm
    groups, cell = [], []
    for slab in stack.slabs:
        cell.append({"material": slab.material.name, "thickness_mm": float(slab.thickness_mm),
                     "active": bool(slab.active)})
        if slab.active:
            groups.append({"slabs": cell})
            cell = []
    if cell:
        groups.append({"slabs": cell, "readout": False})
    doc = {"name": stack.name, "title": f"flat twin of {stack.name} for the fastsim hook",
           "source": "pcshower.simulate.geant4.fastsim.twin_geometry: the Geant4 engine's stack",
           "stack": groups, "readout": {"kind": "planar", "cell_size_mm": 10.0},
           "placement": {"plane": {"distance_mm": 0.0,
                                   "half_width_mm": [0.5 * float(tx), 0.5 * float(ty)]}}}
    return Geometry(parse_geometry(yaml.safe_dump(doc), f"<fastsim twin of {stack.name}>"))


@dataclass
class _Plan:
    """What a configuration resolves to for one stack: model, twin geometry, acceptance."""

    net: object
    path: str
    sha256: str
    twin: object
    particles: tuple
    energy_mev: tuple  # [low, high) kinetic-energy window
    theta_rad: tuple  # [low, high] angle to the face normal


def plan_hook(config: FastSim, stack: Stack, transverse_mm=1000.0) -> _Plan:
    """What ``config`` resolves to for ``stack``: the loaded model, its digest, the twin
    geometry and the particles, energies and angles the hook stops (cached; errors for a model
    that is missing, unreadable or trained on none of the particles asked for)."""
    tx, ty = (transverse_mm, transverse_mm) if np.isscalar(transverse_mm) else transverse_mm
    return _plan(config, stack, (float(tx), float(ty)))


@functools.lru_cache(maxsize=8)
def _plan(config: FastSim, stack: Stack, transverse: tuple) -> _Plan:
    from pcshower.models.generate import generate_batches, resolve_model  # lazy: see model_path

    path = config.model_path()
    try:
        net = resolve_model(str(path), config.device)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001  (torch/pickle errors of a file that is no checkpoint)
        raise ValueError(f"fastsim model {config.model!r} cannot be loaded as a pcshower "
                         f"checkpoint ({type(err).__name__}: {err})") from None
    info = getattr(net, "checkpoint_info", None) or {}
    # the checkpoint's own content digest (what pcshower.generate records), else the file's
    sha = info.get("sha256") or file_sha256(path)
    trained = tuple(int(p) for p in (info.get("provenance", {}) or {}).get("particles") or ())
    if config.particles is None:
        particles = tuple(p for p in HOOK_PARTICLES if p in trained) if trained else HOOK_PARTICLES
        if not particles:
            raise ValueError(f"fastsim model {config.model!r} was trained on "
                             f"{', '.join(particle_name(p) for p in trained)}: none of them is a "
                             "photon or electron the hook could hand to it")
    else:
        particles = config.particles
        missing = [p for p in particles if trained and p not in trained]
        if missing and not config.extrapolate:
            raise ValueError(f"fastsim model {config.model!r} was trained on "
                             f"{', '.join(particle_name(p) for p in trained)} only, not "
                             f"{', '.join(particle_name(p) for p in missing)}; drop them from the "
                             "fastsim particles or allow extrapolation")
    twin = twin_geometry(stack, transverse)
    low = config.threshold_gev * 1000.0
    if config.extrapolate:
        return _Plan(net, str(path), sha, twin, particles, (low, math.inf), (0.0, 0.5 * math.pi))
    # the energies and angles the model accepts on the twin, found by asking generate itself:
    # its argument checks run before any sampling, and it knows the model's angle convention
    # and range tolerance
    probe = particles[0]

    def accepts(energy_gev: float, deg: float) -> bool:
        try:
            generate_batches(energy_gev, deg, twin, model=net, particle=probe, seed=0,
                             device=config.device)
        except ValueError:
            return False
        return True

    e_lo, e_hi = (float(v) for v in net.energy_range)
    ok = np.array([accepts(0.5 * (e_lo + e_hi), float(deg)) for deg in _PROBE_DEG])
    if not ok.any():
        raise ValueError(f"fastsim model {config.model!r} accepts no direction into the stack "
                         f"{stack.name!r}")
    first = int(np.argmax(ok))
    last = first + (int(np.argmin(ok[first:])) - 1 if not ok[first:].all() else len(ok[first:]) - 1)
    theta = (math.radians(_PROBE_DEG[first]), math.radians(_PROBE_DEG[last]))
    mid_deg = float(_PROBE_DEG[(first + last) // 2])

    if not (accepts(e_lo, mid_deg) and accepts(e_hi, mid_deg)):
        raise ValueError(f"fastsim model {config.model!r} refuses the ends of its own energy "
                         f"range [{e_lo:g}, {e_hi:g}] GeV on {stack.name!r}")
    # energies: the training range itself (generate would also take 2 % of its width beyond)
    return _Plan(net, str(path), sha, twin, particles, (max(low, 1000.0 * e_lo), 1000.0 * e_hi),
                 theta)


# ---------------------------------------------------------------------------------- the record
@dataclass
class FastSimRecord:
    """What the hook did in a run of ``B`` events (numpy; MeV, mm).

    Per stopped particle ``[K]``: ``event``, ``pdg``, ``energy_mev`` (kinetic), ``position_mm``
    ``[K, 3]`` (entry point on the front face), ``direction`` ``[K, 3]``, ``visible_mev`` (the
    generated shower's visible energy in the stack) and ``outside_mev`` (its deposits that fell
    outside the stack, ``hits.outside_energy``). Per event ``[B]``: ``stopped_mev`` (energy taken
    out of Geant4: kinetic + 2 m_e c² per positron), ``visible_mev`` and ``num_stopped``.
    ``point_mask`` ``[P]`` flags the record's points made by the model; ``seconds``: wall time
    spent generating; ``model``/``model_sha256``: the checkpoint.
    """

    event: np.ndarray
    pdg: np.ndarray
    energy_mev: np.ndarray
    position_mm: np.ndarray
    direction: np.ndarray
    visible_mev: np.ndarray
    outside_mev: np.ndarray
    event_stopped_mev: np.ndarray
    event_visible_mev: np.ndarray
    num_stopped: np.ndarray
    seconds: float
    model: str
    model_sha256: str
    config: dict
    point_mask: np.ndarray | None = None
    points_per_event: list | None = field(default=None, repr=False)

    @property
    def stopped_mev(self) -> np.ndarray:
        """[B] energy the hook took out of Geant4 (kinetic, + 2 m_e c² per positron)."""
        return self.event_stopped_mev


# ---------------------------------------------------------------------------------- the hook
@functools.lru_cache(maxsize=1)
def _scorer_class(g4):
    class EntranceScorer(g4.G4VPrimitiveScorer):
        """Stops the filtered crossings of the entrance layer that end on the stack's front face.

        Behind a ``G4SDParticleWithEnergyFilter``: Python runs only for photons and electrons
        in the hook's energy window crossing the 1 mm vacuum layer.
        """

        def __init__(self, name, engine):
            super().__init__(name, 0)
            self.engine = engine

        def ProcessHits(self, step, history):
            post = step.GetPostStepPoint()
            if post.GetStepStatus() != g4.G4StepStatus.fGeomBoundary:
                return False
            pos = post.GetPosition()
            if pos.z < -1e-6:  # left the layer through its front or sides
                return False
            d = post.GetMomentumDirection()
            track = step.GetTrack()
            if not self.engine.hook.consider(track.GetDefinition().GetPDGEncoding(),
                                             post.GetKineticEnergy(), pos, d):
                return False
            track.SetTrackStatus(g4.G4TrackStatus.fStopAndKill)
            return True

    return EntranceScorer


class FastSimHook:
    """One hook for the engine: stops, batches, generates. Build it with a :class:`FastSim`
    configuration, the stack and the engine's transverse size, then pass it to
    :meth:`Geant4Engine.run(..., fastsim=hook) <pcshower.simulate.geant4.engine.Geant4Engine.run>`."""

    def __init__(self, config: FastSim, stack: Stack, transverse_mm=1000.0):
        if not isinstance(config, FastSim):
            raise TypeError(f"config must be a FastSim, got {type(config).__name__}")
        tx, ty = (transverse_mm, transverse_mm) if np.isscalar(transverse_mm) else transverse_mm
        self.config = config
        self.stack = stack
        self.plan = plan_hook(config, stack, (float(tx), float(ty)))
        self._pending: list = []

    @property
    def geometry_key(self) -> tuple:
        """What the entrance layer's C++ filter depends on (a change rebuilds the geometry)."""
        return (self.plan.particles, self.plan.energy_mev)

    def describe(self) -> dict:
        """Provenance of the hook for a file's metadata."""
        p = self.plan
        high = p.energy_mev[1] / 1000.0 if math.isfinite(p.energy_mev[1]) else None
        return {"fastsim": "part of the hits were generated by a pcshower model: photons/"
                           "electrons entering the stack in the hook's window were stopped at "
                           "its front face and their showers generated (docs/integration.md)",
                "fastsim_model": p.path, "fastsim_model_sha256": p.sha256,
                "fastsim_model_file_sha256": file_sha256(p.path),
                "fastsim_threshold_gev": self.config.threshold_gev,
                "fastsim_particles": [particle_name(c) for c in p.particles],
                "fastsim_energy_window_gev": [p.energy_mev[0] / 1000.0, high],
                "fastsim_theta_window_deg": [math.degrees(t) for t in p.theta_rad],
                "fastsim_steps": int(self.config.steps or p.net.config["steps"]),
                "fastsim_batch_size": self.config.batch_size,
                "fastsim_extrapolate": self.config.extrapolate,
                "fastsim_threads": self.config.threads}

    # -- Geant4 side
    def attach(self, engine, lv, sdm, version: int) -> list:
        """Make ``lv`` (the entrance layer) watch crossings; returns what Geant4 needs alive."""
        g4 = engine.g4
        mfd = g4.G4MultiFunctionalDetector(f"pcsFastSim{version}")
        scorer = _scorer_class(g4)("entrance", engine)
        low, high = self.plan.energy_mev
        filt = g4.G4SDParticleWithEnergyFilter(f"pcsFastSimFilter{version}", low * g4.MeV,
                                               high * g4.MeV if math.isfinite(high) else 1e300)
        for code in self.plan.particles:
            filt.add({22: "gamma", 11: "e-", -11: "e+"}[code])
        scorer.SetFilter(filt)
        mfd.RegisterPrimitive(scorer)
        sdm.AddNewDetector(mfd)
        lv.SetSensitiveDetector(mfd)
        return [mfd, scorer, filt]

    def begin_run(self, seed: int, centre_mm=(0.0, 0.0)) -> None:
        """Start a run: ``centre_mm`` is where the engine centred its slabs in x, y (on the mean
        shower axis at mid-depth); the twin's face is centred there too, so a generated point is
        kept exactly where the slabs are."""
        self._seed = int(seed)
        self._centre = (float(centre_mm[0]), float(centre_mm[1]))
        self._passes = 0
        self._pending = []
        self._stopped: list = []  # rows: event, pdg, T, x, y, z, dx, dy, dz, visible, outside
        self._points: dict = {}
        self._seconds = 0.0
        self._event = -1

    def begin_event(self, index: int) -> None:
        self._event = index

    def consider(self, pdg: int, kinetic_mev: float, pos, d) -> bool:
        """Whether to stop a particle crossing onto the front face (and keep it if so)."""
        if d.z <= 0.0:
            return False
        theta = math.acos(min(1.0, d.z))
        lo, hi = self.plan.theta_rad
        e_lo, e_hi = self.plan.energy_mev
        if not (lo - 1e-9 <= theta <= hi + 1e-9 and e_lo <= kinetic_mev < e_hi):
            return False
        self._pending.append((self._event, pdg, kinetic_mev, pos.x, pos.y, pos.z, d.x, d.y, d.z))
        return True

    def end_event(self) -> None:
        if len(self._pending) >= self.config.batch_size:
            self.flush()

    # -- model side
    def flush(self) -> None:
        """Generate the showers of every pending stopped particle (one pass per species)."""
        if not self._pending:
            return
        import torch

        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            self._generate()
        finally:
            torch.set_num_threads(threads)
            self._seconds += time.perf_counter() - t0

    def _generate(self) -> None:
        from pcshower.models.generate import generate  # lazy: see FastSim.model_path

        rows = np.asarray(self._pending, dtype=np.float64)
        self._pending = []
        # one seed per pass, from (run seed, pass): the same run gives the same showers
        state = np.random.SeedSequence([self._seed & 0xFFFFFFFF, 0xFA57, self._passes])
        state = state.generate_state(2, np.uint32)
        self._passes += 1
        out = np.zeros((len(rows), 2))
        for code in (int(c) for c in np.unique(rows[:, 1])):
            sel = np.nonzero(rows[:, 1] == code)[0]
            r = rows[sel]
            theta = np.degrees(np.arccos(np.clip(r[:, 8], -1.0, 1.0)))
            phi = np.degrees(np.arctan2(r[:, 7], r[:, 6]))
            # the twin's face is centred on the origin, the engine's slabs on self._centre: the
            # impact point in the twin's frame (the points come back about the entry point)
            position = np.c_[r[:, 3] - self._centre[0], r[:, 4] - self._centre[1], np.zeros(len(r))]
            seed = (int(state[0]) << 32 | int(state[1])) ^ (abs(code) << 1 | (code < 0))
            showers = generate(r[:, 2] / 1000.0, theta, self.plan.twin, phi=phi, position=position,
                               particle=int(code), steps=self.config.steps, seed=seed,
                               device=self.config.device, model=self.plan.net,
                               batch_size=self.config.batch_size,
                               allow_extrapolation=self.config.extrapolate)
            pts = showers.points[:, :4].detach().cpu().double().numpy()
            ptr = showers.ptr.cpu().numpy()
            outside = showers.hits.outside_energy.detach().cpu().double().numpy()
            for j, i in enumerate(sel):
                p = pts[ptr[j]:ptr[j + 1]].copy()
                p[:, 0] += r[j, 3]  # offset about the entry point -> the engine's frame
                p[:, 1] += r[j, 4]
                self._points.setdefault(int(r[j, 0]), []).append(p)
                out[i] = (p[:, 3].sum(), outside[j])
        self._stopped.append(np.c_[rows, out])

    def end_run(self, n_events: int) -> FastSimRecord:
        """Generate what is pending and return the run's :class:`FastSimRecord` (its
        ``points_per_event`` are merged into the event record by the engine)."""
        self.flush()
        table = np.concatenate(self._stopped) if self._stopped else np.zeros((0, 11))
        event = table[:, 0].astype(np.int64)
        pdg = table[:, 1].astype(np.int64)
        removed = table[:, 2] + np.where(pdg == _POSITRON, 2.0 * ELECTRON_MASS_MEV, 0.0)
        empty = np.zeros((0, 4))
        points = [np.concatenate(self._points[i]) if i in self._points else empty
                  for i in range(n_events)]
        return FastSimRecord(
            event=event, pdg=pdg, energy_mev=table[:, 2], position_mm=table[:, 3:6],
            direction=table[:, 6:9], visible_mev=table[:, 9], outside_mev=table[:, 10],
            event_stopped_mev=np.bincount(event, weights=removed, minlength=n_events),
            event_visible_mev=np.bincount(event, weights=table[:, 9], minlength=n_events),
            num_stopped=np.bincount(event, minlength=n_events), seconds=self._seconds,
            model=self.plan.path, model_sha256=self.plan.sha256, config=self.describe(),
            points_per_event=points)
