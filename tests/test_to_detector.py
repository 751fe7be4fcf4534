"""`Geometry.to_detector`: physics-frame showers as the detector sees them, consistent with `project`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcshower import Showers
from pcshower.geometry import Placement, load_geometry


def physics_showers(theta, phi, points=300, seed=0, position=None):
    """Random physics-frame showers, one per direction, some points in front of and behind the stack."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    phi = torch.as_tensor(phi, dtype=torch.float64).expand_as(theta)
    n = theta.numel()
    g = torch.Generator().manual_seed(seed)
    total = n * points
    x = torch.randn(total, generator=g) * 1.5
    y = torch.randn(total, generator=g) * 1.5
    z = torch.rand(total, generator=g) * 30.0 - 1.0
    e = torch.rand(total, generator=g) / points * 2
    return Showers.from_counts(torch.stack([x, y, z, e], 1), [points] * n, energy=torch.full((n,), 20.0),
                               theta=theta, phi=phi, position=position, metadata={"seed": seed})


def stave_edges(geo, offsets=(-0.01, 0.0, 0.012)):
    """Azimuths next to the corners between barrel staves (where points are handed over)."""
    p = geo.spec.placement["polygon_barrel"]
    k, phi0 = p["symmetry"], math.radians(p["phi0_deg"])
    return [phi0 + (i + 0.5) * 2 * math.pi / k + d for i in range(0, k, 3) for d in offsets]


def assert_same_hits(geo, s, placement=None, fluctuate=True, seed=5):
    d = geo.to_detector(s, placement, generator=torch.Generator().manual_seed(seed), fluctuate=fluctuate)
    assert d.frame == "detector" and d.geometry == geo.name and len(d) == len(s)
    assert d.metadata == {**s.metadata, "geometry": geo.name}
    via = geo.project(d)
    direct = geo.project(s, placement, generator=torch.Generator().manual_seed(seed), fluctuate=fluctuate)
    assert torch.equal(via.ptr, direct.ptr) and torch.equal(via.cell_id, direct.cell_id), geo.name
    torch.testing.assert_close(via.energy, direct.energy, rtol=1e-6, atol=1e-6)
    # every detector-frame point lands in a cell, and the points carry the hits' energy
    assert via.outside_points.tolist() == [0] * len(s)
    points = torch.zeros(len(s), dtype=torch.float64).index_add_(0, d.batch, d.e.double())
    hits = torch.zeros(len(s), dtype=torch.float64).index_add_(0, via.batch, via.energy.double())
    torch.testing.assert_close(hits, points, rtol=1e-6, atol=1e-6)
    assert (d.e > 0).all()
    return d, direct


def test_ild_barrel_endcap_and_stave_corners():
    ild = load_geometry("ild")
    phi = torch.tensor([0.3, 1.1, 2.0, -2.5] + stave_edges(ild), dtype=torch.float64)
    theta = torch.full_like(phi, math.pi / 2)
    theta[:4] = torch.tensor([0.5, 1.2, 2.0, 2.7], dtype=torch.float64)  # endcaps and barrel
    d, hits = assert_same_hits(ild, physics_showers(theta, phi))
    assert (hits.num_hits > 0).all()


def test_cld_boards_behind_the_silicon_belong_to_the_next_layer():
    cld = load_geometry("cld")
    phi = torch.tensor([0.2, 2.9] + stave_edges(cld), dtype=torch.float64)
    theta = torch.full_like(phi, math.pi / 2)
    theta[:2] = torch.tensor([0.4, 2.6], dtype=torch.float64)
    s = physics_showers(theta, phi)
    d, _ = assert_same_hits(cld, s)
    # deposits in the boards behind silicon layer k are seen by layer k + 1: they are placed in
    # the middle of its silicon (endcap showers, whose points stay in their own module)
    edges = torch.as_tensor(cld.stack.z_edges_mm, dtype=torch.float64)
    slab = torch.searchsorted(edges, d[:2].z.contiguous(), right=True) - 1
    assert not torch.isin(slab % 7, torch.tensor([3, 4, 5, 6])).any()
    si_middles = 0.5 * (edges[2::7] + edges[3::7])
    assert torch.isclose(d[:2].z[:, None], si_middles[None, :], rtol=0, atol=1e-9).any(1).sum() > 0
    assert_same_hits(cld, s, fluctuate=False)


@pytest.mark.parametrize("name", ["calochallenge_ds1_photons", "calochallenge_ds2"])
def test_calochallenge(name):
    geo = load_geometry(name)
    s = physics_showers(torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64), [0.0, 1.0, -2.0])
    assert_same_hits(geo, s)


def test_allegro_inclined_readout():
    allegro = load_geometry("allegro")
    phi = torch.linspace(-3.0, 3.0, 6, dtype=torch.float64)
    theta = torch.tensor([0.9, 1.2, 1.5708, 1.9, 2.2, 1.4], dtype=torch.float64)
    d, hits = assert_same_hits(allegro, physics_showers(theta, phi))
    assert (hits.num_hits > 0).all()


def test_explicit_positions_and_placement():
    ild = load_geometry("ild")
    theta = torch.tensor([1.3, 1.6, 1.9], dtype=torch.float64)
    phi = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    # impact points off the default ones: on stave 0 near its edge, on stave 1, and the default
    position = torch.tensor([[1804.8, 700.0, 100.0], [1300.0, 1250.0, -300.0], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    s = physics_showers(theta, phi, position=position)
    d, _ = assert_same_hits(ild, s)
    assert torch.equal(d.position, s.position)
    # a Placement overrides the showers' conditions and is carried by the result
    place = Placement(position=position.flip(0), theta=theta.flip(0), phi=phi.flip(0))
    d, _ = assert_same_hits(ild, physics_showers(theta, phi), placement=place)
    assert torch.equal(d.position, position.flip(0)) and torch.equal(d.theta, theta.flip(0))
    cld = load_geometry("cld")
    corner = torch.tensor([[2150.0, 560.0, 0.0]], dtype=torch.float64).expand(3, 3)
    s = physics_showers(theta, phi, position=corner)
    assert_same_hits(cld, s)


def test_frames_other_than_physics_are_refused_or_kept():
    ild = load_geometry("ild")
    s = physics_showers(torch.tensor([1.5], dtype=torch.float64), 0.0)
    d = ild.to_detector(s, generator=torch.Generator().manual_seed(0))
    assert ild.to_detector(d) is d
    with pytest.raises(ValueError, match="detector-frame showers of geometry 'ild'"):
        load_geometry("cld").to_detector(d)
    with pytest.raises(ValueError, match="a placement cannot move them"):
        ild.to_detector(d, Placement(theta=[1.0]))
    with pytest.raises(TypeError, match="Showers batch"):
        ild.to_detector(np.zeros((3, 4)))
    # a shower that misses the calorimeter (through the endcap hole) has no points left
    miss = ild.to_detector(physics_showers(torch.tensor([0.0], dtype=torch.float64), 0.0))
    assert miss.num_points.tolist() == [0]
