"""Point features of the model: the radial warp inverts exactly, the sub-voxel split keeps energy
and restores the spread that merging on a grid removed."""

import pytest
import torch

from pcshower.data import Showers
from pcshower.models.model import ShowerModel, split_points
from pcshower.simulate.reduce import reduce_points

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"slices": {"num": 5, "z_max_x0": 10.0}, "flow": {"transforms": 1, "hidden": [8]},
         "epic": {"point_dim": 8, "global_dim": 4, "hidden": 8, "layers": 1}}


def _points(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.cat([torch.zeros(3), torch.logspace(-5, 1.3, n - 3)])  # includes r = 0 and 20 R_M
    a = torch.rand(n, generator=g) * 6.283
    z = torch.rand(n, generator=g) * 25
    e = torch.rand(n, generator=g) * 1e-2 + 1e-6
    return torch.stack([r * a.cos(), r * a.sin(), z, e], 1)


@pytest.mark.parametrize("scale", [None, 0.5, 2.0])
def test_feature_warp_round_trips(scale):
    model = ShowerModel({**SMALL, "radial_scale": scale})
    p = _points()
    back = model.denormalize_points(model.normalize_points(p))
    assert torch.allclose(back[:, :3], p[:, :3], rtol=1e-4, atol=1e-5)
    assert torch.allclose(back[:, 3], p[:, 3], rtol=1e-4)


def test_feature_warp_compresses_the_tail_and_keeps_the_direction():
    p = torch.tensor([[0.01, 0.0, 1.0, 0.1], [20.0, 0.0, 1.0, 0.1], [0.0, -3.0, 1.0, 0.1]])
    plain = ShowerModel(SMALL)._point_features_raw(p)
    warped = ShowerModel({**SMALL, "radial_scale": 0.5})._point_features_raw(p)
    assert warped[0, 0] == pytest.approx(0.01, rel=1e-3)           # core: unchanged
    assert warped[1, 0] == pytest.approx(0.5 * torch.asinh(torch.tensor(40.0)).item(), rel=1e-5)
    assert warped[2, 1] < 0 and warped[2, 0] == 0                    # same azimuth
    assert torch.equal(plain[:, 2:], warped[:, 2:])                  # depth and ln e untouched


def test_split_conserves_energy_and_multiplies_counts():
    p = _points(600)
    ptr = torch.tensor([0, 100, 100, 600])
    g = torch.Generator().manual_seed(1)
    out, out_ptr = split_points(p, ptr, 8, (0.5, 0.5, 1.0), g)
    assert out.shape == (4800, 4) and out_ptr.tolist() == [0, 800, 800, 4800]
    e_in = torch.stack([p[a:b, 3].double().sum() for a, b in zip(ptr[:-1], ptr[1:])])
    e_out = torch.stack([out[a:b, 3].double().sum() for a, b in zip(out_ptr[:-1], out_ptr[1:])])
    assert torch.allclose(e_in, e_out, rtol=1e-6)
    assert bool((out[:, 2] >= 0).all())
    # each sub-point stays in the box about its parent
    off = out[:, :3] - p[:, :3].repeat_interleave(8, 0)
    near_surface = p[:, 2].repeat_interleave(8, 0) < 0.5  # reflected depths may move further
    assert bool((off[:, 0].abs() <= 0.25 + 1e-6).all() and (off[:, 1].abs() <= 0.25 + 1e-6).all())
    assert bool((off[~near_surface, 2].abs() <= 0.5 + 1e-5).all())
    # same generator state, same split
    again, _ = split_points(p, ptr, 8, (0.5, 0.5, 1.0), torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert split_points(p, ptr, 1, None)[0] is p
    _, float_factor_ptr = split_points(p, ptr, 2.0, (0.5, 0.5, 1.0), g)  # e.g. "factor: 2.0" in YAML
    assert float_factor_ptr.dtype == torch.int64 and float_factor_ptr.tolist() == [0, 200, 200, 1200]


@pytest.mark.parametrize("factor, box", [(0, (1, 1, 1)), (2.5, (1, 1, 1)), (4, None), (4, (1, 1)),
                                         (4, (1, -1, 1)), (4, (1, float("nan"), 1))])
def test_split_rejects_bad_arguments(factor, box):
    with pytest.raises(ValueError, match="split"):
        split_points(_points(10), torch.tensor([0, 10]), factor, box)


def _widths(points, ptr):
    e = points[:, 3].double()
    out = []
    for k in range(3):
        m = (e * points[:, k]).sum() / e.sum()
        out.append(((e * (points[:, k] - m) ** 2).sum() / e.sum()).sqrt().item())
    return out


def test_split_restores_the_spread_lost_on_the_grid():
    # a smooth Gaussian blob (sigma 0.4 R_M, 1.5 X0) merged on a (0.5, 0.5, 1) grid loses
    # variance per axis (box^2 / 12 for a flat density, 0.018 of the 0.021 here in x, y); a
    # uniform split over the voxel gives it back, slightly too much for a density this peaked
    g = torch.Generator().manual_seed(3)
    n = 400_000
    xyz = torch.randn(n, 3, generator=g) * torch.tensor([0.4, 0.4, 1.5]) + torch.tensor([0, 0, 8.0])
    pts = torch.cat([xyz, torch.full((n, 1), 1.0 / n)], 1)
    sh = Showers(points=pts, ptr=torch.tensor([0, n]), energy=torch.tensor([50.0]),
                 theta=torch.tensor([1.0]), phi=torch.tensor([0.0]), frame="physics")
    true = _widths(sh.points, sh.ptr)
    merged = reduce_points(sh, (0.5, 0.5, 1.0))
    lost = _widths(merged.points, merged.ptr)
    split, ptr = split_points(merged.points, merged.ptr, 16, (0.5, 0.5, 1.0), g)
    back = _widths(split, ptr)
    for axis in range(3):
        assert true[axis] - lost[axis] > 0.006 * true[axis]            # the grid removed spread
        assert abs(back[axis] - true[axis]) < 0.4 * (true[axis] - lost[axis])


def test_split_sub_points_take_one_stratum_each_along_every_axis():
    p = torch.tensor([[0.0, 0.0, 5.0, 1.0], [1.0, -1.0, 9.0, 2.0]])
    out, _ = split_points(p, torch.tensor([0, 2]), 4, (1.0, 2.0, 0.5), torch.Generator().manual_seed(2))
    off = (out[:, :3] - p[:, :3].repeat_interleave(4, 0)) / torch.tensor([1.0, 2.0, 0.5]) + 0.5
    strata = torch.floor(off * 4).long().view(2, 4, 3)
    for parent in range(2):
        for axis in range(3):
            assert sorted(strata[parent, :, axis].tolist()) == [0, 1, 2, 3]


def test_point_normalisation_is_the_mean_and_std_of_the_point_features():
    from pcshower.data import Showers
    from pcshower.models.model import ShowerModel

    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([300, 50, 1000, 7])
    p = int(counts.sum())
    pts = torch.stack([torch.randn(p, generator=g) * 0.7 + 0.1, torch.randn(p, generator=g),
                       torch.rand(p, generator=g) * 25, torch.rand(p, generator=g) * 1e-3 + 1e-5], 1)
    showers = Showers.from_counts(pts, counts, energy=torch.tensor([10.0, 20, 50, 90], dtype=torch.float64),
                                  theta=torch.full((4,), 1.2, dtype=torch.float64))
    model = ShowerModel({"slices": {"num": 6, "z_max_x0": 24.0}})
    model.fit_normalization(showers)
    feats = torch.cat([pts[:, :3], pts[:, 3:].log()], 1).double()
    assert torch.allclose(model.norm.point_mean.double(), feats.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.norm.point_std.double(), feats.std(0), rtol=1e-5)


@pytest.mark.parametrize("chunk", [256, 1000, 4096])
def test_chunked_network_passes_give_the_same_showers_bit_for_bit(chunk, monkeypatch):
    """ShowerModel.chunk_points runs EPiC's per-point layers in chunks (less memory traffic);
    the showers must be those of one whole-batch pass, bit for bit, for the same seed."""
    from pcshower.models.generate import load_default_model
    from pcshower.nn.epic import EPiCNetwork

    calls = []
    chunked = EPiCNetwork._forward_chunked
    monkeypatch.setattr(EPiCNetwork, "_forward_chunked",
                        lambda self, *a: calls.append(a[0].shape[0]) or chunked(self, *a))
    model = load_default_model()
    energy = torch.tensor([20.0, 50.0, 80.0, 35.0], dtype=torch.float64)
    theta = torch.full((4,), 1.5707963, dtype=torch.float64)
    out = {}
    try:
        for key in (None, chunk):
            model.chunk_points = key
            out[key] = model.sample(energy, theta, torch.zeros(4), steps=2,
                                    generator=torch.Generator().manual_seed(5))
    finally:
        model.chunk_points = type(model).chunk_points
    assert len(calls) == 3 and calls[0] > 2 * chunk  # each of the 3 calls in several chunks
    assert torch.equal(out[None].points, out[chunk].points)
    assert torch.equal(out[None].ptr, out[chunk].ptr)


def test_the_allocator_settings_are_taken_once_and_can_be_refused(monkeypatch):
    import pcshower.allocator as alloc

    monkeypatch.setattr(alloc, "_done", None)
    monkeypatch.setenv("PCSHOWER_MALLOC", "default")
    assert alloc.tune_allocator() is False
    monkeypatch.setattr(alloc, "_done", None)
    monkeypatch.delenv("PCSHOWER_MALLOC")
    import platform
    took = alloc.tune_allocator()
    assert took is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert alloc.tune_allocator() is took  # once per process
