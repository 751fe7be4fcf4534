"""Materials by the constants an electromagnetic shower depends on.

Numbers are from the PDG "Atomic and nuclear properties of materials" tables (pdg.lbl.gov/AtomicNuclearProperties):
radiation length X0, density, critical energy E_c for electrons (Rossi definition) and the
minimum ionisation loss. The Molière radius is derived as R_M = X0 E_s / E_c with the scale
energy E_s = 21.2052 MeV, which is how the PDG tables define it (W: 9.33 mm, Pb: 16.0 mm).
For compounds Z and A are mass-weighted averages, as Grindhammer & Peters (hep-ex/0001020,
eq. 7) use for an effective medium.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Material", "MATERIALS", "get_material", "E_SCALE_MEV"]

#: Multiple-scattering scale energy E_s = m_e c^2 sqrt(4 pi / alpha) in MeV (PDG).
E_SCALE_MEV = 21.2052


@dataclass(frozen=True)
class Material:
    """One material (or an effective medium) by its shower-relevant constants.

    Attributes:
        name: pcshower name (``"W"``, ``"Si"``, …).
        Z, A: (effective) atomic number and mass number [g/mol].
        density: g/cm^3.
        x0_mm: radiation length in mm.
        ec_mev: critical energy for electrons in MeV.
        dedx_mip: minimum ionisation loss in MeV cm^2/g.
        g4_name: the Geant4 NIST material name.
    """

    name: str
    Z: float
    A: float
    density: float
    x0_mm: float
    ec_mev: float
    dedx_mip: float
    g4_name: str = ""

    @property
    def rm_mm(self) -> float:
        """Molière radius in mm (R_M = X0 E_s / E_c)."""
        return self.x0_mm * E_SCALE_MEV / self.ec_mev

    @property
    def x0_g_cm2(self) -> float:
        return self.x0_mm * 0.1 * self.density

    @property
    def mip_mev_per_mm(self) -> float:
        """Minimum-ionising energy loss per mm of this material."""
        return self.dedx_mip * self.density * 0.1


def _m(name, Z, A, density, x0_g_cm2, ec_mev, dedx_mip, g4_name):
    return Material(name, Z, A, density, 10.0 * x0_g_cm2 / density, ec_mev, dedx_mip, g4_name)


# name: Z, A, density [g/cm3], X0 [g/cm2], E_c(e-) [MeV], dE/dx_min [MeV cm2/g]   (PDG)
MATERIALS: dict[str, Material] = {m.name: m for m in [
    _m("W", 74, 183.84, 19.30, 6.76, 7.97, 1.145, "G4_W"),
    _m("Pb", 82, 207.2, 11.35, 6.37, 7.43, 1.122, "G4_Pb"),
    _m("Fe", 26, 55.845, 7.874, 13.84, 21.68, 1.451, "G4_Fe"),
    _m("Cu", 29, 63.546, 8.96, 12.86, 19.42, 1.403, "G4_Cu"),
    _m("Si", 14, 28.0855, 2.329, 21.82, 40.19, 1.664, "G4_Si"),
    _m("LAr", 18, 39.948, 1.396, 19.55, 32.84, 1.519, "G4_lAr"),
    # PbWO4: mass fractions Pb 0.455, W 0.404, O 0.141 give Z_eff 68.4, A_eff 169.8
    _m("PbWO4", 68.36, 169.8, 8.30, 7.39, 9.64, 1.229, "G4_PbWO4"),
    # polystyrene scintillator (C8H8)n: Z/A-weighted Z_eff 5.6
    _m("Scintillator", 5.61, 11.16, 1.060, 43.79, 93.11, 2.052, "G4_POLYSTYRENE"),
    _m("Air", 7.36, 14.71, 0.0012048, 36.62, 87.92, 1.815, "G4_AIR"),
]}
_ALIASES = {"tungsten": "W", "lead": "Pb", "iron": "Fe", "steel": "Fe", "copper": "Cu",
            "silicon": "Si", "liquid_argon": "LAr", "lar": "LAr", "pbwo4": "PbWO4",
            "polystyrene": "Scintillator", "scintillator": "Scintillator", "air": "Air"}
_ALIASES.update({m.g4_name.lower(): m.name for m in MATERIALS.values()})


def get_material(name: str | Material) -> Material:
    """Look a material up by pcshower name, common name or Geant4 NIST name (case-insensitive)."""
    if isinstance(name, Material):
        return name
    if name in MATERIALS:
        return MATERIALS[name]
    key = str(name).strip().lower()
    for canonical in MATERIALS:
        if canonical.lower() == key:
            return MATERIALS[canonical]
    if key in _ALIASES:
        return MATERIALS[_ALIASES[key]]
    raise ValueError(f"unknown material {name!r}; known materials: {', '.join(MATERIALS)} "
                     f"(or their Geant4 names such as G4_W)")
