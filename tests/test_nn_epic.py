"""EPiC backbone: permutation equivariance and independence of showers in a ragged batch."""

import torch

from pcshower.nn import EPiCNetwork, segment_mean, segment_sum


def _net():
    torch.manual_seed(0)
    return EPiCNetwork(4, 4, 3, point_dim=16, global_dim=8, hidden=32, layers=2).double()


def test_segment_reductions_match_loops():
    values = torch.arange(12.0).reshape(6, 2)
    batch = torch.tensor([0, 0, 2, 2, 2, 3])
    s = segment_sum(values, batch, 4)
    assert torch.equal(s[1], torch.zeros(2)) and torch.equal(s[2], values[2:5].sum(0))
    m = segment_mean(values, batch, 4)
    assert torch.allclose(m[0], values[:2].mean(0)) and torch.equal(m[1], torch.zeros(2))


def test_permutation_equivariant_and_showers_independent():
    net = _net()
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([5, 1, 7])
    batch = torch.repeat_interleave(torch.arange(3), counts)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(3, 3, generator=g, dtype=torch.float64)
    out = net(x, cond, batch)
    perm = torch.randperm(13, generator=g)
    out_perm = net(x[perm], cond, batch[perm])
    assert torch.allclose(out_perm, out[perm], atol=1e-12)
    # shower 2 alone gives the same output as inside the batch: no leakage between showers
    alone = net(x[6:], cond[2:], torch.zeros(7, dtype=torch.long))
    assert torch.allclose(alone, out[6:], atol=1e-12)
    # and changing shower 0's points changes shower 0's output only
    x2 = x.clone()
    x2[:5] += 1.0
    out2 = net(x2, cond, batch)
    assert not torch.allclose(out2[:5], out[:5]) and torch.allclose(out2[5:], out[5:], atol=1e-12)
