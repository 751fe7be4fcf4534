"""Shared fixtures: small random shower batches made in the test, never downloaded."""

import matplotlib
import numpy as np
import pytest
import torch

from pcshower import Showers

matplotlib.use("Agg")


def make_showers(n=20, max_points=40, seed=0, frame="detector", extra_features=()):
    """``n`` showers with 0..max_points-1 random points each and random conditions."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_points, (n,), generator=g)
    names = ("x", "y", "z", "e", *extra_features)
    points = torch.randn(int(counts.sum()), len(names), generator=g) * 50
    points[:, 3] = torch.rand(points.shape[0], generator=g) * 10
    return Showers.from_counts(
        points, counts, energy=10 + 90 * torch.rand(n, generator=g, dtype=torch.float64),
        theta=torch.rand(n, generator=g, dtype=torch.float64) * np.pi / 2,
        phi=torch.rand(n, generator=g, dtype=torch.float64) * 2 * np.pi - np.pi,
        particle=torch.where(torch.rand(n, generator=g) < 0.5, 22, 11),
        position=torch.randn(n, 3, generator=g, dtype=torch.float64) * 100,
        feature_names=names, frame=frame, metadata={"generator": "test", "seed": seed})


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small nets on a shared machine run fastest, and
    reproducibly, that way) and restore the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def showers():
    return make_showers()
