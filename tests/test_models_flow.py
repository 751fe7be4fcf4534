"""ShowerFlow learns a known distribution; the shape codec and the calibration keep their promises."""

import math

import pytest
import torch

from pcshower.models.calibration import calibrate_points
from pcshower.models.showerflow import (ShapeCodec, ShowerFlow, ShowerShape, largest_remainder,
                                        slice_edges)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_reproduces_moments_of_a_conditional_2d_gaussian():
    # y | c ~ N(mean(c), cov): mean = (2c, -c), std (0.5, 1.0), correlation 0.8
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    chol = torch.tensor([[0.5, 0.0], [0.8, 0.6]])

    def draw(c):
        z = torch.randn(len(c), 2, generator=g)
        return torch.stack([2 * c[:, 0], -c[:, 0]], 1) + z @ chol.T

    flow = ShowerFlow(2, 1, transforms=2, hidden=(32, 32), bins=8)
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    for _ in range(600):
        c = torch.rand(512, 1, generator=g) * 2 - 1
        loss = -flow.log_prob(draw(c), c).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for cval in (-0.5, 0.5):
            c = torch.full((8000, 1), cval)
            s = flow.sample(c, torch.Generator().manual_seed(1))
            mean, cov = s.mean(0), torch.cov(s.T)
            assert torch.allclose(mean, torch.tensor([2 * cval, -cval]), atol=0.03), mean
            assert torch.allclose(cov, chol @ chol.T, atol=0.04), cov
    # reproducible sampling: same generator state → same draws
    c = torch.zeros(5, 1)
    assert torch.equal(flow.sample(c, torch.Generator().manual_seed(3)),
                       flow.sample(c, torch.Generator().manual_seed(3)))


def test_largest_remainder_sums_exactly():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(50, 7, generator=g)
    f = f / f.sum(1, keepdim=True)
    total = torch.randint(0, 500, (50,), generator=g)
    counts = largest_remainder(f, total)
    assert torch.equal(counts.sum(1), total) and (counts >= 0).all()
    assert ((counts - f * total[:, None]).abs() < 1 + 1e-9).all()


def _toy(g, counts):
    b = len(counts)
    batch = torch.repeat_interleave(torch.arange(b), counts)
    p = int(counts.sum())
    pts = torch.stack([torch.randn(p, generator=g), torch.randn(p, generator=g),
                       torch.rand(p, generator=g) * 12, torch.rand(p, generator=g) + 0.01], 1)
    return pts, batch


def test_codec_roundtrip_and_positivity():
    g = torch.Generator().manual_seed(0)
    codec = ShapeCodec(torch.linspace(0, 12, 7))
    counts = torch.tensor([40, 3, 100])
    pts, batch = _toy(g, counts)
    shape = codec.measure(pts, batch, 3)
    assert torch.equal(shape.num_points, counts) and torch.equal(shape.slice_points.sum(1), counts)
    back = codec.decode(codec.encode(shape, torch.full((3,), 0.3)))
    assert torch.equal(back.num_points, counts)
    assert torch.equal(back.slice_points, shape.slice_points)
    assert torch.allclose(back.slice_energy, shape.slice_energy, atol=1e-5)
    assert torch.allclose(back.visible_energy, shape.visible_energy, rtol=1e-5)
    # arbitrary feature vectors decode to valid shapes (positive energies, consistent counts)
    rnd = codec.decode(torch.randn(20, codec.num_features, generator=g) * 3)
    assert (rnd.num_points >= 1).all() and (rnd.visible_energy > 0).all()
    assert torch.equal(rnd.slice_points.sum(1), rnd.num_points)
    assert torch.allclose(rnd.slice_energy.sum(1), torch.ones(20))


def test_calibration_hits_the_sampled_shape():
    g = torch.Generator().manual_seed(0)
    edges = torch.linspace(0, 12, 7)
    codec = ShapeCodec(edges)
    counts = torch.tensor([30, 1, 64])
    pts, batch = _toy(g, counts)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    frac_n = torch.rand(3, 6, generator=g)
    frac_n[0, 2] = 0  # an empty slice
    frac_n = frac_n / frac_n.sum(1, keepdim=True)
    frac_e = torch.rand(3, 6, generator=g)
    frac_e = frac_e / frac_e.sum(1, keepdim=True)
    target = ShowerShape(counts, torch.tensor([0.9, 0.5, 0.02]), torch.tensor(
        [[0.3, -0.2, 5.0], [0.0, 0.0, 1.0], [-1.0, 2.0, 7.0]]), frac_e, largest_remainder(frac_n, counts))
    out = calibrate_points(pts, ptr, target, edges)
    got = codec.measure(out, batch, 3)
    assert torch.equal(got.slice_points, target.slice_points)
    assert torch.allclose(got.visible_energy, target.visible_energy, rtol=1e-5)
    assert torch.allclose(got.cog[:, :2], target.cog[:, :2], atol=1e-5)
    has = target.slice_points[0] > 0  # slices that got points carry their energy share
    expect = frac_e[0] * has / (frac_e[0] * has).sum()
    assert torch.allclose(got.slice_energy[0], expect, atol=1e-5)
    assert ((out[:, 2] >= 0) & (out[:, 2] <= 12)).all() and (out[:, 3] >= 0).all()
    # a point dealt to another slice moves just inside it; order in depth is kept
    for i in range(3):
        z = out[ptr[i]:ptr[i + 1], 2]
        assert bool((z[1:] >= z[:-1]).all())


def test_calibration_can_centre_the_core_on_the_axis():
    """A shower whose dense core sits 0.05 R_M off the axis and whose sparse halo is lopsided the
    other way: core_radius moves the core onto the axis (the sampled CoG is ignored), keeping
    the energies; without it the whole shower moves to the sampled CoG."""
    g = torch.Generator().manual_seed(4)
    n_core, n_halo = 300, 100
    core = torch.randn(n_core, 2, generator=g) * 0.1 + torch.tensor([0.05, 0.0])
    a = torch.rand(n_halo, generator=g) * 3.1416 + 1.5708  # the x < 0 half plane
    halo = (1.5 + torch.rand(n_halo, generator=g))[:, None] * torch.stack([a.cos(), a.sin()], 1)
    xy = torch.cat([core, halo])
    e = torch.cat([torch.full((n_core,), 3e-3), torch.full((n_halo,), 1e-3)])
    pts = torch.cat([xy, torch.rand(n_core + n_halo, 1, generator=g) * 12, e[:, None]], 1)
    counts = torch.tensor([n_core + n_halo])
    ptr = torch.tensor([0, n_core + n_halo])
    edges = torch.linspace(0, 12, 7)
    shape = ShapeCodec(edges).measure(pts, torch.zeros(len(pts), dtype=torch.long), 1)
    shape.cog = torch.tensor([[0.2, -0.1, 6.0]])
    out = calibrate_points(pts, ptr, shape, edges, core_radius=0.5)
    r = torch.hypot(out[:, 0], out[:, 1])
    w = out[:, 3] * (r < 0.5)
    centre = (out[:, :2] * w[:, None]).sum(0) / w.sum()
    assert centre.abs().max() < 1e-3, centre
    assert torch.allclose(out[:, 3].sum(), pts[:, 3].sum(), rtol=1e-5)
    plain = calibrate_points(pts, ptr, shape, edges)
    cog = (plain[:, :2] * plain[:, 3:4]).sum(0) / plain[:, 3].sum()
    assert torch.allclose(cog, shape.cog[0, :2], atol=1e-5)
    assert ((plain[:, :2] * plain[:, 3:4] * (torch.hypot(plain[:, 0], plain[:, 1]) < 0.5)[:, None]).sum(0)
            / (plain[:, 3] * (torch.hypot(plain[:, 0], plain[:, 1]) < 0.5)).sum()).abs().max() > 0.05


def test_calibration_can_centre_each_slice_core_on_the_axis():
    """Slices whose cores sit off the axis in opposite directions (a bent core, centred on the
    axis as a whole): slice_core_radius puts each slice's core on the axis, moving every point
    of a slice alike; energies and depths stay."""
    g = torch.Generator().manual_seed(5)
    edges = torch.linspace(0, 12, 7)  # six slices of 2 X0
    rows = []
    for k, dx in enumerate([0.08, -0.08, 0.05, -0.05, 0.0, 0.03]):
        xy = torch.randn(200, 2, generator=g) * 0.08 + torch.tensor([dx, -dx / 2])
        z = 2 * k + 0.2 + 1.6 * torch.rand(200, 1, generator=g)
        rows.append(torch.cat([xy, z, torch.full((200, 1), 1e-3)], 1))
    pts = torch.cat(rows)
    pts = pts[torch.argsort(pts[:, 2])]  # the calibration's output order (by depth)
    ptr = torch.tensor([0, len(pts)])
    shape = ShapeCodec(edges).measure(pts, torch.zeros(len(pts), dtype=torch.long), 1)
    out = calibrate_points(pts, ptr, shape, edges, core_radius=0.5, slice_core_radius=0.3)
    for k in range(6):
        sl = out[(out[:, 2] >= 2 * k) & (out[:, 2] < 2 * k + 2)]
        w = sl[:, 3] * (torch.hypot(sl[:, 0], sl[:, 1]) < 0.3)
        centre = (sl[:, :2] * w[:, None]).sum(0) / w.sum()
        assert centre.abs().max() < 1e-3, (k, centre)
        before = pts[(pts[:, 2] >= 2 * k) & (pts[:, 2] < 2 * k + 2)]
        shift = sl[:, :2] - before[:, :2]  # one rigid shift per slice
        assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)
    assert torch.equal(out[:, 2:], pts[:, 2:])
    whole = calibrate_points(pts, ptr, shape, edges, core_radius=0.5)
    first = whole[whole[:, 2] < 2]
    assert float(first[:, 0].mean()) > 0.05  # without it the first slice's core stays off axis


RINGS = [0.5, 1.0, 2.0]


def test_codec_with_rings_roundtrips_ring_energies():
    g = torch.Generator().manual_seed(1)
    codec = ShapeCodec(torch.linspace(0, 12, 7), r_edges=RINGS)
    assert codec.num_rings == 4 and codec.num_features == 5 + 12 + 4
    counts = torch.tensor([40, 3, 100])
    pts, batch = _toy(g, counts)
    shape = codec.measure(pts, batch, 3)
    r = torch.hypot(pts[:, 0], pts[:, 1])
    inner = torch.zeros(3).index_add_(0, batch, pts[:, 3] * (r < 0.5))
    assert torch.allclose(shape.ring_energy[:, 0], inner / shape.visible_energy, atol=1e-6)
    assert torch.allclose(shape.ring_energy.sum(1), torch.ones(3), atol=1e-6)
    back = codec.decode(codec.encode(shape))
    assert torch.allclose(back.ring_energy, shape.ring_energy, atol=1e-5)
    for bad in ([], [1.0, 0.5], [0.0, 1.0], [float("nan")]):
        with pytest.raises(ValueError, match="ring edges"):
            ShapeCodec(torch.linspace(0, 12, 7), r_edges=bad)


def test_calibration_matches_sampled_slice_and_ring_energies_together():
    # the toy points (Gaussian in x, y) put ~12 % of the energy beyond 2 R_M; the sampled shape
    # asks for other ring and slice fractions, and the calibration must give both at once
    g = torch.Generator().manual_seed(2)
    edges = torch.linspace(0, 12, 7)
    codec = ShapeCodec(edges, r_edges=RINGS)
    counts = torch.tensor([400, 900])
    pts, batch = _toy(g, counts)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    frac_e = torch.rand(2, 6, generator=g) + 0.2
    frac_e = frac_e / frac_e.sum(1, keepdim=True)
    rings = torch.tensor([[0.3, 0.3, 0.3, 0.1], [0.1, 0.2, 0.6, 0.1]])
    sampled = codec.measure(pts, batch, 2)
    target = ShowerShape(counts, torch.tensor([0.9, 0.4]), torch.zeros(2, 3), frac_e,
                         sampled.slice_points, rings)
    out = calibrate_points(pts, ptr, target, edges, codec.r_edges)
    # the sampled counts are the points' own: every point keeps its depth
    assert torch.equal(out[:, 2].sort().values, pts[:, 2].sort().values)
    got = codec.measure(out, batch, 2)
    assert torch.allclose(got.slice_energy, frac_e, atol=1e-5)       # slices: exact
    assert torch.allclose(got.visible_energy, target.visible_energy, rtol=1e-5)
    # rings after the final slice scaling and the CoG shift: close, not exact
    assert (got.ring_energy - rings).abs().max() < 0.02, got.ring_energy
    before = codec.measure(calibrate_points(pts, ptr, target, edges), batch, 2).ring_energy
    assert (before - rings).abs().max() > 0.1  # without rings they were far off


def test_centred_slices_hold_whole_layers_of_merged_points():
    """Points merged on voxels of depth 1 X0 lie near integer depths; centred slices keep each such
    layer in one slice, edges at the integers cut it in two."""
    from pcshower.data import Showers
    from pcshower.simulate.reduce import reduce_points

    assert torch.equal(slice_edges(4, 8.0), torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0]))
    assert torch.equal(slice_edges(4, 8.0, centred=True), torch.tensor([0.0, 1.0, 3.0, 5.0, 7.0]))
    with pytest.raises(ValueError, match="num >= 1"):
        slice_edges(0, 8.0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    torch.manual_seed(0)  # torch.distributions draw from the global generator
    z = torch.distributions.Gamma(4.0, 0.5).sample((n,)).clamp_max(29.0)
    pts = torch.stack([torch.randn(n, generator=g) * 0.3, torch.randn(n, generator=g) * 0.3, z,
                       torch.full((n,), 1.0 / n)], 1)
    merged = reduce_points(Showers.from_counts(pts, torch.tensor([n]), torch.tensor([50.0])), (0.25, 0.25, 1.0))
    layer = torch.round(merged.points[:, 2].double()).long()
    centred = ShapeCodec(slice_edges(30, 30.0, centred=True)).slice_of(merged.points[:, 2])
    assert torch.equal(centred, layer.clamp_max(29))
    plain = ShapeCodec(slice_edges(30, 30.0)).slice_of(merged.points[:, 2])
    split = [int(plain[layer == k].unique().numel()) for k in range(2, 15)]
    assert max(split) == 2  # the integer edges cut merged layers in two


@pytest.mark.parametrize("rings", [None, RINGS])
def test_measuring_in_chunks_gives_the_same_shapes(rings):
    from pcshower.data import Showers

    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([40, 3, 100, 1, 57, 12, 30])
    pts, _ = _toy(g, counts)
    showers = Showers.from_counts(pts, counts, energy=torch.full((7,), 50.0, dtype=torch.float64))
    codec = ShapeCodec(torch.linspace(0, 12, 7), r_edges=rings)
    whole = codec.measure(showers.points, showers.batch, len(showers))
    for chunk in (1, 3, 7, 100):
        part = codec.measure_showers(showers, chunk=chunk)
        for name in ("num_points", "visible_energy", "cog", "slice_energy", "slice_points",
                     "ring_energy"):
            a, b = getattr(whole, name), getattr(part, name)
            assert (a is None and b is None) or torch.equal(a, b), (chunk, name)


def test_dequantised_zero_fractions_decode_back_to_zero():
    g = torch.Generator().manual_seed(4)
    codec = ShapeCodec(torch.linspace(0, 12, 7), eps=1e-5, r_edges=RINGS, dequantize_zeros=True)
    counts = torch.tensor([40, 3, 100])
    pts, batch = _toy(g, counts)
    pts[:, 2] = pts[:, 2].clamp(max=7.9)  # the last two slices stay empty
    shape = codec.measure(pts, batch, 3)
    zero = codec.zero_fractions(shape)
    assert not zero[:, :5].any() and zero[:, 5 + 4:5 + 6].all() and zero[:, 11 + 4:11 + 6].all()
    y = codec.dequantize_zeros(codec.encode(shape), zero, torch.rand(3, codec.num_features, generator=g))
    assert bool((y[zero] > math.log(1e-5)).any()) and bool((y[zero] < math.log(2e-5)).all())
    back = codec.decode(y)
    assert bool((back.slice_energy[shape.slice_energy == 0] == 0).all())
    assert bool((back.slice_points[shape.slice_points == 0] == 0).all())
    assert torch.allclose(back.slice_energy, shape.slice_energy, rtol=1e-4, atol=1e-6)
    assert torch.equal(back.slice_points, shape.slice_points)


def test_fast_sampling_path_gives_the_autograd_paths_numbers_and_follows_training():
    """Without autograd ShowerFlow.sample reuses each masked layer's mask * weight; the samples
    must be the plain path's, and a weight update must not be hidden by the cache."""
    torch.manual_seed(0)
    flow = ShowerFlow(7, 3, transforms=2, hidden=(16, 16), bins=4, passes=2)
    context = torch.randn(5, 3)
    plain = flow.sample(context, torch.Generator().manual_seed(1)).detach()  # grad enabled
    with torch.no_grad():
        fast = flow.sample(context, torch.Generator().manual_seed(1))
    assert torch.equal(plain, fast) and not fast.is_inference()
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    flow.log_prob(torch.randn(5, 7), context).mean().neg().backward()
    opt.step()
    after = flow.sample(context, torch.Generator().manual_seed(1)).detach()
    with torch.no_grad():
        fast_after = flow.sample(context, torch.Generator().manual_seed(1))
    assert not torch.equal(after, plain) and torch.equal(after, fast_after)
    assert "forward" not in vars(next(m for m in flow.modules() if hasattr(m, "mask")))


def test_fast_sampling_is_safe_from_threads_and_restores_zuko():
    import threading

    import zuko

    torch.manual_seed(0)
    flow = ShowerFlow(7, 3, transforms=2, hidden=(16, 16), bins=4, passes=2)
    context = torch.randn(5, 3)
    with torch.no_grad():
        want = flow.sample(context, torch.Generator().manual_seed(1))
    errors, results = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(10):
                    results.append(flow.sample(context, torch.Generator().manual_seed(1)))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 40 and all(torch.equal(r, want) for r in results)
    assert zuko.flows.autoregressive.broadcast is zuko.utils.broadcast
    assert zuko.transforms.broadcast is zuko.utils.broadcast
    assert not any("forward" in vars(m) for m in flow.modules())


def test_fast_sampling_under_inference_mode_and_after_data_updates():
    torch.manual_seed(0)
    with torch.inference_mode():  # weights made as inference tensors
        flow = ShowerFlow(7, 3, transforms=2, hidden=(16, 16), bins=4, passes=2)
        flow.sample(torch.randn(2, 3))
    flow = ShowerFlow(7, 3, transforms=2, hidden=(16, 16), bins=4, passes=2)
    context = torch.randn(5, 3)
    for p in flow.parameters():
        p.data.mul_(1.1)  # bumps no version counter
    plain = flow.sample(context, torch.Generator().manual_seed(1)).detach()
    with torch.no_grad():
        assert torch.equal(plain, flow.sample(context, torch.Generator().manual_seed(1)))


def test_traced_sampling_gives_the_python_paths_numbers_and_follows_the_weights():
    """From the TRACE_AFTER-th call with one shape on, ShowerFlow.sample runs a traced graph:
    the same samples bit for bit, in-place updates and replaced tensors seen."""
    from pcshower.models import showerflow

    torch.manual_seed(0)
    flow = ShowerFlow(7, 3, transforms=2, hidden=(16, 16), bins=4, passes=2)
    context = torch.randn(1, 3)
    plain = flow.sample(context, torch.Generator().manual_seed(1)).detach()  # grad enabled
    with torch.no_grad():
        runs = [flow.sample(context, torch.Generator().manual_seed(1))
                for _ in range(showerflow.TRACE_AFTER + 2)]
    assert callable(showerflow._TRACED[flow][(1, torch.float32, 3, torch.float32, "cpu",
                                               torch.float32)])
    assert all(torch.equal(plain, r) for r in runs)
    with torch.no_grad():
        next(flow.parameters()).add_(0.05)  # in place: the graph shares the tensor
        traced = flow.sample(context, torch.Generator().manual_seed(1))
    assert torch.equal(traced, flow.sample(context, torch.Generator().manual_seed(1)).detach())
    assert not torch.equal(traced, plain)
    flow.double()
    flow.float()  # new parameter tensors: the graph reads the current ones
    with torch.no_grad():
        again = flow.sample(context, torch.Generator().manual_seed(1))
    assert torch.equal(again, traced)
    with torch.no_grad():
        for p in flow.parameters():
            p.data = p.data * 1.01  # replaced through .data
        moved = flow.sample(context, torch.Generator().manual_seed(1))
    assert torch.equal(moved, flow.sample(context, torch.Generator().manual_seed(1)).detach())
