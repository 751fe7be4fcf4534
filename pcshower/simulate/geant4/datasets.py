"""Find the user's Geant4 data sets, or write approximate low-energy EM tables so Geant4 runs offline.

This module must run BEFORE ``geant4_pybind`` is imported: the wheel's start-up looks for the
data sets and otherwise asks on stdin to download them (or downloads them when ``CI=true``).
Setting ``GEANT4_DATA_DIR`` skips that check, and every ``G4*DATA`` variable must name an
existing directory, or the EM constructors crash on a null string.

Only two data-driven models of ``G4EmStandardPhysics_option1`` need tables:

1. ``G4SeltzerBergerModel`` (e± bremsstrahlung below 1 GeV) reads ``$G4LEDATA/brem_SB/br<Z>``, a
   ``G4Physics2DVector`` of the scaled cross-section χ(Z, T, κ) = (β²/Z²) k dσ/dk in mb on a grid
   of κ = k/T (photon over electron kinetic energy) and ln(T/MeV). We write the Bethe–Heitler
   cross-section with Thomas–Fermi screening functions and the Coulomb correction (Tsai, Rev. Mod.
   Phys. 46 (1974) 815, eqs. 3.9 and 3.38–3.40; the same form as the Geant4 Physics Reference
   Manual, "Bremsstrahlung, relativistic model")::

       k dσ/dk = 4 α r_e² Z² { (1 + (1-y)²) [φ1(γ)/4 - ln Z/3 - f_c] - (2/3)(1-y) [φ2(γ)/4 - ln Z/3 - f_c] }

   with y = k/E (E the total electron energy), γ = 100 m_e k / (E (E-k) Z^{1/3}),
   φ1 = 20.863 - 2 ln(1 + (0.55846 γ)²) - 4 [1 - 0.6 e^{-0.9γ} - 0.4 e^{-1.5γ}],
   φ2 = φ1 - (2/3) / (1 + 6.5 γ + 6 γ²) for γ ≤ 1, φ1 = φ2 = 21.12 - 4.184 ln(γ + 0.952) above,
   and f_c(Z) the Davies–Bethe–Maximon Coulomb correction (Tsai eq. 3.3). In complete screening
   (γ → 0) this is χ = 4αr_e² [(4/3 - 4κ/3 + κ²)(ln(184.15 Z^{-1/3}) - f_c) + (1-κ)/9].
   Validity: the formula is a high-energy Born approximation; it is good to a few percent above
   ~50 MeV and drifts to tens of percent below ~2 MeV, where Seltzer–Berger's partial-wave data
   are what Geant4 normally uses. ``f_c`` is applied only above 50 MeV, as Geant4's relativistic
   model does, and the β² factor of the table definition is kept.
2. ``G4LivermorePhotoElectricModel`` reads ``$G4LEDATA/epics2017/phot/pe-cs-<Z>.dat``,
   ``pe-high-<Z>.dat`` and ``pe-low-<Z>.dat``. We write one shell whose cross-section is a
   K-shell-dominated power law plus the relativistic Sauter 1/E tail::

       σ_pe(Z, E) = 1300 b (Z/74)^4.5 (0.1 MeV / E)³ + (5/4)(3/2) φ0 α⁴ Z⁵ (m_e c² / E)

   (φ0 = 8π r_e²/3; the first term is normalised to the XCOM photo-effect cross-section of W at
   100 keV, ~1.3 kb, with the Z^4.5 scaling of Davisson & Evans, Rev. Mod. Phys. 24 (1952) 79;
   the second is Sauter's high-energy K-shell limit with the 5/4 factor for outer shells.)
   Validity: within a factor ~2 from 20 keV to 1 MeV for Z ≥ 13 (W at 100 keV: 1.34 kb against
   XCOM 1.2 kb; Si at 30 keV: 27 b against 45 b); no absorption edges.
   Photons below the (1 keV) shell energy are absorbed locally.

The data-free parts of the same list (Klein–Nishina Compton, Bethe–Heitler 5D conversion, Urban
multiple scattering, ionisation, eBremsstrahlungRelModel above 1 GeV, annihilation) are untouched.
Everything made with these tables carries the provenance label ``geant4-approximate-lowenergy``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

__all__ = [
    "APPROXIMATE_LABEL",
    "REAL_DATA_LABEL",
    "DATA_ENV_VARS",
    "DataConfig",
    "configure_geant4_data",
    "resolve_data_environment",
    "write_approximate_tables",
    "bremsstrahlung_chi_mb",
    "photoelectric_cross_section_barn",
    "cache_dir",
]

log = logging.getLogger(__name__)

APPROXIMATE_LABEL = "geant4-approximate-lowenergy"
REAL_DATA_LABEL = "geant4"
#: Bump when the tables' formulas change: a new version writes into a new cache folder.
TABLES_VERSION = 2
#: ``PCSHOWER_GEANT4_TABLES=1`` selects the first tables (complete screening everywhere, no β²,
#: Coulomb correction at all energies) to measure what the better low-energy brems changes.
TABLES_ENV = "PCSHOWER_GEANT4_TABLES"
#: Environment variable overriding the cache directory for generated tables.
CACHE_ENV = "PCSHOWER_GEANT4_DATA"

#: Every data variable the wheel's physics constructors read (all must name a directory).
DATA_ENV_VARS = (
    "G4ABLADATA", "G4CHANNELINGDATA", "G4INCLDATA", "G4LEVELGAMMADATA", "G4NEUTRONHPDATA",
    "G4PARTICLEXSDATA", "G4PIIDATA", "G4RADIOACTIVEDATA", "G4REALSURFACEDATA", "G4SAIDXSDATA",
    "G4NUDEXLIBDATA", "G4DICHROICDATA", "G4LENDDATA", "G4ENSDFSTATEDATA", "G4LEDATA",
)
# Folder-name prefixes of the official data-set tarballs, for GEANT4_DATA_DIR layouts.
_DATASET_PREFIX = {
    "G4LEDATA": "G4EMLOW", "G4ENSDFSTATEDATA": "G4ENSDFSTATE", "G4PARTICLEXSDATA": "G4PARTICLEXS",
    "G4LEVELGAMMADATA": "PhotonEvaporation", "G4RADIOACTIVEDATA": "RadioactiveDecay",
    "G4NEUTRONHPDATA": "G4NDL", "G4PIIDATA": "G4PII", "G4REALSURFACEDATA": "RealSurface",
    "G4SAIDXSDATA": "G4SAIDDATA", "G4ABLADATA": "G4ABLA", "G4INCLDATA": "G4INCL",
    "G4CHANNELINGDATA": "G4CHANNELING", "G4NUDEXLIBDATA": "G4NUDEXLIB", "G4DICHROICDATA": "G4DICHROIC",
    "G4LENDDATA": "LEND",
}

# physical constants
ALPHA = 1.0 / 137.035999
R_E_CM = 2.8179403262e-13
ELECTRON_MASS_MEV = 0.51099895
_MB_PER_CM2 = 1e27
_B_PER_CM2 = 1e24
PHI0_BARN = 8.0 * math.pi / 3.0 * R_E_CM**2 * _B_PER_CM2  # Thomson cross-section, 0.6652 b

MAX_Z = 100


class DataConfig(dict):
    """What :func:`configure_geant4_data` decided: ``label``, ``approximate`` and ``data_dir``."""

    @property
    def label(self) -> str:
        return self["label"]

    @property
    def approximate(self) -> bool:
        return self["approximate"]


_CONFIG: DataConfig | None = None


def cache_dir() -> Path:
    """Where generated tables live: ``$PCSHOWER_GEANT4_DATA`` or ``~/.cache/pcshower/geant4-data``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcshower" / "geant4-data"


def _has_real_em_data(path: str | os.PathLike | None) -> bool:
    """True when ``path`` looks like a real G4EMLOW data set (not our generated tables)."""
    if not path:
        return False
    p = Path(path)
    return (p / "brem_SB" / "br1").is_file() and (p / "livermore").is_dir() \
        and not (p / "PCSHOWER_APPROXIMATE").exists()


def _datasets_in(root: Path) -> dict[str, str]:
    """Map G4*DATA variables to the official data-set folders found directly under ``root``."""
    found = {}
    if not root.is_dir():
        return found
    names = sorted(os.listdir(root))
    for var, prefix in _DATASET_PREFIX.items():
        hits = [n for n in names if n.startswith(prefix) and (root / n).is_dir()]
        if hits:
            found[var] = str(root / hits[-1])
    return found


def resolve_data_environment(environ, *, force_approximate: bool = False) -> dict:
    """Decide, without side effects, where Geant4's data come from for the variables ``environ``.

    Returns ``{"approximate": bool, "label": str, "data_dir": str | None, "real": {VAR: dir}}``:
    real data when ``G4LEDATA`` (or a ``G4EMLOW*`` folder under ``GEANT4_DATA_DIR``) holds the
    Seltzer–Berger and Livermore tables; approximate tables otherwise.
    """
    real_dirs: dict[str, str] = {}
    if not force_approximate:
        if environ.get("GEANT4_DATA_DIR"):
            real_dirs = _datasets_in(Path(environ["GEANT4_DATA_DIR"]).expanduser())
        for var in DATA_ENV_VARS:
            if environ.get(var) and Path(environ[var]).is_dir():
                real_dirs[var] = environ[var]
    if not force_approximate and _has_real_em_data(real_dirs.get("G4LEDATA")):
        return {"approximate": False, "label": REAL_DATA_LABEL, "data_dir": real_dirs["G4LEDATA"],
                "real": real_dirs}
    return {"approximate": True, "label": APPROXIMATE_LABEL, "data_dir": None, "real": {}}


def configure_geant4_data(*, force_approximate: bool = False, quiet: bool = False) -> DataConfig:
    """Point Geant4 at real data sets if the user has them, else at generated approximate tables.

    Real data: ``G4LEDATA`` naming a G4EMLOW folder, or ``GEANT4_DATA_DIR`` holding the official
    data-set folders (``G4EMLOW*``, ``G4ENSDFSTATE*``, …); missing variables are pointed at empty
    folders. Otherwise the approximate tables are written on first use under :func:`cache_dir`
    and every data variable is pointed there; a one-line warning says so. ``GEANT4_DATA_DIR`` is
    always left naming an existing folder, which keeps the wheel from prompting or downloading
    (also under ``CI=true``). Idempotent per process; call it before ``import geant4_pybind``.
    """
    global _CONFIG
    if _CONFIG is not None:
        return _CONFIG
    if "geant4_pybind" in sys.modules:
        log.warning("geant4_pybind was imported before pcshower configured its data sets; "
                    "the data variables set now may come too late")
    env = os.environ
    decision = resolve_data_environment(env, force_approximate=force_approximate)
    if not decision["approximate"]:
        real_dirs = decision["real"]
        empty = _ensure_empty_data_root()
        for var in DATA_ENV_VARS:
            env[var] = real_dirs.get(var) or str(empty / var)
        if not (env.get("GEANT4_DATA_DIR") and Path(env["GEANT4_DATA_DIR"]).is_dir()):
            env["GEANT4_DATA_DIR"] = str(Path(real_dirs["G4LEDATA"]).parent)
        _CONFIG = DataConfig(label=REAL_DATA_LABEL, approximate=False, data_dir=decision["data_dir"])
        return _CONFIG

    root = write_approximate_tables()
    for var in DATA_ENV_VARS:
        env[var] = str(root if var == "G4LEDATA" else root / "empty" / var)
    env["G4ENSDFSTATEDATA"] = str(root / "ensdfstate")
    env["GEANT4_DATA_DIR"] = str(root)
    if not quiet:
        print(f"pcshower: warning: no Geant4 data sets found (set GEANT4_DATA_DIR or G4LEDATA); using "
              f"approximate low-energy EM tables from {root}, outputs labelled {APPROXIMATE_LABEL}",
              file=sys.stderr)
    _CONFIG = DataConfig(label=APPROXIMATE_LABEL, approximate=True, data_dir=str(root),
                         tables=root.name)
    return _CONFIG


def _ensure_empty_data_root() -> Path:
    root = cache_dir() / "empty"
    for var in DATA_ENV_VARS:
        (root / var).mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------------
def coulomb_correction(Z: float) -> float:
    """Davies–Bethe–Maximon Coulomb correction f_c(Z) (Tsai 1974, eq. 3.3)."""
    a2 = (ALPHA * Z) ** 2
    return a2 * (1.0 / (1.0 + a2) + 0.20206 - 0.0369 * a2 + 0.0083 * a2**2 - 0.002 * a2**3)


def _screening(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thomas–Fermi screening functions φ1, φ2 (Tsai 1974 eqs. 3.38–3.40, Butcher–Messel fits)."""
    g = np.asarray(gamma, dtype=np.float64)
    low = g <= 1.0
    phi1_low = 20.863 - 2.0 * np.log(1.0 + (0.55846 * g) ** 2) \
        - 4.0 * (1.0 - 0.6 * np.exp(-0.9 * g) - 0.4 * np.exp(-1.5 * g))
    phi2_low = phi1_low - (2.0 / 3.0) / (1.0 + 6.5 * g + 6.0 * g * g)
    high = 21.12 - 4.184 * np.log(g + 0.952)
    return np.where(low, phi1_low, high), np.where(low, phi2_low, high)


def bremsstrahlung_chi_mb(Z: int, kinetic_mev: np.ndarray, kappa: np.ndarray, version: int = 2) -> np.ndarray:
    """Scaled bremsstrahlung cross-section χ = (β²/Z²) k dσ/dk in mb (see the module docstring).

    ``kinetic_mev`` [ny] electron kinetic energies, ``kappa`` [nx] = k/T; returns ``[ny, nx]``.
    ``version=1``: the complete-screening formula in κ at every energy (the first tables).
    """
    T = np.asarray(kinetic_mev, dtype=np.float64)[:, None]
    kap = np.clip(np.asarray(kappa, dtype=np.float64)[None, :], 0.0, 1.0)
    if version == 1:
        fc1 = coulomb_correction(Z)
        chi1 = 4.0 * ALPHA * R_E_CM**2 * _MB_PER_CM2 * (
            (4 / 3 - 4 / 3 * kap + kap**2) * (math.log(184.15 * Z ** (-1 / 3)) - fc1) + (1 - kap) / 9)
        return np.broadcast_to(chi1, (T.shape[0], kap.shape[1])).copy()
    E = T + ELECTRON_MASS_MEV
    k = kap * T
    y = k / E
    e_out = np.maximum(E - k, 1e-30)
    gamma = 100.0 * ELECTRON_MASS_MEV * k / (E * e_out * Z ** (1.0 / 3.0))
    phi1, phi2 = _screening(gamma)
    fc = np.where(T > 50.0, coulomb_correction(Z), 0.0)
    lnz = math.log(Z) / 3.0
    bracket = (1.0 + (1.0 - y) ** 2) * (phi1 / 4.0 - lnz - fc) \
        - (2.0 / 3.0) * (1.0 - y) * (phi2 / 4.0 - lnz - fc)
    beta2 = T * (T + 2.0 * ELECTRON_MASS_MEV) / E**2
    chi = 4.0 * ALPHA * R_E_CM**2 * _MB_PER_CM2 * beta2 * np.maximum(bracket, 0.0)
    return chi


def photoelectric_coefficients(Z: int) -> tuple[float, float]:
    """``(a1, a3)`` of σ_pe(E) = a1/E + a3/E³ (E in MeV, σ in barn): see the module docstring."""
    a3 = 1300.0 * (Z / 74.0) ** 4.5 * 0.1**3
    a1 = 1.25 * 1.5 * PHI0_BARN * ALPHA**4 * Z**5 * ELECTRON_MASS_MEV
    return a1, a3


def photoelectric_cross_section_barn(Z: int, energy_mev) -> np.ndarray:
    """Approximate total photo-effect cross-section per atom in barn at photon energy (MeV)."""
    a1, a3 = photoelectric_coefficients(Z)
    e = np.asarray(energy_mev, dtype=np.float64)
    return a1 / e + a3 / e**3


# --------------------------------------------------------------------------------------------
# Writing the tables in Geant4's ASCII layouts
# --------------------------------------------------------------------------------------------
#: κ nodes (Seltzer–Berger's own grid shape: dense near κ → 1).
_KAPPA = np.array([1e-12, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
                   0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.99, 0.995,
                   0.999, 0.9995, 0.9999, 0.99995, 1.0])
#: electron kinetic energies, 1 keV .. 10 GeV
_T_MEV = np.logspace(-3, 4, 57)
_SHELL_BINDING_MEV = 1e-3


def _write_brem(path: Path, Z: int, version: int) -> None:
    chi = bremsstrahlung_chi_mb(Z, _T_MEV, _KAPPA, version)
    lines = [f"2 {len(_KAPPA)} {len(_T_MEV)}",
             " ".join(f"{v:.8g}" for v in _KAPPA),
             " ".join(f"{v:.8g}" for v in np.log(_T_MEV))]
    lines += [" ".join(f"{v:.6g}" for v in row) for row in chi]
    path.write_text("\n".join(lines) + "\n")


def _write_photoelectric(folder: Path, Z: int) -> None:
    a1, a3 = photoelectric_coefficients(Z)
    # one shell: "nShells nShellsUsed E_threshold", then binding energy and a1..a6 [barn]
    param = f"1 1 {_SHELL_BINDING_MEV:.6g}\n{_SHELL_BINDING_MEV:.6g} {a1:.8g} 0 {a3:.8g} 0 0 0\n"
    (folder / f"pe-high-{Z}.dat").write_text(param)
    (folder / f"pe-low-{Z}.dat").write_text(param)
    # the tabulated vector holds σ E³ (barn MeV³) on a log grid
    e = np.logspace(-3, 5, 81)
    v = a1 * e**2 + a3
    body = "\n".join(f"{ei:.8g} {vi:.8g}" for ei, vi in zip(e, v))
    (folder / f"pe-cs-{Z}.dat").write_text(f"{e[0]:.8g} {e[-1]:.8g} {len(e)}\n{len(e)}\n{body}\n")


def write_approximate_tables(root: str | os.PathLike | None = None) -> Path:
    """Write the approximate tables (once) and return the G4LEDATA folder; atomic per version."""
    base = Path(root) if root is not None else cache_dir()
    version = int(os.environ.get(TABLES_ENV, TABLES_VERSION))
    if version not in (1, 2):
        raise ValueError(f"{TABLES_ENV} must be 1 or 2, got {version}")
    final = base / f"approx-v{version}"
    if (final / "PCSHOWER_APPROXIMATE").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".approx-v{version}.tmp-{os.getpid()}"
    (tmp / "brem_SB").mkdir(parents=True, exist_ok=True)
    phot = tmp / "epics2017" / "phot"
    phot.mkdir(parents=True, exist_ok=True)
    for Z in range(1, MAX_Z + 1):
        _write_brem(tmp / "brem_SB" / f"br{Z}", Z, version)
        _write_photoelectric(phot, Z)
    (tmp / "ensdfstate").mkdir(exist_ok=True)
    (tmp / "ensdfstate" / "ENSDFSTATE.dat").write_text("")
    for var in DATA_ENV_VARS:
        (tmp / "empty" / var).mkdir(parents=True, exist_ok=True)
    (tmp / "PCSHOWER_APPROXIMATE").write_text(
        f"{APPROXIMATE_LABEL}: generated by pcshower.simulate.geant4.datasets (tables v{version});"
        " see that module's docstring for the formulas.\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: keep its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return final
