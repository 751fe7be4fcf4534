"""Tests of the sampling-calorimeter response (pcshower.physics.sampling)."""

import math

import numpy as np
import pytest
import torch

from pcshower.physics import Stack, get_material
from pcshower.physics.sampling import (depth_x0_to_mm, sample_gamma, sampling_layers,
                                       to_active_layers)


def ild_stack():
    return (Stack.repeated([("W", 2.1, False), ("Si", 0.5, True)], 20, name="thin")
            + Stack.repeated([("W", 4.2, False), ("Si", 0.5, True)], 10, name="thick"))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sampling_constants_by_hand():
    layers = sampling_layers(ild_stack())
    w, si = get_material("W"), get_material("Si")
    f_mip = si.mip_mev_per_mm * 0.5 / (si.mip_mev_per_mm * 0.5 + w.mip_mev_per_mm * 2.1)
    ehat = 1.0 / (1.0 + 0.007 * (74 - 14))
    assert layers.num_layers == 30
    assert layers.mip_fraction[0] == pytest.approx(f_mip, rel=1e-12)
    assert layers.e_over_mip[0] == pytest.approx(ehat, rel=1e-12)
    assert layers.sampling_fraction[0] == pytest.approx(f_mip * ehat, rel=1e-12)
    # thicker absorber: about half the sampling fraction
    assert layers.sampling_fraction[25] == pytest.approx(layers.sampling_fraction[0] / 2, rel=0.03)
    cos_a = math.cos(21.2052 / (math.pi * w.ec_mev))
    assert layers.crossing_mev[0] == pytest.approx(si.mip_mev_per_mm * 0.5 / cos_a, rel=1e-12)
    np.testing.assert_allclose(layers.active_z_mm[0], [2.1, 2.6])
    np.testing.assert_allclose(layers.active_z_mm[-1], [98.5, 99.0])


def test_layer_assignment_and_outside_points():
    stack = Stack.repeated([("W", 2.0, False), ("Si", 0.5, True)], 3) + Stack(
        (Stack.repeated([("Pb", 5.0, False)], 1).slabs), name="back")
    z = torch.tensor([-0.1, 0.0, 1.9, 2.2, 2.5, 4.9, 7.4, 7.6, 12.4, 12.5, 30.0], dtype=torch.float64)
    layer, vis = to_active_layers(z, torch.ones_like(z), torch.zeros(11, dtype=torch.long), stack,
                                  fluctuate=False)
    assert layer.tolist() == [-1, 0, 0, 0, 1, 1, 2, -1, -1, -1, -1]
    assert layer.dtype == torch.int64
    assert (vis[layer < 0] == 0).all() and (vis[layer >= 0] > 0).all()


def test_mean_visible_is_sampling_fraction_times_deposit():
    stack = ild_stack()
    layers = sampling_layers(stack)
    z = torch.tensor([1.0, 2.3, 60.0, 97.0], dtype=torch.float64)
    e = torch.tensor([10.0, 3.0, 7.0, 1.0], dtype=torch.float64)
    layer, vis = to_active_layers(z, e, torch.zeros(4, dtype=torch.long), stack, fluctuate=False)
    expected = e.numpy() * layers.sampling_fraction[layer.numpy()]
    np.testing.assert_allclose(vis.numpy(), expected, rtol=1e-12)


def test_fluctuations_follow_the_crossing_count():
    """Mean f*E and variance (1 + kappa^2) * mu * d of the visible energy of one cell."""
    stack = ild_stack()
    layers = sampling_layers(stack)
    n = 200_000
    z = torch.full((n,), 1.0, dtype=torch.float64)
    e = torch.full((n,), 500.0, dtype=torch.float64)  # 500 MeV deposited in cell 0
    _, vis = to_active_layers(z, e, torch.arange(n), stack, generator=_gen(1))
    mu = 500.0 * layers.sampling_fraction[0]
    var = 2.0 * mu * layers.crossing_mev[0]  # kappa = 1
    assert vis.mean().item() == pytest.approx(mu, rel=0.005)
    assert vis.var().item() == pytest.approx(var, rel=0.02)
    _, vis0 = to_active_layers(z, e, torch.arange(n), stack, generator=_gen(1), crossing_rms=0.0)
    assert vis0.var().item() == pytest.approx(mu * layers.crossing_mev[0], rel=0.02)


def test_fluctuations_do_not_depend_on_how_energy_is_split():
    stack = ild_stack()
    n, k = 20_000, 25
    z = torch.full((n * k,), 50.0, dtype=torch.float64)
    e = torch.full((n * k,), 200.0 / k, dtype=torch.float64)
    batch = torch.arange(n).repeat_interleave(k)
    _, vis = to_active_layers(z, e, batch, stack, generator=_gen(2))
    summed = torch.zeros(n, dtype=torch.float64).index_add_(0, batch, vis)
    _, whole = to_active_layers(z[:n], torch.full((n,), 200.0, dtype=torch.float64),
                                torch.arange(n), stack, generator=_gen(3))
    assert summed.mean().item() == pytest.approx(whole.mean().item(), rel=0.01)
    assert summed.std().item() == pytest.approx(whole.std().item(), rel=0.03)


def test_same_generator_seed_same_result():
    stack = ild_stack()
    z = torch.rand(1000, generator=_gen(5), dtype=torch.float64) * 100
    e = torch.rand(1000, generator=_gen(6), dtype=torch.float64) * 10
    b = torch.zeros(1000, dtype=torch.long)
    a1 = to_active_layers(z, e, b, stack, generator=_gen(7))[1]
    a2 = to_active_layers(z, e, b, stack, generator=_gen(7))[1]
    a3 = to_active_layers(z, e, b, stack, generator=_gen(8))[1]
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_float32_inputs_keep_dtype():
    stack = ild_stack()
    z = torch.tensor([1.0, 50.0])
    layer, vis = to_active_layers(z, torch.tensor([1.0, 2.0]), torch.zeros(2, dtype=torch.long),
                                  stack, generator=_gen(0))
    assert vis.dtype == torch.float32 and layer.tolist() == [0, 19]


@pytest.mark.parametrize("z,e,b,match", [
    ([float("nan")], [1.0], [0], "finite"),
    ([1.0], [-1.0], [0], ">= 0"),
    ([1.0, 2.0], [1.0], [0], "same length"),
    ([1.0], [1.0], [0, 0], "one entry per point"),
])
def test_bad_input_is_refused(z, e, b, match):
    with pytest.raises(ValueError, match=match):
        to_active_layers(torch.tensor(z), torch.tensor(e), torch.tensor(b), ild_stack())


def test_stack_without_active_layer_is_refused():
    with pytest.raises(ValueError, match="no active slab"):
        sampling_layers(Stack.repeated([("W", 2.0, False)], 3))


def test_fully_active_stack_sees_everything_without_fluctuation():
    stack = Stack.repeated([("PbWO4", 220.0, True)], 1)
    z = torch.tensor([10.0, 100.0], dtype=torch.float64)
    _, vis = to_active_layers(z, torch.tensor([3.0, 4.0], dtype=torch.float64),
                              torch.zeros(2, dtype=torch.long), stack, generator=_gen(0))
    assert vis.tolist() == [3.0, 4.0]


def test_depth_x0_to_mm_hits_the_slab_boundaries():
    stack = ild_stack()
    x0 = torch.as_tensor(stack.x0_edges)
    np.testing.assert_allclose(depth_x0_to_mm(x0, stack).numpy(), stack.z_edges_mm, atol=1e-9)
    inside = depth_x0_to_mm(torch.tensor([0.5 * 2.1 / get_material("W").x0_mm]), stack)
    assert inside.item() == pytest.approx(1.05)
    beyond = depth_x0_to_mm(torch.tensor([stack.total_x0 + 1.0], dtype=torch.float64), stack)
    assert beyond.item() == pytest.approx(99.0 + 99.0 / stack.total_x0)


@pytest.mark.parametrize("shape", [0.05, 0.7, 1.0, 3.0, 40.0])
def test_sample_gamma_moments(shape):
    x = sample_gamma(torch.full((200_000,), shape), _gen(11))
    assert x.mean().item() == pytest.approx(shape, rel=0.02)
    assert x.var().item() == pytest.approx(shape, rel=0.05)
    assert (x >= 0).all()
    assert sample_gamma(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert sample_gamma(torch.ones(3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_index_equals_binary_search(dtype):
    from pcshower.physics.sampling import segment_index
    stack = ild_stack()
    for edges in (stack.z_edges_mm, stack.x0_edges):
        e = torch.as_tensor(edges, dtype=dtype)
        values = torch.cat([torch.rand(100_000, generator=_gen(3), dtype=dtype) * 1.2 * e[-1]
                            - 0.1 * e[-1], e, torch.nextafter(e, e - 1), torch.nextafter(e, e + 1)])
        expected = torch.searchsorted(e, values, right=True) - 1
        assert torch.equal(segment_index(values, edges), expected)


@pytest.mark.parametrize("name", ["ild", "allegro", "calochallenge_ds2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extended_segment_is_exact_at_edges_and_table_bin_boundaries(name, dtype):
    # the lookup table's own bin boundaries are where a rounded bin index could go wrong
    from pcshower.geometry import load_geometry
    from pcshower.physics.sampling import _bin_table, extended_segment
    stack = load_geometry(name).stack
    for edges in (stack.z_edges_mm, stack.x0_edges):
        e = torch.as_tensor(edges, dtype=dtype)
        start, inv_h, n_bins = _bin_table(tuple(float(x) for x in edges))[:3]
        grid = (start + torch.arange(n_bins, dtype=torch.float64) / inv_h).to(dtype)
        probes = torch.cat([e, grid, torch.rand(50_000, generator=_gen(5), dtype=dtype) * 1.4 * e[-1]
                            - 0.2 * e[-1]])
        values = torch.cat([probes, torch.nextafter(probes, probes - 1),
                            torch.nextafter(probes, probes + 1)])
        assert torch.equal(extended_segment(values, edges),
                           torch.searchsorted(e, values, right=True))


def test_slab_from_the_x0_lookup_gives_the_same_response():
    stack = ild_stack()
    t = torch.rand(20_000, generator=_gen(9), dtype=torch.float64) * 1.3 * stack.total_x0 - 1.0
    t = torch.cat([t, torch.as_tensor(stack.x0_edges)])
    z, slab = depth_x0_to_mm(t, stack, return_slab=True)
    assert torch.equal(z, depth_x0_to_mm(t, stack))
    e = torch.full_like(z, 5.0)
    b = torch.zeros(z.numel(), dtype=torch.long)
    direct = to_active_layers(z, e, b, stack, fluctuate=False)
    given = to_active_layers(z, e, b, stack, fluctuate=False, slab=slab)
    assert torch.equal(direct[0], given[0]) and torch.equal(direct[1], given[1])
    with pytest.raises(ValueError, match="slab"):
        to_active_layers(z, e, b, stack, slab=slab[:-1])
