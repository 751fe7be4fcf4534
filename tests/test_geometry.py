"""Geometry adapters: loading, validation, known points in known cells, conservation, custom YAML."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pcshower import Showers
from pcshower.geometry import GeometryError, Placement, list_geometries, load_geometry

BUILTIN = ["allegro", "calochallenge_ds1_photons", "calochallenge_ds1_pions", "calochallenge_ds2",
           "calochallenge_ds3", "cld", "ild", "odd", "par04_scipb"]


def detector_shower(points, position, theta, phi, energy=10.0):
    """One detector-frame shower: local (x, y, depth) mm and visible MeV about its impact."""
    return Showers.from_list([torch.tensor(points, dtype=torch.float32)], energy=[energy],
                             theta=[theta], phi=[phi], position=[position], frame="detector")


# ------------------------------------------------------------------------------ loading
def test_builtin_geometries_load_and_have_published_counts():
    assert set(BUILTIN) <= set(list_geometries())
    counts = {"calochallenge_ds1_photons": 368, "calochallenge_ds1_pions": 533,
              "calochallenge_ds2": 6480, "calochallenge_ds3": 40500}
    for name, n in counts.items():
        assert load_geometry(name).num_cells == n
    ild = load_geometry("ild")
    assert ild.num_layers == 30 and ild.stack.num_layers == 30
    assert ild.stack.total_thickness_mm == pytest.approx(20 * 2.6 + 10 * 4.7)
    assert load_geometry("cld").num_layers == 40
    allegro = load_geometry("allegro")
    assert allegro.num_layers == 11
    # 800 theta bins; 4x merged except layer 1; 1536 planes merged by 2
    assert allegro.num_cells == 768 * (200 * 10 + 800)
    # a projective particle crosses 2 plates in layer 0 and 4 in the others (k4geo comment)
    assert allegro.stack.num_layers == 2 + 10 * 4
    import pcshower
    assert pcshower.load_geometry("ILD") is load_geometry("ild")
    # OpenDataDetector ECAL: 48 layers of 5.05 mm (OpenDataECal.xml), 16 staves + 2 endcaps
    odd = load_geometry("odd")
    assert odd.num_layers == 48 and odd.stack.total_thickness_mm == pytest.approx(242.4)
    assert odd.summary()["modules"] == 18
    # Par04 Sci-Pb: 45 x (4.4 mm Pb + 1.2 mm polystyrene) = 45 x 0.787 X0 (PDG X0: Pb 5.61 mm,
    # polystyrene 413 mm), on an 18 x 50 x 45 mesh
    par04 = load_geometry("par04_scipb")
    assert par04.num_cells == 18 * 50 * 45 and par04.num_layers == 45
    assert par04.summary()["depth_x0"] == pytest.approx(45 * (4.4 / 5.612 + 1.2 / 413.1), rel=2e-3)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ValueError, match="unknown geometry 'atlas'.*ild"):
        load_geometry("atlas")


# --------------------------------------------------------------------------- validation
GOOD = """
name: box
source: a test
stack:
  - repeat: 3
    slabs:
      - {material: W, thickness_mm: 2.0}
      - {material: Si, thickness_mm: 0.5, active: true}
readout: {kind: planar, cell_size_mm: 5.0}
placement:
  plane: {distance_mm: 0.0, half_width_mm: [50.0, 50.0]}
"""


def write(tmp_path, text, name="geo.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("edit, key, expected", [
    (("source: a test\n", ""), "source", "missing required key"),
    (("cell_size_mm: 5.0", "cell_size_mm: five"), "readout.cell_size_mm", "expected a positive number"),
    (("repeat: 3", "repeat: 2.5"), r"stack\[0\].repeat", "expected an integer"),
    (("thickness_mm: 2.0", "thickness_mm: -2.0"), r"stack\[0\].slabs\[0\].thickness_mm",
     "thickness must be positive"),
    (("material: W", "material: Unobtainium"), r"stack\[0\].slabs\[0\].material", "unknown material"),
    (("kind: planar", "kind: hexagonal"), "readout.kind", "unknown readout kind 'hexagonal'"),
    (("  - repeat: 3\n", "  - repeat: 3\n    start_mm: 0.0\n"), None, None),
])
def test_validation_errors_name_file_key_and_expectation(tmp_path, edit, key, expected):
    path = write(tmp_path, GOOD.replace(*edit))
    if key is None:  # a harmless edit still loads
        assert load_geometry(path).num_layers == 3
        return
    with pytest.raises(GeometryError) as err:
        load_geometry(path)
    message = str(err.value)
    assert str(path) in message
    assert pytest.importorskip("re").search(key, message), message
    assert expected in message


def test_overlapping_layers_are_rejected(tmp_path):
    text = GOOD.replace("readout: {", """  - start_mm: 5.0
    slabs:
      - {material: Pb, thickness_mm: 3.0}
      - {material: Si, thickness_mm: 0.5, active: true}
readout: {""")
    with pytest.raises(GeometryError, match=r"stack\[1\].start_mm: overlapping layers: this group "
                                            r"starts at 5.0 mm but the previous one ends at 7.5 mm"):
        load_geometry(write(tmp_path, text))
    # a gap instead of an overlap is filled with air
    geo = load_geometry(write(tmp_path, text.replace("start_mm: 5.0", "start_mm: 10.0"), "gap.yaml"))
    assert geo.stack.slabs[6].material.name == "Air" and geo.stack.slabs[6].thickness_mm == 2.5


def test_overlapping_radial_bins_and_layer_count_mismatch(tmp_path):
    text = GOOD.replace("readout: {kind: planar, cell_size_mm: 5.0}", """readout:
  kind: cylindrical
  layers:
    - {repeat: 3, n_alpha: 4, r_edges_mm: [0, 5, 5, 10]}""")
    with pytest.raises(GeometryError, match=r"readout.layers\[0\].r_edges_mm: overlapping radial bins"):
        load_geometry(write(tmp_path, text))
    text = text.replace("[0, 5, 5, 10]", "[0, 5, 10]").replace("repeat: 3, n_alpha", "repeat: 2, n_alpha")
    with pytest.raises(GeometryError, match="readout.layers: expected 3 layers"):
        load_geometry(write(tmp_path, text, "count.yaml"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(GeometryError, match="not valid YAML"):
        load_geometry(write(tmp_path, "stack: [unclosed"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_geometry(tmp_path / "nope.yaml")
    with pytest.raises(GeometryError, match=r"stack\[0\].slabs: a read-out layer needs at least one"):
        load_geometry(write(tmp_path, GOOD.replace(", active: true", ""), "passive.yaml"))


# ---------------------------------------------------------------------------- placement
def test_local_direction_and_default_impact():
    box = load_geometry("calochallenge_ds2")  # one plane facing +z: identity
    t, p = box.local_direction([0.3, 1.0], [0.2, -2.0])
    assert torch.allclose(t, torch.tensor([0.3, 1.0], dtype=torch.float64))
    assert torch.allclose(p, torch.tensor([0.2, -2.0], dtype=torch.float64))
    ild = load_geometry("ild")
    t, p = ild.local_direction([math.pi / 2, math.pi / 2 - 0.2], [0.0, 0.1])
    assert t[0] == pytest.approx(0.0, abs=1e-12)  # barrel: theta = 90 deg is normal incidence
    # stave 0 faces x; a direction tilted by 0.2 rad in theta, 0.1 rad in phi
    assert t[1] == pytest.approx(math.acos(math.cos(0.2) * math.cos(0.1)), abs=1e-9)
    imp = ild.default_impact([math.pi / 2, 0.2], [0.0, 0.0])
    assert torch.allclose(imp[0], torch.tensor([1804.8, 0.0, 0.0], dtype=torch.float64), atol=1e-9)
    assert imp[1, 2] == pytest.approx(2411.8)  # theta = 0.2 rad enters the +z endcap
    assert torch.isnan(ild.default_impact([0.0], [0.0])).all()  # through the endcap hole
    allegro = load_geometry("allegro")
    assert allegro.default_impact([math.pi / 2], [1.0])[0, :2].norm() == pytest.approx(2172.8)
    t, _ = allegro.local_direction([math.pi / 2 - 0.3], [1.0])
    assert t[0] == pytest.approx(0.3)


# ---------------------------------------------------------------------- known cells
def test_planar_known_cells_and_boundaries():
    ild = load_geometry("ild")
    # staves are trapezoids widening with depth: the grid spans the back face (99 mm deep)
    nu = 2 * math.ceil((1804.8 + 99.0) * math.tan(math.pi / 8) / 5.088)
    nv = 2 * math.ceil(2350 / 5.088)
    assert (nu, nv) == (310, 924)
    cases = [  # (u, v, depth) -> (layer, iu, iv)
        ((1.0, 1.0, 2.2), (0, 155, 462)),
        ((0.0, 0.0, 2.2), (0, 155, 462)),     # on the cell edge at the module centre: upper cell
        # float32 cannot hold the edge at 5.088 mm: the nearest values lie on either side
        ((float(np.float32(5.088)), 0.0, 2.2), (0, 155, 462)),
        ((float(np.nextafter(np.float32(5.088), np.float32(6))), 0.0, 2.2), (0, 156, 462)),
        ((-1e-6, -1e-6, 2.2), (0, 154, 461)),
        ((0.0, 0.0, 2.59), (0, 155, 462)),    # the first layer ends at 2.6 mm
        ((0.0, 0.0, 2.61), (1, 155, 462)),
        ((12.0, -30.0, 52.0 + 4.7 * 9.5), (29, 157, 456)),
    ]
    for (u, v, z), (layer, iu, iv) in cases:
        s = detector_shower([[u, v, z, 1.0]], [1804.8, 0.0, 0.0], math.pi / 2, 0.0)
        hits = ild.project(s)
        expected = (layer * nv + iv) * nu + iu
        assert hits.cell_id.tolist() == [expected], (u, v, z)
        assert int(ild.cell_layer(hits.cell_id)) == layer
    centre = ild.cell_centers(torch.tensor([(0 * nv + 462) * nu + 155]))
    assert torch.allclose(centre, torch.tensor([[1804.8 + 2.35, 2.544, 2.544]], dtype=torch.float64))
    # stave 2 faces +y: u points along -x
    s = detector_shower([[3.0, 0.0, 1.0, 1.0]], [0.0, 1804.8, 0.0], math.pi / 2, math.pi / 2)
    hits = ild.project(s)
    assert hits.cell_id.tolist() == [2 * 30 * nu * nv + 462 * nu + 155]
    assert ild.cell_centers(hits.cell_id)[0, 0] == pytest.approx(-2.544)
    # beyond the barrel's length and behind the stack: outside, counted
    s = detector_shower([[0.0, 2400.0, 1.0, 2.0], [0.0, 0.0, 500.0, 3.0], [0.0, 0.0, 1.0, 4.0]],
                        [1804.8, 0.0, 0.0], math.pi / 2, 0.0)
    hits = ild.project(s)
    assert hits.outside_points.tolist() == [2] and hits.outside_energy.tolist() == [5.0]
    assert hits.energy.tolist() == [4.0]


def test_points_leaving_a_stave_sideways_are_handed_to_the_next_stave():
    ild = load_geometry("ild")
    nu, nv = 310, 924
    # 800 mm along u from the centre of stave 0 (half width 747.6 mm), 1 mm deep: global
    # (1805.8, 800, 0) lies in the sector of stave 1, whose face normal points at 45 deg
    s = detector_shower([[800.0, 0.0, 1.0, 2.0]], [1804.8, 0.0, 0.0], math.pi / 2, 0.0)
    hits = ild.project(s)
    c, sn = math.cos(math.pi / 4), math.sin(math.pi / 4)
    gx, gy = 1805.8, 800.0
    depth = gx * c + gy * sn - 1804.8
    u = -(gx - 1804.8 * c) * sn + (gy - 1804.8 * sn) * c
    layer = int(depth // 2.6)
    assert 0 < depth < 52.0 and abs(u) < 747.6
    iu = math.floor(u / 5.088) + nu // 2
    assert hits.outside_points.tolist() == [0]
    assert hits.cell_id.tolist() == [1 * 30 * nu * nv + (layer * nv + 462) * nu + iu]
    assert hits.energy.tolist() == [2.0]
    # at 40 mm depth the trapezoidal stave 0 reaches |u| = 747.6 + 40 tan(22.5 deg) = 764.2 mm
    s = detector_shower([[760.0, 0.0, 40.0, 1.0]], [1804.8, 0.0, 0.0], math.pi / 2, 0.0)
    hits = ild.project(s)
    assert hits.cell_id.tolist() == [(15 * nv + 462) * nu + math.floor(760.0 / 5.088) + nu // 2]
    # a shower entering stave 1 next to the corner and heading for stave 0 stays contained
    pts = torch.stack([torch.zeros(200), torch.zeros(200), torch.linspace(0.0, 20.0, 200),
                       torch.full((200,), 1 / 200)], 1)
    s = Showers.from_list([pts], energy=[50.0], theta=[math.pi / 2], phi=[0.4])
    assert ild.project(s, fluctuate=False).outside_points.tolist() == [0]


def test_cylindrical_known_voxels_and_calochallenge_order():
    ds2 = load_geometry("calochallenge_ds2")
    # impact on the plane at z = 800 mm; r = 5 mm along u -> ir 1; alpha = 0 -> ia 8 of 16
    cases = [((5.0, 0.0, 1.0), 0 * 144 + 8 * 9 + 1),
             ((4.65, 0.0, 1.0), 8 * 9 + 1),               # on the radial edge: the outer bin
             ((0.0, 5.0, 1.0), 12 * 9 + 1),               # alpha = pi/2
             ((-5.0, -1e-9, 1.0), 0 * 9 + 1),             # alpha just above -pi: first bin
             ((0.0, 0.0, 3.5), 144 + 8 * 9 + 0),          # layer 1 starts at 3.4 mm
             ((41.0, 0.0, 152.0), 44 * 144 + 8 * 9 + 8)]
    for (u, v, z), expected in cases:
        s = detector_shower([[u, v, z, 1.0]], [0.0, 0.0, 0.0], 0.0, 0.0)
        assert ds2.project(s).cell_id.tolist() == [expected], (u, v, z)
    # the dense layout reshapes to CaloChallenge's (N, layer, alpha, r)
    s = detector_shower([[0.0, 5.0, 40.0, 7.0]], [0.0, 0.0, 0.0], 0.0, 0.0)
    dense = ds2.project(s, dense=True)
    assert dense.shape == (1, 6480)
    assert dense.reshape(1, 45, 16, 9)[0, 11, 12, 1] == 7.0
    # beyond the last radial edge: outside
    s = detector_shower([[42.0, 0.0, 1.0, 1.0]], [0.0, 0.0, 0.0], 0.0, 0.0)
    assert ds2.project(s).outside_points.tolist() == [1]
    # bins are centred on the impact point, wherever it is on the face
    s = detector_shower([[5.0, 0.0, 1.0, 1.0]], [100.0, -40.0, 800.0], 0.0, 0.0)
    assert ds2.project(s).cell_id.tolist() == [8 * 9 + 1]
    # dataset 1 photons: layer 12 is the fifth layer, 1 alpha bin, edges 0,100,200,...
    ds1 = load_geometry("calochallenge_ds1_photons")
    depth12 = float(ds1.layer_span_mm[4].mean())
    s = detector_shower([[150.0, 0.0, depth12, 1.0]], [0.0, 0.0, 0.0], 0.0, 0.0)
    assert ds1.project(s).cell_id.tolist() == [368 - 5 + 1]


def test_inclined_known_cells():
    allegro = load_geometry("allegro")
    rmin, a = 2172.8, math.radians(50.18)
    r = 2200.0  # layer 1 (2187.8 - 2218.9 mm)
    s_len = -rmin * math.cos(a) + math.sqrt(r * r - (rmin * math.sin(a)) ** 2)
    lean = math.atan2(s_len * math.sin(a), rmin + s_len * math.cos(a))
    phi = 2 * math.pi / 1536 * 10.5 + lean  # in the gap that starts at plate 10 -> module cell 5
    theta = math.pi / 2 - 0.01  # theta bin round((theta - 0.5902785) / grid) = 395, unmerged in layer 1
    k = math.floor((theta - 0.5902785) / 0.00245436925 + 0.5)
    assert k == 395
    impact = [rmin * math.cos(phi), rmin * math.sin(phi), rmin / math.tan(theta)]
    z_at_r = r / math.tan(theta)
    s = detector_shower([[0.0, z_at_r - impact[2], r - rmin, 1.0]], impact, math.pi / 2, phi)
    hits = allegro.project(s)
    assert hits.cell_id.tolist() == [200 * 768 + 395 * 768 + 5]
    assert int(allegro.cell_layer(hits.cell_id)) == 1
    # same point in layer 5 (merged 4 in theta): theta cell 395 // 4 = 98
    r5 = 0.5 * float(allegro.readout.radii[5] + allegro.readout.radii[6])
    s_len = -rmin * math.cos(a) + math.sqrt(r5 * r5 - (rmin * math.sin(a)) ** 2)
    lean5 = math.atan2(s_len * math.sin(a), rmin + s_len * math.cos(a))
    phi5 = 2 * math.pi / 1536 * 10.5 + lean5
    g = [r5 * math.cos(phi5), r5 * math.sin(phi5), r5 / math.tan(theta)]
    imp5 = [rmin * math.cos(phi5), rmin * math.sin(phi5), g[2]]
    s = detector_shower([[0.0, 0.0, r5 - rmin, 1.0]], imp5, math.pi / 2, phi5)
    offset5 = 200 * 768 + 800 * 768 + 3 * 200 * 768
    assert allegro.project(s).cell_id.tolist() == [offset5 + 98 * 768 + 5]
    centre = allegro.cell_centers(torch.tensor([offset5 + 98 * 768 + 5]))[0]
    assert math.hypot(centre[0], centre[1]) == pytest.approx(r5)
    # beyond the barrel's length: outside
    s = detector_shower([[0.0, 4000.0, 20.0, 1.0]], impact, math.pi / 2, phi)
    assert allegro.project(s).outside_points.tolist() == [1]


def test_inclined_direction_moves_points_along_the_axis(tmp_path):
    """A physics-frame point on the shower axis at 2 X0, incident at 30 deg."""
    text = """
    name: si_block
    source: test
    stack:
      - repeat: 200
        slabs: [{material: Si, thickness_mm: 1.0, active: true}]
    readout: {kind: planar, cell_size_mm: 10.0}
    placement:
      plane: {distance_mm: 0.0, half_width_mm: [1000.0, 1000.0]}
    """
    geo = load_geometry(write(tmp_path, text))
    x0 = geo.x0_eff_mm
    assert x0 == pytest.approx(93.7, rel=2e-3)  # silicon, PDG 21.82 g/cm2 / 2.329 g/cm3
    pts = torch.tensor([[0.0, 0.0, 2.0, 0.5]])
    s = Showers.from_list([pts], energy=[1.0], theta=[math.radians(30)], phi=[0.0])
    hits = geo.project(s, fluctuate=False)
    u, depth = 2 * x0 * math.sin(math.radians(30)), 2 * x0 * math.cos(math.radians(30))
    layer, iu, iv = int(depth // 1.0), math.floor(u / 10.0) + 100, 100
    assert hits.cell_id.tolist() == [(layer * 200 + iv) * 200 + iu]
    assert hits.energy.tolist() == [pytest.approx(500.0)]  # fully active: all of it is seen
    # the same through an explicit placement (phi = pi/2 turns the offset to +v)
    hits = geo.project(s, Placement(theta=[math.radians(30)], phi=[math.pi / 2]), fluctuate=False)
    iu, iv = 100, math.floor(u / 10.0) + 100
    assert hits.cell_id.tolist() == [(layer * 200 + iv) * 200 + iu]


# ----------------------------------------------------------------- energy bookkeeping
def random_physics_showers(n=20, points=400, seed=0, theta=math.pi / 2, phi=0.0):
    g = torch.Generator().manual_seed(seed)
    total = n * points
    x = torch.randn(total, generator=g) * 1.5
    y = torch.randn(total, generator=g) * 1.5
    z = torch.rand(total, generator=g) * 30.0 - 1.0  # some in front of and behind the stack
    e = torch.rand(total, generator=g) / points * 2
    return Showers.from_counts(torch.stack([x, y, z, e], 1), [points] * n, energy=torch.full((n,), 20.0),
                               theta=theta, phi=phi)


def test_energy_conserved_up_to_outside_energy(tmp_path):
    text = """
    name: fully_active
    source: test
    stack:
      - repeat: 50
        slabs: [{material: PbWO4, thickness_mm: 5.0, active: true}]
    readout: {kind: planar, cell_size_mm: 10.0}
    placement:
      plane: {distance_mm: 0.0, half_width_mm: [60.0, 60.0]}
    """
    geo = load_geometry(write(tmp_path, text))
    s = random_physics_showers(theta=0.4, phi=0.3)
    hits = geo.project(s, fluctuate=False)
    per_shower = torch.zeros(len(s), dtype=torch.float64).index_add_(0, hits.batch, hits.energy.double())
    total = torch.zeros(len(s), dtype=torch.float64).index_add_(0, s.batch, s.e.double()) * 20_000.0
    assert (hits.outside_points > 0).all() and (per_shower > 0).all()
    torch.testing.assert_close(per_shower + hits.outside_energy.double(), total, rtol=1e-5, atol=1e-3)
    # sampling stacks: what is inside is seen with the stack's sampling fractions
    from pcshower.physics.sampling import sampling_layers
    for name in ("ild", "cld", "calochallenge_ds2", "allegro"):
        geo = load_geometry(name)
        theta = 0.0 if name.startswith("calo") else math.pi / 2
        s = random_physics_showers(theta=theta)
        hits = geo.project(s, fluctuate=False)
        frac = sampling_layers(geo.stack).sampling_fraction
        seen = torch.zeros(len(s), dtype=torch.float64).index_add_(0, hits.batch, hits.energy.double())
        total = torch.zeros(len(s), dtype=torch.float64).index_add_(0, s.batch, s.e.double()) * 20_000.0
        inside = total - hits.outside_energy.double()
        # times the Geant4-tuned sampling response where the stack has a tune (normal incidence)
        from pcshower.simulate.tuning import sampling_scale
        inside = inside * sampling_scale(geo.stack, s.energy, torch.zeros(len(s)))
        assert (hits.outside_points > 0).all(), name  # the points at negative depth
        # lower bound 2 % loose: material behind the last active slab is inside but seen by no layer
        assert (seen >= frac.min() * inside * 0.98).all(), name
        assert (seen <= frac.max() * inside * 1.001).all(), name


def test_same_seed_same_hits_and_fluctuations_change_them():
    ild = load_geometry("ild")
    s = random_physics_showers(n=5)
    a = ild.project(s, generator=torch.Generator().manual_seed(7))
    b = ild.project(s, generator=torch.Generator().manual_seed(7))
    c = ild.project(s, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.cell_id, b.cell_id) and torch.equal(a.energy, b.energy)
    assert not (a.energy.numel() == c.energy.numel() and torch.equal(a.energy, c.energy))
    mean = ild.project(s, fluctuate=False)
    assert a.energy.sum() == pytest.approx(float(mean.energy.sum()), rel=0.05)


def test_showers_that_miss_are_reported_not_dropped():
    ild = load_geometry("ild")
    s = random_physics_showers(n=3, theta=0.0)  # along the beam: through the endcap hole
    hits = ild.project(s)
    assert hits.num_hits.tolist() == [0, 0, 0]
    assert hits.outside_points.tolist() == [400, 400, 400]
    with pytest.raises(ValueError, match="too many for a dense"):
        ild.project(s, dense=True)
    with pytest.raises(ValueError, match="belong to geometry 'cld'"):
        ild.project(Showers.from_list([np.zeros((1, 4))], energy=[1.0], frame="detector", geometry="cld"))


# ----------------------------------------------------------------- custom, end to end
def test_custom_yaml_end_to_end(tmp_path):
    text = """
    name: my_hcal
    title: a test-beam Fe/scintillator block with 3 cm tiles and an iron absorber in front
    source: written in a test
    stack:
      - {readout: false, slabs: [{material: Fe, thickness_mm: 20.0}]}
      - repeat: 38
        slabs:
          - {material: steel, thickness_mm: 17.4}
          - {material: scintillator, thickness_mm: 3.0, active: true}
    readout: {kind: planar, cell_size_mm: [30.0, 30.0]}
    placement:
      plane: {distance_mm: 1000.0, half_width_mm: [450.0, 450.0]}
    """
    geo = load_geometry(write(tmp_path, text, "my_hcal.yaml"))
    assert geo.name == "my_hcal" and geo.num_layers == 38
    assert geo.num_cells == 38 * 30 * 30
    assert float(geo.layer_span_mm[0, 0]) == pytest.approx(20.0)
    s = random_physics_showers(n=4, theta=0.1, phi=1.0)
    hits = geo.project(s, generator=torch.Generator().manual_seed(0))
    assert (hits.num_hits > 0).all()
    assert int(geo.cell_layer(hits.cell_id).max()) < 38
    centres = geo.cell_centers(hits.cell_id)
    assert (centres[:, 2] > 1020.0).all() and (centres[:, :2].abs() < 450.0).all()
    from pcshower.io import read_hits_parquet, write_hits_parquet
    path = write_hits_parquet(tmp_path / "hits.parquet", hits, s)
    back, _ = read_hits_parquet(path)
    assert torch.equal(back.cell_id, hits.cell_id)
    torch.testing.assert_close(back.energy, hits.energy)
    torch.testing.assert_close(back.outside_energy, hits.outside_energy)


# ------------------------------------------------------------------------------- CLI
def test_cli_projects_to_calochallenge_hdf5_in_voxel_order(tmp_path, capsys):
    from pcshower.cli import main
    from pcshower.io import read_calochallenge, write_parquet

    # shower 0: one point in layer 2, alpha bin 4 (alpha = -pi/2 + eps), r bin 3 (14 < 16.3 < 18.6)
    # shower 1: one point in layer 44, alpha bin 15, r bin 0
    r, a = 16.3, -math.pi / 2 + 0.01
    pts = [[[r * math.cos(a), r * math.sin(a), 2 * 3.4 + 1.0, 5.0]],
           [[1.0 * math.cos(3.1), 1.0 * math.sin(3.1), 44 * 3.4 + 0.2, 2.0]]]
    showers = Showers.from_list([np.array(p, dtype=np.float32) for p in pts], energy=[10.0, 20.0],
                                frame="detector")
    write_parquet(tmp_path / "in.parquet", showers)
    assert main(["project", str(tmp_path / "in.parquet"), "--geometry", "calochallenge_ds2",
                 "--out", str(tmp_path / "out.h5")]) == 0
    inc, vox = read_calochallenge(tmp_path / "out.h5")
    assert vox.shape == (2, 6480) and inc.ravel().tolist() == [10000.0, 20000.0]
    grid = vox.reshape(2, 45, 16, 9) * 0.033  # (N, layer, alpha, r); DS2 stores Si MeV / 0.033
    assert grid[0, 2, 4, 3] == pytest.approx(5.0) and grid[0].sum() == pytest.approx(5.0)
    assert grid[1, 44, 15, 0] == pytest.approx(2.0) and grid[1].sum() == pytest.approx(2.0)
    with h5py.File(tmp_path / "out.h5") as f:
        meta = json.loads(f.attrs["pcshower"])
    assert meta["energy_scale"] == pytest.approx(1 / 0.033) and "0.033" in meta["energy_convention"]
    assert main(["project", str(tmp_path / "in.parquet"), "--geometry", "ild",
                 "--out", str(tmp_path / "out.h5"), "--overwrite"]) == 2
    assert "needs a CaloChallenge geometry" in capsys.readouterr().err


def test_cli_geometry_list_and_show(tmp_path, capsys):
    from pcshower.cli import main

    assert main(["geometry", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTIN)
    png = tmp_path / "ds3.png"
    assert main(["geometry", "show", "calochallenge_ds3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "40500" in out and png.stat().st_size > 10_000
    assert main(["geometry", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inclined_readout_refuses_a_stack_and_unknown_placement(tmp_path):
    import yaml

    from pcshower.geometry import builtin_geometry_dir

    doc = yaml.safe_load((builtin_geometry_dir() / "allegro.yaml").read_text())
    doc["stack"] = [{"slabs": [{"material": "Pb", "thickness_mm": 2.0},
                               {"material": "LAr", "thickness_mm": 4.0, "active": True}]}]
    with pytest.raises(GeometryError, match="stack: an inclined readout derives its radial stack"):
        load_geometry(write(tmp_path, yaml.safe_dump(doc), "a.yaml"))
    del doc["stack"]
    doc["readout"]["merged_modules"] = [2] * 10
    with pytest.raises(GeometryError, match=r"readout.merged_modules: expected 11 entries"):
        load_geometry(write(tmp_path, yaml.safe_dump(doc), "b.yaml"))
    with pytest.raises(GeometryError, match="placement.torus: unknown placement kind"):
        load_geometry(write(tmp_path, GOOD.replace("  plane:", "  torus:"), "c.yaml"))


@pytest.mark.parametrize("max_cell", [50, 40_000, 10 ** 9, 10 ** 15])
def test_sum_per_cell_equals_unique_in_every_path(max_cell):
    # dense array (small spread), int32 sort, int64 sort: the same hits as torch.unique
    from pcshower.geometry.geometry import _sum_per_cell
    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([0, 700, 1, 0, 1500, 300, 0])
    n = counts.numel()
    batch = torch.repeat_interleave(torch.arange(n), counts)
    cell = torch.randint(0, max_cell, (batch.numel(),), generator=g)
    cell[::3] = cell[1::3][: cell[::3].numel()]  # repeated cells within a shower
    energy = torch.rand(batch.numel(), generator=g, dtype=torch.float64) + 0.01
    cell_id, summed, ptr = _sum_per_cell(batch, cell, energy, n, max_cell)
    key = batch * max_cell + cell
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    expected = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, energy)
    assert torch.equal(cell_id, uniq % max_cell)
    torch.testing.assert_close(summed, expected, rtol=1e-12, atol=0)
    assert ptr.tolist() == [0] + torch.cumsum(torch.bincount(uniq // max_cell, minlength=n), 0).tolist()


def test_calochallenge_energy_convention():
    """Datasets 2 and 3 store Si deposits / 0.033 (CaloChallenge code/evaluate.py); others the
    visible energy. pcshower's evaluation reads them back to visible energy."""
    from pcshower.evaluate.report import sample_from_calochallenge, sample_from_hits

    ds2, ild = load_geometry("calochallenge_ds2"), load_geometry("ild")
    assert ds2.calochallenge_energy_scale == pytest.approx(1 / 0.033)
    assert load_geometry("calochallenge_ds3").calochallenge_energy_scale == pytest.approx(1 / 0.033)
    assert ild.calochallenge_energy_scale == 1.0
    assert ds2.summary()["calochallenge_energy_scale"] == pytest.approx(30.303, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    pts = torch.stack([torch.randn(400, generator=g) * 5, torch.randn(400, generator=g) * 5,
                       torch.rand(400, generator=g) * 150, torch.rand(400, generator=g)], 1)
    showers = Showers.from_counts(pts, torch.tensor([150, 250]), energy=[10.0, 20.0],
                                  frame="detector")
    hits = ds2.project(showers, generator=torch.Generator().manual_seed(1))
    vox = ds2.calochallenge_voxels(hits)
    assert torch.allclose(vox.sum(1), hits.to_dense().double().sum(1) / 0.033)
    cond = {"energy": showers.energy, "theta": torch.zeros(2), "phi": torch.zeros(2)}
    back = sample_from_calochallenge(showers.energy.numpy() * 1000, vox.numpy(), ds2, name="file",
                                     progress=False)
    direct = sample_from_hits(hits, cond, ds2, name="hits", threshold_mev=0.0005, progress=False)
    assert back.settings["threshold_mev"] == pytest.approx(0.0005, rel=1e-3)  # 0.5 keV visible
    for key in ("visible_energy", "num_hits"):
        assert torch.allclose(back.observables.scalars[key], direct.observables.scalars[key],
                              rtol=1e-5)


@pytest.mark.parametrize("section, match", [("{energy_scale: -1}", "positive number"),
                                            ("{energy_scale: 2, units: GeV}", "unknown key")])
def test_calochallenge_section_is_validated(tmp_path, section, match):
    text = (Path(load_geometry("calochallenge_ds2").path).read_text()
            .replace("calochallenge:\n", "calochallenge_old:\n", 1))
    text = "\n".join(line for line in text.splitlines()
                      if not line.startswith(("calochallenge_old:", "  energy_scale:", "  note:",
                                              "    CaloChallenge datasets 2/3")))
    path = tmp_path / "g.yaml"
    path.write_text(text + f"\ncalochallenge: {section}\n")
    with pytest.raises(GeometryError, match=f"calochallenge.*{match}"):
        load_geometry(path)


@pytest.mark.parametrize("name, theta", [("odd", math.pi / 2), ("par04_scipb", 0.0)])
def test_the_new_stacks_keep_every_deposit_in_cells_or_outside(name, theta):
    """Parametrised showers simulated in the stack's detector frame, projected on its readout:
    the cells and the outside energy add up to the visible energy of each shower."""
    from pcshower.simulate import simulate

    showers = simulate(2, 50.0, theta, 0.0, stack=name, frame="detector", seed=4)
    hits = load_geometry(name).project(showers, fluctuate=False)
    owner = torch.repeat_interleave(torch.arange(len(showers)), hits.num_hits)
    cells = torch.zeros(len(showers), dtype=torch.float64).index_add_(0, owner, hits.energy.double())
    visible = torch.zeros(len(showers), dtype=torch.float64).index_add_(
        0, showers.batch, showers.points[:, 3].double())
    assert torch.allclose(cells + hits.outside_energy.double(), visible, rtol=1e-5)
    assert (visible > 0.02 * 50e3).all()  # a sampling calorimeter's few per cent of 50 GeV