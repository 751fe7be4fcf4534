"""The set-transformer backbone: permutation equivariant within a shower, no information
between showers of a batch, points of one shower do see each other."""

import pytest
import torch

from pcshower.nn.transformer import SetTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed=0):
    torch.manual_seed(seed)
    net = SetTransformer(4, 4, 6, dim=16, heads=2, layers=2, inducing=5)
    with torch.no_grad():  # leave adaLN-Zero's identity start: every path must carry signal
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


def _batch(counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 4, generator=g)
    cond = torch.randn(len(counts), 6, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return x, cond, batch, counts


def test_permutation_equivariant_within_showers():
    net = _net()
    x, cond, batch, counts = _batch([5, 1, 7])
    out = net(x, cond, batch, counts)
    # permute the points inside each shower (showers stay contiguous)
    perm = torch.cat([torch.tensor([3, 0, 4, 1, 2]), torch.tensor([5]),
                      6 + torch.randperm(7, generator=torch.Generator().manual_seed(2))])
    assert torch.allclose(net(x[perm], cond, batch, counts), out[perm], atol=1e-5)


def test_no_leakage_between_showers():
    net = _net()
    x, cond, batch, counts = _batch([5, 3, 7])
    out = net(x, cond, batch, counts)
    x2 = x.clone()
    x2[batch == 1] += 5.0  # change shower 1's points
    out2 = net(x2, cond, batch, counts)
    keep = batch != 1
    assert torch.allclose(out2[keep], out[keep], atol=1e-6)
    assert not torch.allclose(out2[~keep], out[~keep], atol=1e-3)
    # a shower alone gives what it gives in the batch
    alone = net(x[batch == 2], cond[2:3], torch.zeros(7, dtype=torch.long), counts[2:3])
    assert torch.allclose(alone, out[batch == 2], atol=1e-5)


def test_points_of_a_shower_see_each_other():
    net = _net()
    x, cond, batch, counts = _batch([6])
    out = net(x, cond, batch, counts)
    x2 = x.clone()
    x2[5] += 3.0
    out2 = net(x2, cond, batch, counts)
    assert not torch.allclose(out2[:5], out[:5], atol=1e-3)


def test_starts_as_zero_and_refuses_unordered_batches():
    torch.manual_seed(0)
    net = SetTransformer(4, 4, 6, dim=16, heads=2, layers=1, inducing=3)
    x, cond, batch, counts = _batch([2, 3])
    assert torch.equal(net(x, cond, batch, counts), torch.zeros(5, 4))  # adaLN-Zero start
    with pytest.raises(ValueError, match="contiguous"):
        net(x, cond, batch.flip(0), counts)
    with pytest.raises(ValueError, match="multiple of transformer.heads"):
        SetTransformer(4, 4, 6, dim=10, heads=3)
