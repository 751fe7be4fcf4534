"""The Geant4 application behind pcshower's ``geant4`` engine: a layered stack, a gun, cheap recording.

One :class:`Geant4Engine` per process (Geant4 allows one run manager per process). Geometry:
a vacuum world holding a vacuum envelope holding the slabs of a :class:`~pcshower.physics.Stack`
as boxes along +z, the front face at z = 0 and the impact point at the origin, so Geant4's global
coordinates ARE the stack-local detector frame (mm). Physics: ``G4EmStandardPhysics_option1``
(the EM list of ATLAS/CMS-style production) with the default 0.7 mm production cut.

Recording, chosen to keep Python off the hot path while every deposit keeps its own position:

- active slabs: a ``G4MultiFunctionalDetector`` with two Python primitive scorers behind C++
  filters. Charged steps (``G4SDChargedFilter``) give points along the step (their deposit is
  continuous along it; see ``SEGMENT_MM`` below); photon steps (``G4SDNeutralFilter``) give a point at the
  post-step position, where the interaction happened, when they deposit anything (the local
  deposits of below-cut Compton and photo-electrons: ``G4EmStandardPhysics_option1`` applies the
  production cuts to photon secondaries). Python runs only for steps in active material;
- passive slabs: a C++ ``G4MultiFunctionalDetector`` with a ``G4PSEnergyDeposit`` scorer keyed
  by copy number (= slab index) sums deposits with no Python call per step;
- leakage: the world volume (outside the envelope) is sensitive; a track entering it is killed
  and its kinetic energy (plus 2 m_e c² for a positron, whose annihilation energy leaves with it)
  is counted as leakage. Energy conservation then reads Σ deposits + leakage = E_incident.
- optionally (``reference=True`` in :meth:`Geant4Engine.run`), an independent, slow recorder: a
  Python ``G4UserSteppingAction`` that sees every step of the event and keeps each one that
  deposits energy in an active slab, with both its end points and the slab it started in. It
  records the same events as the scorers, so the two recordings can be compared shower by
  shower (tests, benchmarks).

Charged steps longer than ``SEGMENT_MM`` are cut into equal pieces along the chord, one point
each with an equal share of the deposit (a step's continuous loss is spread along it; 1% of the
charged steps in silicon are longer than 2.8 mm, up to ~2 cm for electrons running along a slab).

Each event is seeded from ``(seed, event index)`` through NumPy's ``SeedSequence``, so a shower
does not depend on how a job is split into calls, and the same seed gives identical steps.

Optional, for studies inside a full simulation (both off by default, and then the geometry is
exactly the one above): an *upstream* slab (tracker-like material in front of the stack, its own
deposits counted in ``EventRecord.upstream_edep_mev``), and the *fast-simulation hook* of
:mod:`pcshower.simulate.geant4.fastsim` (a 1 mm vacuum layer in front of the stack in which
photons and electrons above a threshold are stopped at the front face and handed to a
pcshower model). An event may also have several primaries (``energy_gev`` of shape [n, k]) with
their own impact points on the front face (``impact_mm``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from pcshower.physics.stack import Stack
from pcshower.simulate.geant4.datasets import ELECTRON_MASS_MEV, configure_geant4_data

__all__ = ["Geant4Engine", "EventRecord", "get_engine", "PDG_TO_G4", "reference_points",
           "split_along_chord"]

log = logging.getLogger(__name__)

#: PDG code → Geant4 particle name for the guns pcshower supports.
PDG_TO_G4 = {22: "gamma", 11: "e-", -11: "e+", 211: "pi+", -211: "pi-", 13: "mu-", -13: "mu+",
             2212: "proton", 2112: "neutron"}
HADRONS = {211, -211, 2212, 2112}
#: Geant4's own default production cut (mm).
DEFAULT_CUT_MM = 0.7
#: Longest piece of a charged step recorded as one point (mm).
SEGMENT_MM = 1.0

_ENGINE: "Geant4Engine | None" = None


@dataclass
class EventRecord:
    """Raw result of a batch of events (numpy, detector frame, mm / MeV).

    ``points`` [P, 4] (x, y, z, e) of active-slab deposits, ``ptr`` [B+1]; ``photon_step`` [P]
    True for the deposits of photon steps (post-step position), False for the pieces of
    charged steps (along the step); ``slab_edep_mev`` [B, S] energy deposited in every slab (active and passive);
    ``leakage_mev`` [B]; ``active_steps`` [B] number of points recorded by Geant4 (the hook's
    points, when it runs, are appended after them in each event and flagged in
    ``fastsim.point_mask``; ``slab_edep_mev`` and ``leakage_mev`` are Geant4's alone). With the reference
    recorder on, ``reference_steps`` [R, 9] / ``reference_ptr`` [B+1] hold its independent
    recording of the same events (every depositing step in an active slab: pre-step x, y, z,
    post-step x, y, z, deposit, slab index, 1 if charged; :func:`reference_points` turns it
    into points), else None.
    """

    points: np.ndarray
    ptr: np.ndarray
    slab_edep_mev: np.ndarray
    leakage_mev: np.ndarray
    active_steps: np.ndarray
    photon_step: np.ndarray | None = None
    reference_steps: np.ndarray | None = None
    reference_ptr: np.ndarray | None = None
    #: [B] Geant4's deposits in the upstream slab (MeV), None without one
    upstream_edep_mev: np.ndarray | None = None
    #: what the fast-simulation hook stopped and generated
    #: (:class:`~pcshower.simulate.geant4.fastsim.FastSimRecord`), None without the hook
    fastsim: object | None = None

    @property
    def deposited_mev(self) -> np.ndarray:
        """[B] energy deposited in all materials of the stack."""
        return self.slab_edep_mev.sum(axis=1)

    @property
    def active_mev(self) -> np.ndarray:
        return np.add.reduceat(self.points[:, 3], self.ptr[:-1]) * (np.diff(self.ptr) > 0) \
            if len(self.points) else np.zeros(len(self.ptr) - 1)


def split_along_chord(a: np.ndarray, b: np.ndarray, edep: np.ndarray,
                      max_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``(points [P', 4], step [P'])`` for steps from ``a`` to ``b`` ([P, 3], mm) depositing
    ``edep``: each step cut into ``ceil(|b - a| / max_mm)`` equal pieces, one point (x, y, z, e)
    at the centre of each with an equal share of the deposit (so a step shorter than ``max_mm``
    is its mid-point); ``step`` is the index of the step each point comes from."""
    length = np.linalg.norm(b - a, axis=1)
    pieces = np.maximum(np.ceil(length / max_mm), 1).astype(np.int64)
    step = np.repeat(np.arange(len(a)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    frac = (np.arange(len(step)) - first + 0.5) / pieces[step]
    xyz = a[step] + frac[:, None] * (b - a)[step]
    return np.c_[xyz, edep[step] / pieces[step]], step


def reference_points(record: "EventRecord", stack: Stack, max_mm: float = 0.1,
                     position: str = "chord") -> tuple[np.ndarray, np.ndarray]:
    """``(points [P, 4], ptr [B+1])`` of the reference recording in ``record``.

    ``position="chord"``: a charged step's deposit is spread in pieces of at most ``max_mm``
    along the straight line from its pre- to its post-step point (continuous loss), a photon
    step's deposit sits at its post-step point (the interaction); ``position="post"``: every
    deposit at its post-step point. In both, z is clamped into the slab the step started in (a
    post-step point on the slab's back face belongs to that slab, not the next).
    """
    if record.reference_steps is None:
        raise ValueError("this record has no reference recording: run with reference=True")
    if position not in ("chord", "post"):
        raise ValueError(f"position must be 'chord' or 'post', got {position!r}")
    if not max_mm > 0:
        raise ValueError(f"max_mm must be > 0, got {max_mm!r}")
    r = record.reference_steps
    counts = np.diff(record.reference_ptr)
    # a zero-length "step" from the post-step point to itself is that point: photon steps
    # always (their deposit is at the interaction), every step for position="post"
    start = r[:, 3:6].copy() if position == "post" else np.where(r[:, 8:9] < 0.5, r[:, 3:6], r[:, :3])
    pts, step = split_along_chord(start, r[:, 3:6], r[:, 6], max_mm)
    shower = np.repeat(np.arange(len(counts)), counts)[step]
    slab = r[step, 7].astype(np.int64)
    edges = stack.z_edges_mm
    pts[:, 2] = np.clip(pts[:, 2], edges[slab] + 1e-6, edges[slab + 1] - 1e-6)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(shower, minlength=len(counts)))])
    return pts, ptr.astype(np.int64)


def _event_seeds(seed: int, n: int) -> np.ndarray:
    """[n, 2] independent 31-bit seed pairs for HepRandom, one per event."""
    children = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x9E4]).spawn(n)
    return np.array([c.generate_state(2, np.uint32) for c in children], dtype=np.int64) & 0x7FFFFFFF


def get_engine(**kwargs) -> "Geant4Engine":
    """The process's engine, created on first use (Geant4 allows one run manager per process)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Geant4Engine(**kwargs)
    return _ENGINE


class Geant4Engine:
    """Owns the run manager, the geometry of the current stack and the recording hooks."""

    def __init__(self, *, physics: str = "em", cut_mm: float = 0.7, verbose: int = 0):
        self.data = configure_geant4_data()
        os.environ.setdefault("G4FORCENUMBEROFTHREADS", "1")
        import geant4_pybind as g4  # noqa: PLC0415  (after the data variables are set)

        self.g4 = g4
        self.physics = physics
        self.cut_mm = float(cut_mm)
        self._keep = []  # Python references that Geant4 objects need alive
        self._geometry_key = None
        self._geometry_version = 0
        self._build_classes()
        self.run_manager = g4.G4RunManagerFactory.CreateRunManager(g4.G4RunManagerType.Serial)
        self.detector = self._Detector(self)
        self.run_manager.SetUserInitialization(self.detector)
        self.run_manager.SetUserInitialization(self._physics_list(physics))
        # user actions may only be created once the physics list is set (a Geant4 rule)
        self.reference_recorder = self._ReferenceRecorder()
        # a plain C++ stepping action (no Python subclass, so no Python call per step) to
        # put back when the reference recorder is switched off
        self._no_stepping = g4.G4UserSteppingAction()
        self._reference_on = False
        self.actions = self._Actions(self)
        self.run_manager.SetUserInitialization(self.actions)
        ui = g4.G4UImanager.GetUIpointer()
        for cmd in ("/control/verbose 0", "/run/verbose 0", "/event/verbose 0",
                    "/tracking/verbose 0", "/process/em/verbose 0", "/process/had/verbose 0"):
            ui.ApplyCommand(cmd)
        g4.G4EmParameters.Instance().SetVerbose(0)
        self._initialized = False
        self.transverse_mm = (1000.0, 1000.0)
        self.stack: Stack | None = None
        # optional upstream slab (fastsim.Upstream) and fast-simulation hook (fastsim.FastSimHook)
        self.upstream = None
        self.upstream_mm = 0.0
        self.hook = None

    # ------------------------------------------------------------------ physics
    def _physics_list(self, physics: str):
        g4 = self.g4
        if physics == "em":
            plist = g4.G4VModularPhysicsList()
            plist.RegisterPhysics(g4.G4EmStandardPhysics_option1())
            plist.RegisterPhysics(g4.G4DecayPhysics())
        else:
            # reference lists by their bound classes (the factory's return value cannot be
            # handed to the run manager from Python), with their own EM constructor
            if not physics.replace("_", "").isalnum() or not hasattr(g4, physics) \
                    or not issubclass(getattr(g4, physics), g4.G4VModularPhysicsList):
                raise ValueError(f"unknown Geant4 physics list {physics!r}: use 'em' or a reference "
                                 "list such as FTFP_BERT, QGSP_BERT, QBBC")
            plist = getattr(g4, physics)()
        plist.SetVerboseLevel(0)
        if self.cut_mm != DEFAULT_CUT_MM:
            # works, but the wheel then crashes while deleting its particle table at interpreter
            # exit (geant4-pybind 0.1.3, seen with any cut change); the default needs no call
            log.warning("production cut %g mm: results are fine, but geant4-pybind 0.1.3 crashes "
                        "at interpreter exit after any cut change (keep 0.7 mm for a clean exit)",
                        self.cut_mm)
            plist.SetDefaultCutValue(self.cut_mm * g4.mm)
        self._keep.append(plist)
        return plist

    # ------------------------------------------------------------------ classes bound to g4
    def _build_classes(self):
        g4 = self.g4
        engine = self

        class ChargedScorer(g4.G4VPrimitiveScorer):
            """Appends (pre x, y, z, post x, y, z, e) of every depositing charged step.

            A primitive scorer rather than a sensitive detector because scorers take a C++
            filter: Python runs for charged steps only (~10% of the steps in silicon).
            """

            def __init__(self, name):
                super().__init__(name, 0)
                self.buf = []

            def ProcessHits(self, step, history):
                edep = step.GetTotalEnergyDeposit()
                if edep <= 0.0:
                    return False
                a = step.GetPreStepPoint().GetPosition()
                b = step.GetPostStepPoint().GetPosition()
                self.buf.append((a.x, a.y, a.z, b.x, b.y, b.z, edep))
                return True

        class PhotonScorer(ChargedScorer):
            """Appends (x, y, z, e) of every depositing photon step, at its post-step point.

            The deposit of a photon step is local to the interaction that ends it (a Compton or
            photo-electron below the production cut), so the post-step point is its position.
            ~90% of the steps in silicon are photon steps and ~1% of those deposit.
            """

            def ProcessHits(self, step, history):
                edep = step.GetTotalEnergyDeposit()
                if edep <= 0.0:
                    return False
                b = step.GetPostStepPoint().GetPosition()
                self.buf.append((b.x, b.y, b.z, edep))
                return True

        class ReferenceRecorder(g4.G4UserSteppingAction):
            """Independent recording: every step with a deposit whose pre-step volume is an
            active slab, as (pre-step x, y, z, post-step x, y, z, deposit, slab index, charged);
            see :func:`reference_points` for the points made of it. Slow: Python runs for every
            step of the event."""

            def __init__(self):
                super().__init__()
                self.active_names = set()
                self.buf = []

            def UserSteppingAction(self, step):
                edep = step.GetTotalEnergyDeposit()
                if edep <= 0.0:
                    return
                volume = step.GetPreStepPoint().GetTouchable().GetVolume()
                if volume.GetLogicalVolume().GetName() in self.active_names:
                    a = step.GetPreStepPoint().GetPosition()
                    b = step.GetPostStepPoint().GetPosition()
                    charged = step.GetTrack().GetDefinition().GetPDGCharge() != 0.0
                    self.buf.append((a.x, a.y, a.z, b.x, b.y, b.z, edep, volume.GetCopyNo(),
                                     float(charged)))

        class LeakageSD(g4.G4VSensitiveDetector):
            """Counts and kills every track that leaves the envelope into the world."""

            def __init__(self, name):
                super().__init__(name)
                self.leak = 0.0

            def ProcessHits(self, step, history):
                track = step.GetTrack()
                pre = step.GetPreStepPoint()
                e = pre.GetKineticEnergy()
                if track.GetDefinition().GetPDGEncoding() == -11:
                    e += 2.0 * ELECTRON_MASS_MEV
                self.leak += e
                track.SetTrackStatus(g4.G4TrackStatus.fStopAndKill)
                return True

        class Detector(g4.G4VUserDetectorConstruction):
            def __init__(self, eng):
                super().__init__()
                self.eng = eng
                self.world = None

            def Construct(self):
                self.world = self.eng._build_world()
                return self.world

            def ConstructSDandField(self):
                self.eng._attach_sensitive()

        class Gun(g4.G4VUserPrimaryGeneratorAction):
            def __init__(self):
                super().__init__()
                self.gun = g4.G4ParticleGun(1)
                self.jobs = None  # dict of per-event arrays
                self.offset = 0

            def GeneratePrimaries(self, event):
                i = self.offset + event.GetEventID()
                j = self.jobs
                seeds = j["seeds"][i]
                g4.HepRandom.setTheSeeds([int(seeds[0]), int(seeds[1]), 0])
                self.gun.SetParticleDefinition(j["particle_def"])
                # one vertex per primary of the event (one, unless energies are [n, k])
                for d, p, e in zip(j["dir"][i], j["pos"][i], j["energy_mev"][i]):
                    self.gun.SetParticleEnergy(float(e) * g4.MeV)
                    self.gun.SetParticleMomentumDirection(g4.G4ThreeVector(*map(float, d)))
                    self.gun.SetParticlePosition(g4.G4ThreeVector(*map(float, p)))
                    self.gun.GeneratePrimaryVertex(event)

        class EventAction(g4.G4UserEventAction):
            def __init__(self, eng):
                super().__init__()
                self.eng = eng

            def BeginOfEventAction(self, event):
                self.eng._begin_event()

            def EndOfEventAction(self, event):
                self.eng._end_event(event)

        class Actions(g4.G4VUserActionInitialization):
            def __init__(self, eng):
                super().__init__()
                self.eng = eng
                self.gun = Gun()
                self.event_action = EventAction(eng)

            def Build(self):
                self.SetUserAction(self.gun)
                self.SetUserAction(self.event_action)

        self._ChargedScorer, self._PhotonScorer = ChargedScorer, PhotonScorer
        self._LeakageSD, self._Detector, self._Actions = LeakageSD, Detector, Actions
        self._ReferenceRecorder = ReferenceRecorder
        self.charged_scorer = self.photon_scorer = None
        self.leak_sd = None
        self.passive_mfd = None

    # ------------------------------------------------------------------ geometry
    def _build_world(self):
        g4 = self.g4
        stack = self.stack
        nist = g4.G4NistManager.Instance()
        vacuum = nist.FindOrBuildMaterial("G4_Galactic")
        depth = stack.total_thickness_mm
        wx, wy = self.transverse_mm
        # centre the slabs on the shower axis at mid-depth so inclined showers stay contained
        cx = 0.5 * depth * math.tan(self.axis_theta) * math.cos(self.axis_phi)
        cy = 0.5 * depth * math.tan(self.axis_theta) * math.sin(self.axis_phi)
        self.slab_centre_mm = (cx, cy)  # the fast-simulation hook's twin is centred alike
        margin = 10.0
        v = self._geometry_version
        # material in front of the stack (upstream slab, the hook's entrance layer): z in [-front, 0]
        from pcshower.simulate.geant4.fastsim import ENTRANCE_MM, upstream_material

        up_mat, self.upstream_mm = (None, 0.0) if self.upstream is None else \
            upstream_material(self.upstream, nist, g4)
        # a 1 mm gap in front of the face whenever something is in front (the same layout with
        # and without the hook, which watches it); without either, the plain geometry above
        entrance = ENTRANCE_MM if self.hook is not None or self.upstream is not None else 0.0
        front = self.upstream_mm + entrance
        env_half = (0.5 * wx + abs(cx) + margin, 0.5 * wy + abs(cy) + margin,
                    0.5 * (depth + front) + margin)
        env_z = 0.5 * (depth - front)  # the envelope's centre (depth / 2 with nothing in front)
        # the world must be centred on the origin; the envelope sits at z = env_z inside it
        world_half = (env_half[0] + margin, env_half[1] + margin, max(depth, front) + 2.0 * margin)
        world_s = g4.G4Box(f"World{v}", *world_half)
        world_lv = g4.G4LogicalVolume(world_s, vacuum, f"World{v}")
        world_pv = g4.G4PVPlacement(None, g4.G4ThreeVector(), world_lv, f"World{v}", None, False, 0)
        env_s = g4.G4Box(f"Envelope{v}", *env_half)
        env_lv = g4.G4LogicalVolume(env_s, vacuum, f"Envelope{v}")
        env_pv = g4.G4PVPlacement(None, g4.G4ThreeVector(0, 0, env_z), env_lv, f"Envelope{v}", world_lv, False, 0)
        edges = stack.z_edges_mm
        self.active_lvs, self.passive_lvs = [], []
        keep = [world_s, world_lv, world_pv, env_s, env_lv, env_pv]
        for i, slab in enumerate(stack.slabs):
            mat = nist.FindOrBuildMaterial(slab.material.g4_name)
            if mat is None:
                raise ValueError(f"Geant4 has no NIST material {slab.material.g4_name!r} "
                                 f"(slab {i} of stack {stack.name!r})")
            s = g4.G4Box(f"Slab{v}_{i}", 0.5 * wx, 0.5 * wy, 0.5 * slab.thickness_mm)
            lv = g4.G4LogicalVolume(s, mat, f"Slab{v}_{i}")
            zc = 0.5 * (edges[i] + edges[i + 1]) - env_z
            pv = g4.G4PVPlacement(None, g4.G4ThreeVector(cx, cy, zc), lv, f"Slab{v}_{i}", env_lv,
                                  False, i)
            (self.active_lvs if slab.active else self.passive_lvs).append(lv)
            keep += [s, lv, pv]
        # in front, centred like the slabs: the upstream slab (copy number = number of slabs, so
        # the passive scorer books its deposits apart) and the hook's vacuum entrance layer
        self.upstream_lv = self.entrance_lv = None
        for name, thick, z_back, mat, copy in (
                ("Upstream", self.upstream_mm, -entrance, up_mat, len(stack.slabs)),
                ("Entrance", entrance if self.hook is not None else 0.0, 0.0, vacuum, 0)):
            if thick <= 0:
                continue
            s = g4.G4Box(f"{name}{v}", 0.5 * wx, 0.5 * wy, 0.5 * thick)
            lv = g4.G4LogicalVolume(s, mat, f"{name}{v}")
            pv = g4.G4PVPlacement(None, g4.G4ThreeVector(cx, cy, z_back - 0.5 * thick - env_z), lv,
                                  f"{name}{v}", env_lv, False, copy)
            setattr(self, f"{name.lower()}_lv", lv)
            keep += [s, lv, pv]
        self.front_mm = front
        self.world_lv = world_lv
        self._keep.append(keep)
        return world_pv

    def _attach_sensitive(self):
        g4 = self.g4
        sdm = g4.G4SDManager.GetSDMpointer()
        v = self._geometry_version
        keep = []
        # active slabs: one Python scorer per kind of step, each behind a C++ filter
        active = g4.G4MultiFunctionalDetector(f"pcsActive{v}")
        self.charged_scorer = self._ChargedScorer("charged")
        charged = g4.G4SDChargedFilter(f"pcsCharged{v}")
        self.charged_scorer.SetFilter(charged)
        self.photon_scorer = self._PhotonScorer("photon")
        neutral = g4.G4SDNeutralFilter(f"pcsNeutral{v}")
        self.photon_scorer.SetFilter(neutral)
        active.RegisterPrimitive(self.charged_scorer)
        active.RegisterPrimitive(self.photon_scorer)
        sdm.AddNewDetector(active)
        # passive slabs: C++ only
        self.passive_mfd = g4.G4MultiFunctionalDetector(f"pcsPassive{v}")
        scorer = g4.G4PSEnergyDeposit("edep", 0)
        self.passive_mfd.RegisterPrimitive(scorer)
        sdm.AddNewDetector(self.passive_mfd)
        self.leak_sd = self._LeakageSD(f"pcsLeak{v}")
        sdm.AddNewDetector(self.leak_sd)
        for lv in self.active_lvs:
            lv.SetSensitiveDetector(active)
        for lv in self.passive_lvs + ([self.upstream_lv] if self.upstream_lv is not None else []):
            lv.SetSensitiveDetector(self.passive_mfd)
        self.world_lv.SetSensitiveDetector(self.leak_sd)
        self.passive_hc_id = sdm.GetCollectionID(f"pcsPassive{v}/edep") \
            if self.passive_lvs or self.upstream_lv is not None else -1
        if self.entrance_lv is not None:
            keep += self.hook.attach(self, self.entrance_lv, sdm, v)
        self.reference_recorder.active_names = {lv.GetName() for lv in self.active_lvs}
        keep += [self.charged_scorer, charged, self.photon_scorer, neutral, active,
                 self.passive_mfd, scorer, self.leak_sd]
        self._keep.append(keep)

    def set_geometry(self, stack: Stack, transverse_mm, theta: float, phi: float, *,
                     upstream=None, hook=None) -> None:
        """Build (or rebuild, when anything changed) the geometry for ``stack``, with an
        optional upstream slab (:class:`~pcshower.simulate.geant4.fastsim.Upstream`) and the
        fast-simulation hook's entrance layer (a :class:`~pcshower.simulate.geant4.fastsim.FastSimHook`)."""
        if not isinstance(stack, Stack):
            raise ValueError(f"stack must be a pcshower.physics.Stack, got {type(stack).__name__}")
        tx, ty = (transverse_mm, transverse_mm) if np.isscalar(transverse_mm) else transverse_mm
        key = (stack, float(tx), float(ty), round(float(theta), 9), round(float(phi), 9),
               upstream, None if hook is None else hook.geometry_key)
        self.hook = hook  # the entrance scorer (of this or an unchanged geometry) calls it
        if key == self._geometry_key:
            return
        self.upstream = upstream
        self.stack, self.transverse_mm = stack, (float(tx), float(ty))
        self.axis_theta, self.axis_phi = float(theta), float(phi)
        self._geometry_version += 1
        if not self._initialized:
            self.run_manager.Initialize()
            self._initialized = True
        else:
            world = self._build_world()
            self.detector.world = world
            self.run_manager.DefineWorldVolume(world, True)
            self._attach_sensitive()
            self.run_manager.GeometryHasBeenModified()
        self._geometry_key = key

    # ------------------------------------------------------------------ per-event bookkeeping
    def _begin_event(self):
        self.charged_scorer.buf = []
        self.photon_scorer.buf = []
        self.reference_recorder.buf = []
        self.leak_sd.leak = 0.0
        if self.hook is not None:
            self.hook.begin_event(len(self._out_points))

    def _end_event(self, event):
        charged = np.asarray(self.charged_scorer.buf, dtype=np.float64).reshape(-1, 7)
        charged, _ = split_along_chord(charged[:, :3], charged[:, 3:6], charged[:, 6], SEGMENT_MM)
        photon = np.asarray(self.photon_scorer.buf, dtype=np.float64).reshape(-1, 4)
        pts = np.concatenate([np.c_[charged, np.zeros(len(charged))], np.c_[photon, np.ones(len(photon))]])
        n_slabs = len(self.stack.slabs)
        passive = np.zeros(n_slabs + 1)  # the last entry: the upstream slab
        hce = event.GetHCofThisEvent()
        if self.passive_hc_id >= 0:
            for copy_no, value in hce.GetHC(self.passive_hc_id):
                passive[copy_no] += value
        active = np.zeros(n_slabs)
        if len(pts):
            # every active point lies inside exactly one slab: find it by depth
            slab = np.searchsorted(self.stack.z_edges_mm, pts[:, 2], side="right") - 1
            active = np.bincount(np.clip(slab, 0, n_slabs - 1), weights=pts[:, 3], minlength=n_slabs)
        self._out_points.append(pts)
        self._out_edep.append(passive[:n_slabs] + active)
        self._out_upstream.append(passive[n_slabs])
        self._out_leak.append(self.leak_sd.leak)
        if self.hook is not None:
            self.hook.end_event()
        if self._reference_on:
            self._out_reference.append(np.asarray(self.reference_recorder.buf,
                                                  dtype=np.float64).reshape(-1, 9))

    def _set_reference(self, on: bool) -> None:
        """Install or remove the stepping-action recorder (sequential run manager: between runs)."""
        if on != self._reference_on:
            self.run_manager.SetUserAction(self.reference_recorder if on else self._no_stepping)
            self._reference_on = on

    # ------------------------------------------------------------------ running
    def run(self, energy_gev, theta, phi, particle: int, stack: Stack, seed: int, *,
            transverse_mm=1000.0, progress=None, reference: bool = False, impact_mm=None,
            upstream=None, fastsim=None) -> EventRecord:
        """Simulate one shower per entry of ``energy_gev``/``theta``/``phi`` (radians).

        ``progress``: an object with ``update(n)`` (a tqdm bar) advanced every 10 events.
        ``reference``: also record the events with the independent stepping-action recorder
        (about twice the CPU time; for validation).
        ``energy_gev`` of shape ``[n, k]``: events of ``k`` primaries each (same particle),
        ``theta``/``phi`` broadcast to it; ``impact_mm`` ``[n, k, 2]`` (or ``[n, 2]`` for one
        primary) their (x, y) on the front face (default: the origin).
        ``upstream``: an :class:`~pcshower.simulate.geant4.fastsim.Upstream` slab in front of the
        stack (the primaries start in front of it, aimed at their impact points).
        ``fastsim``: a :class:`~pcshower.simulate.geant4.fastsim.FastSimHook` (the record's
        ``fastsim`` then holds what it stopped; its points are appended to each event's).
        """
        g4 = self.g4
        energy_gev = np.atleast_1d(np.asarray(energy_gev, dtype=np.float64))
        if energy_gev.ndim > 2:
            raise ValueError("energy_gev must be [n] (one primary per event) or [n, k]")
        if energy_gev.ndim == 1:
            energy_gev = energy_gev[:, None]
        n, k = energy_gev.shape
        theta = np.broadcast_to(np.asarray(theta, dtype=np.float64).reshape(
            (-1, 1) if np.ndim(theta) == 1 else np.shape(theta)), (n, k))
        phi = np.broadcast_to(np.asarray(phi, dtype=np.float64).reshape(
            (-1, 1) if np.ndim(phi) == 1 else np.shape(phi)), (n, k))
        impact = np.zeros((n, k, 2))
        if impact_mm is not None:
            given = np.asarray(impact_mm, dtype=np.float64)
            try:
                impact[:] = given.reshape(n, k, 2) if given.size == n * k * 2 else given
            except ValueError:
                raise ValueError(f"impact_mm must be [n, k, 2] = [{n}, {k}, 2] mm, got shape "
                                 f"{given.shape}") from None
            if not np.isfinite(impact).all():
                raise ValueError("impact_mm must be finite (mm)")
        particle = int(particle)
        if particle not in PDG_TO_G4:
            raise ValueError(f"the geant4 engine cannot shoot PDG {particle}; "
                             f"supported: {sorted(PDG_TO_G4)}")
        if particle in HADRONS and self.physics == "em":
            raise ValueError(f"PDG {particle} is a hadron: the offline 'em' physics list has no "
                             "hadronic interactions (see docs/geant4.md on pions)")
        if np.any(~np.isfinite(energy_gev)) or np.any(energy_gev <= 0):
            raise ValueError("incident energies must be positive numbers of GeV")
        if np.any(np.abs(theta) >= 0.5 * math.pi):
            raise ValueError("theta is the angle to the stack normal and must be below 90 degrees "
                             "(pi/2 rad)")
        n_slabs = len(stack.slabs)
        if n == 0:
            return EventRecord(points=np.zeros((0, 4)), ptr=np.zeros(1, dtype=np.int64),
                               slab_edep_mev=np.zeros((0, n_slabs)), leakage_mev=np.zeros(0),
                               active_steps=np.zeros(0, dtype=np.int64),
                               photon_step=np.zeros(0, dtype=bool))
        # one geometry per call: centred on the mean axis (slabs are wide enough for the spread)
        self.set_geometry(stack, transverse_mm, float(np.mean(theta)), float(np.mean(phi)),
                          upstream=upstream, hook=fastsim)
        direction = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi),
                              np.cos(theta)], axis=-1)
        # start 1 µm in front of whatever is in front of the face (the vacuum envelope), on the
        # line through the impact point
        back = (1e-3 + self.front_mm / np.cos(theta))[..., None]
        pos = np.concatenate([impact, np.zeros((n, k, 1))], axis=-1) - back * direction
        pdef = g4.G4ParticleTable.GetParticleTable().FindParticle(PDG_TO_G4[particle])
        self.actions.gun.jobs = {"seeds": _event_seeds(seed, n), "dir": direction, "pos": pos,
                                 "energy_mev": energy_gev * 1000.0, "particle_def": pdef}
        self._out_points, self._out_edep, self._out_leak, self._out_reference = [], [], [], []
        self._out_upstream = []
        self._set_reference(bool(reference))
        if fastsim is not None:
            fastsim.begin_run(seed, centre_mm=self.slab_centre_mm)
        try:
            # BeamOn in chunks so a progress bar moves; event ids restart at 0 in every BeamOn
            chunk = n if progress is None else max(1, min(n, 10))
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                self.actions.gun.offset = start
                self.run_manager.BeamOn(stop - start)
                if progress is not None:
                    progress.update(stop - start)
            fast = fastsim.end_run(n) if fastsim is not None else None
        finally:
            self._set_reference(False)
            self.hook = None  # a later run without the hook must not call this one
        counts = np.array([len(p) for p in self._out_points], dtype=np.int64)
        if fast is not None:
            # each event's generated points after its Geant4 points (flag column 2: the hook)
            self._out_points = [np.concatenate([p, np.c_[h, np.full(len(h), 2.0)]])
                                for p, h in zip(self._out_points, fast.points_per_event)]
        ptr = np.concatenate([[0], np.cumsum([len(p) for p in self._out_points])])
        points = np.concatenate(self._out_points)
        record = EventRecord(points=np.ascontiguousarray(points[:, :4]), ptr=ptr,
                             slab_edep_mev=np.stack(self._out_edep),
                             leakage_mev=np.asarray(self._out_leak), active_steps=counts,
                             photon_step=points[:, 4] == 1.0)
        if upstream is not None:
            record.upstream_edep_mev = np.asarray(self._out_upstream)
        if fast is not None:
            fast.point_mask = points[:, 4] == 2.0
            fast.points_per_event = None  # now in record.points
            record.fastsim = fast
        if reference:
            ref_counts = [len(p) for p in self._out_reference]
            record.reference_steps = np.concatenate(self._out_reference)
            record.reference_ptr = np.concatenate([[0], np.cumsum(ref_counts)]).astype(np.int64)
        return record
