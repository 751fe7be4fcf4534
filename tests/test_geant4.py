"""Geant4 engine: approximate tables, data-set detection, conservation, determinism, geometry, frames."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcshower.physics.stack import Slab, Stack
from pcshower.simulate.geant4 import datasets

HAVE_G4 = importlib.util.find_spec("geant4_pybind") is not None
needs_g4 = pytest.mark.skipif(not HAVE_G4, reason="geant4-pybind is not installed: "
                              "pip install 'pcshower[geant4]' to run the Geant4 engine tests")


def ild_like() -> Stack:
    """ILD-like Si-W: 20 x (2.1 mm W + 0.5 mm Si) then 10 x (4.2 mm W + 0.5 mm Si)."""
    return Stack(tuple([Slab("W", 2.1), Slab("Si", 0.5, True)] * 20
                       + [Slab("W", 4.2), Slab("Si", 0.5, True)] * 10), "ild-like")


# ---------------------------------------------------------------- tables (no Geant4 needed)
def test_bremsstrahlung_table_reaches_complete_screening_formula():
    """At 10 GeV and small κ the table is the complete-screening Bethe–Heitler value."""
    Z, kappa = 74, np.array([1e-12, 0.3, 0.6])
    fc = datasets.coulomb_correction(Z)
    expected = 4 * datasets.ALPHA * datasets.R_E_CM**2 * 1e27 * (
        (4 / 3 - 4 / 3 * kappa + kappa**2) * (math.log(184.15 * Z ** (-1 / 3)) - fc) + (1 - kappa) / 9)
    got = datasets.bremsstrahlung_chi_mb(Z, np.array([1e4]), kappa)[0]
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    # screening weakens at low energy; no negative cross-sections anywhere
    low = datasets.bremsstrahlung_chi_mb(Z, np.array([0.01, 1.0, 100.0]), np.linspace(0, 1, 11))
    assert (low >= 0).all() and low[0, 0] < low[2, 0]


def test_photoelectric_approximation_near_xcom():
    # XCOM photo-effect: W at 100 keV ~1.2 kb, Pb at 1 MeV ~ 18 b
    assert 900 < datasets.photoelectric_cross_section_barn(74, 0.1) < 1800
    assert 8 < datasets.photoelectric_cross_section_barn(82, 1.0) < 30


def test_written_tables_have_geant4_layouts(tmp_path):
    root = datasets.write_approximate_tables(tmp_path)
    assert (root / "PCSHOWER_APPROXIMATE").is_file()
    head = (root / "brem_SB" / "br74").read_text().split("\n")
    kind, nx, ny = map(int, head[0].split())
    assert len(head[1].split()) == nx and len(head[2].split()) == ny
    assert len([ln for ln in head[3:] if ln.strip()]) == ny
    pe = (root / "epics2017" / "phot" / "pe-high-74.dat").read_text().split()
    assert pe[:2] == ["1", "1"] and len(pe) == 3 + 7
    cs = (root / "epics2017" / "phot" / "pe-cs-14.dat").read_text().split("\n")
    assert int(cs[1]) == len([ln for ln in cs[2:] if ln.strip()])
    # written once: a second call reuses the folder
    assert datasets.write_approximate_tables(tmp_path) == root


def test_real_data_detected_only_with_real_tables(tmp_path):
    fake = tmp_path / "G4EMLOW8.6"
    (fake / "brem_SB").mkdir(parents=True)
    (fake / "brem_SB" / "br1").write_text("x")
    (fake / "livermore").mkdir()
    (tmp_path / "G4ENSDFSTATE3.0").mkdir()
    got = datasets.resolve_data_environment({"GEANT4_DATA_DIR": str(tmp_path)})
    assert not got["approximate"] and got["label"] == "geant4"
    assert got["real"]["G4ENSDFSTATEDATA"].endswith("G4ENSDFSTATE3.0")
    assert datasets.resolve_data_environment({"G4LEDATA": str(fake)})["label"] == "geant4"
    # an empty folder, or our own generated tables, are not real data
    assert datasets.resolve_data_environment({"GEANT4_DATA_DIR": str(tmp_path / "G4ENSDFSTATE3.0")})[
        "approximate"]
    ours = datasets.write_approximate_tables(tmp_path / "cache")
    assert datasets.resolve_data_environment({"G4LEDATA": str(ours)})["label"] == datasets.APPROXIMATE_LABEL


# ---------------------------------------------------------------- Geant4 runs
@needs_g4
def test_no_download_prompt_and_provenance_in_fresh_process(tmp_path):
    """With no data and CI=true, a fresh process must neither prompt nor download, and label output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("G4") and k != "GEANT4_DATA_DIR"}
    env.update(CI="true", PCSHOWER_GEANT4_DATA=str(tmp_path / "g4cache"))
    code = ("import numpy as np\n"
            "from pcshower.physics.stack import Stack\n"
            "from pcshower.simulate.geant4 import simulate_geant4\n"
            "s = Stack.repeated([('W', 3.5), ('Si', 0.5, True)], 6, 'tiny')\n"
            "sh = simulate_geant4([1.0], 0.0, 0.0, 22, s, seed=1)\n"
            "print('GEN', sh.metadata['generator'], sh.num_points.sum().item() > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GEN geant4-approximate-lowenergy True" in out.stdout
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("pcshower: warning:")]
    assert len(warnings) == 1 and "geant4-approximate-lowenergy" in warnings[0]
    assert (tmp_path / "g4cache" / f"approx-v{datasets.TABLES_VERSION}" / "brem_SB" / "br74").is_file()


@needs_g4
@pytest.mark.parametrize("particle", [22, 11])
def test_energy_conservation(particle):
    from pcshower.simulate.geant4 import run_geant4

    energy = np.array([2.0, 3.5, 5.0])
    rec = run_geant4(energy, 0.0, 0.0, particle, ild_like(), seed=11)
    total = rec.deposited_mev + rec.leakage_mev
    np.testing.assert_allclose(total, energy * 1000.0, rtol=1e-6)
    assert (rec.leakage_mev >= 0).all() and (rec.leakage_mev < 0.2 * energy * 1000).all()
    # active silicon sees a few percent (sampling fraction), not all and not nothing
    frac = rec.active_mev / (energy * 1000.0)
    assert ((frac > 0.005) & (frac < 0.06)).all(), frac
    np.testing.assert_allclose(rec.active_mev, rec.slab_edep_mev[:, ild_like().active_mask].sum(1))


@needs_g4
def test_same_seed_same_steps_and_showers_independent_of_batching():
    from pcshower.simulate.geant4 import simulate_geant4

    stack = ild_like()
    a = simulate_geant4([3.0, 2.0, 4.0], 0.2, 0.1, "e-", stack, seed=5)
    b = simulate_geant4([3.0, 2.0, 4.0], 0.2, 0.1, "e-", stack, seed=5)
    assert torch.equal(a.points, b.points) and torch.equal(a.ptr, b.ptr)
    first = simulate_geant4([3.0], 0.2, 0.1, "e-", stack, seed=5)
    assert torch.equal(first.points, a.points[: a.ptr[1]])
    c = simulate_geant4([3.0, 2.0, 4.0], 0.2, 0.1, "e-", stack, seed=6)
    assert not torch.equal(a.ptr, c.ptr) or not torch.equal(a.points, c.points)


@needs_g4
def test_geometry_has_the_stack_layers():
    from pcshower.simulate.geant4 import run_geant4
    from pcshower.simulate.geant4.engine import get_engine

    stack = Stack.repeated([("Pb", 4.0), ("Scintillator", 3.0, True), ("Air", 1.0)], 7, "pb-sc")
    rec = run_geant4([2.0], 0.0, 0.0, 22, stack, seed=1, transverse_mm=(300.0, 200.0))
    eng = get_engine()
    assert len(eng.active_lvs) == 7 and len(eng.passive_lvs) == 14
    assert {lv.GetMaterial().GetName() for lv in eng.active_lvs} == {"G4_POLYSTYRENE"}
    assert {lv.GetMaterial().GetName() for lv in eng.passive_lvs} == {"G4_Pb", "G4_AIR"}
    box = eng.active_lvs[0].GetSolid()
    assert box.GetZHalfLength() == pytest.approx(1.5) and box.GetXHalfLength() == pytest.approx(150.0)
    assert box.GetYHalfLength() == pytest.approx(100.0)
    # every recorded point lies inside an active slab
    z = rec.points[:, 2]
    slab = np.searchsorted(stack.z_edges_mm, z, side="right") - 1
    assert stack.active_mask[slab].all()
    assert rec.slab_edep_mev.shape == (1, 21)


@needs_g4
def test_geometry_from_yaml_when_available():
    geometry = pytest.importorskip("pcshower.geometry", reason="pcshower.geometry not available yet")
    try:
        geo = geometry.load_geometry("ild")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no 'ild' geometry to load: {err}")
    stack = getattr(geo, "stack", None)
    if not isinstance(stack, Stack):
        pytest.skip("the ild geometry exposes no pcshower.physics.Stack as .stack")
    from pcshower.simulate.geant4 import run_geant4
    from pcshower.simulate.geant4.engine import get_engine

    run_geant4([2.0], 0.0, 0.0, 22, stack, seed=2)
    assert len(get_engine().active_lvs) == stack.num_layers == 30


@needs_g4
def test_frames_inclined_shower():
    from pcshower.simulate.geant4 import run_geant4, simulate_geant4

    stack, theta, phi = ild_like(), math.radians(40.0), 0.5
    det = simulate_geant4([4.0, 4.0], theta, phi, 22, stack, seed=9, frame="detector")
    assert det.frame == "detector" and det.metadata["generator"] in ("geant4", datasets.APPROXIMATE_LABEL)
    p = det.points.double().numpy()
    w = p[:, 3]
    # the energy-weighted mean follows the axis: x/z = tan θ cos φ, y/z = tan θ sin φ
    assert np.average(p[:, 0], weights=w) / np.average(p[:, 2], weights=w) == pytest.approx(
        math.tan(theta) * math.cos(phi), rel=0.1)
    phys = simulate_geant4([4.0, 4.0], theta, phi, 22, stack, seed=9, frame="physics")
    q = phys.points.double().numpy()
    assert abs(np.average(q[:, 0], weights=q[:, 3])) < 0.1 and abs(np.average(q[:, 1], weights=q[:, 3])) < 0.1
    depth_x0 = np.average(q[:, 2], weights=q[:, 3])
    assert 3.0 < depth_x0 < 10.0  # shower maximum of 4 GeV photons is ~6 X0
    rec = run_geant4([4.0, 4.0], theta, phi, 22, stack, seed=9)
    sums = np.add.reduceat(q[:, 3], phys.ptr[:-1].numpy())
    np.testing.assert_allclose(sums, rec.deposited_mev / 4000.0, rtol=1e-4)
    # each layer's points carry the deposit of its sampling cell (active + passive in front)
    from pcshower.physics.sampling import sampling_layers
    from pcshower.simulate.geant4.api import _point_layer
    cell = sampling_layers(stack).cell_of_slab
    layer = _point_layer(det.points.double().numpy(), stack)
    first = np.repeat([True, False], np.diff(phys.ptr.numpy()))
    per_layer = np.bincount(layer[first], weights=q[first, 3] * 4000.0, minlength=30)
    in_cell = np.array([rec.slab_edep_mev[0, cell == c].sum() for c in range(30)])
    seen = rec.slab_edep_mev[0, stack.active_mask] > 0
    ratio = per_layer[seen] / in_cell[seen]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # one common factor (the rest)
    assert 1.0 <= ratio[0] < 1.05
    # one transport recorded in both frames gives each frame's showers
    both = simulate_geant4([4.0, 4.0], theta, phi, 22, stack, seed=9, frame="both")
    for frame, single in (("physics", phys), ("detector", det)):
        assert both[frame].frame == frame
        assert torch.equal(both[frame].points, single.points)
        assert torch.equal(both[frame].ptr, single.ptr)


@needs_g4
def test_bad_input_messages():
    from pcshower.simulate.geant4 import simulate_geant4

    with pytest.raises(ValueError, match="hadron"):
        simulate_geant4([2.0], 0.0, 0.0, "pi+", ild_like(), seed=1)
    with pytest.raises(ValueError, match="below 90 degrees"):
        simulate_geant4([2.0], math.pi / 2, 0.0, 22, ild_like(), seed=1)
    with pytest.raises(ValueError, match="frame"):
        simulate_geant4([2.0], 0.0, 0.0, 22, ild_like(), seed=1, frame="lab")


@needs_g4
def test_physics_frame_depth_follows_the_slabs_radiation_lengths():
    from pcshower.simulate.geant4 import simulate_geant4

    stack = ild_like()
    det = simulate_geant4([2.0, 3.0], 0.0, 0.0, 22, stack, seed=4, frame="detector")
    phys = simulate_geant4([2.0, 3.0], 0.0, 0.0, 22, stack, seed=4, frame="physics")
    assert torch.equal(det.ptr, phys.ptr)  # same showers, same points
    z_mm = det.points[:, 2].double().numpy()
    expected = np.interp(z_mm, stack.z_edges_mm, stack.x0_edges)
    np.testing.assert_allclose(phys.points[:, 2].double().numpy(), expected, rtol=1e-5, atol=1e-5)
    rm = stack.effective_medium().rm_mm
    np.testing.assert_allclose(phys.points[:, 0].double().numpy() * rm, det.points[:, 0].double().numpy(),
                               rtol=1e-4, atol=1e-3)


@needs_g4
def test_empty_request_gives_empty_showers():
    from pcshower.simulate.geant4 import simulate_geant4

    s = simulate_geant4([], 0.0, 0.0, 22, ild_like(), seed=1)
    assert s.num_showers == 0 and s.points.shape == (0, 4)


# ---------------------------------------------------------------- recording
def test_split_along_chord_conserves_energy_and_stays_on_the_step():
    from pcshower.simulate.geant4.engine import split_along_chord

    a = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    b = np.array([[0.3, 0.0, 0.0], [1.0, 3.5, 1.0]])  # 0.3 mm and 2.5 mm long
    pts, step = split_along_chord(a, b, np.array([2.0, 5.0]), max_mm=1.0)
    assert step.tolist() == [0, 1, 1, 1]
    assert len(pts) == 1 + 3
    np.testing.assert_allclose(pts[0], [0.15, 0.0, 0.0, 2.0])  # short step: its mid-point
    np.testing.assert_allclose(pts[1:, 1], [1.0 + 2.5 / 6, 1.0 + 2.5 / 2, 1.0 + 2.5 * 5 / 6])
    np.testing.assert_allclose(pts[1:, 3], 5.0 / 3)
    assert pts[:, 3].sum() == pytest.approx(7.0)


@needs_g4
def test_recording_matches_an_independent_stepping_recorder():
    """The engine's scorers against a stepping action that sees every step, on the same events.

    Both record the same Geant4 events, so per-layer energies must agree to rounding; hit counts,
    the radial profile and the cell spectrum on ILD cells (5.088 mm, > 0.1 MeV) differ only by
    where a step's deposit is put (pieces of <= 1 mm along the step vs 0.1 mm). Dropping the
    photon-step deposits (the below-cut Compton/photo-electrons of the halo) must fail the same
    comparison, so the test can tell a faithful recording from the former one.
    """
    from pcshower.simulate.geant4 import run_geant4
    from pcshower.simulate.geant4.compare import shower_observables
    from pcshower.simulate.geant4.engine import get_engine, reference_points

    stack = ild_like()
    n, energy, theta = 6, 5.0, 0.3
    ee, tt, pp = np.full(n, energy), np.full(n, theta), np.zeros(n)
    rec = run_geant4(ee, theta, 0.0, 22, stack, seed=21, reference=True)
    assert not get_engine()._reference_on  # switched off again after the run
    ref_pts, ref_ptr = reference_points(rec, stack)
    eng = shower_observables(rec.points, rec.ptr, ee, tt, pp, stack)
    ref = shower_observables(ref_pts, ref_ptr, ee, tt, pp, stack)
    np.testing.assert_allclose(eng["long"], ref["long"], rtol=1e-9, atol=1e-15)
    assert eng["hits"].sum() == pytest.approx(ref["hits"].sum(), rel=0.03)
    assert eng["sigma_t_mm"].mean() == pytest.approx(ref["sigma_t_mm"].mean(), rel=0.03)
    assert abs(eng["mean_log10_cell_mev"].mean() - ref["mean_log10_cell_mev"].mean()) < 0.02
    inner = slice(0, 25)  # radial bins up to 40 mm hold > 95% of the energy
    np.testing.assert_allclose(eng["radial"].sum(0)[inner], ref["radial"].sum(0)[inner], rtol=0.15)
    # photon steps carry a few percent of the silicon energy at their own positions
    frac = rec.points[rec.photon_step, 3].sum() / rec.points[:, 3].sum()
    assert 0.02 < frac < 0.15, frac
    keep = ~rec.photon_step
    counts = np.array([keep[a:b].sum() for a, b in zip(rec.ptr[:-1], rec.ptr[1:])])
    no_photons = shower_observables(rec.points[keep], np.concatenate([[0], np.cumsum(counts)]),
                                    ee, tt, pp, stack)
    assert no_photons["hits"].sum() < 0.95 * ref["hits"].sum()
    # the next run records without the reference
    plain = run_geant4([2.0], 0.0, 0.0, 22, stack, seed=1)
    assert plain.reference_steps is None
    with pytest.raises(ValueError, match="reference=True"):
        reference_points(plain, stack)
