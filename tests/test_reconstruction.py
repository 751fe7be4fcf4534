"""Reconstruction-level checks: PCA shower-axis angle, linear calibration, response/resolution."""

import math

import numpy as np
import pytest
import torch

from pcshower.evaluate.observables import deposit_observables
from pcshower.evaluate.reconstruction import (binned_angle, binned_response, linear_calibration,
                                              plot_reconstruction, reconstruction_check)


def _direction(theta, phi):
    return torch.tensor([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi),
                         math.cos(theta)], dtype=torch.float64)


def _line_showers(thetas, phis, *, n=400, spread=3.0, seed=0):
    """Deposits along straight lines through (1800 mm, 0, 0)-ish points with Gaussian transverse
    scatter of ``spread`` mm and exponential energies: the principal axis is the line."""
    g = torch.Generator().manual_seed(seed)
    xyz, energy, shower = [], [], []
    for k, (th, ph) in enumerate(zip(thetas, phis)):
        d = _direction(th, ph)
        t = 150.0 * torch.rand(n, generator=g, dtype=torch.float64)  # 15 cm along the axis
        helper = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        if abs(float(d @ helper)) > 0.9:
            helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        u = torch.linalg.cross(d, helper)
        u = u / u.norm()
        v = torch.linalg.cross(d, u)
        a, b = (spread * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
        start = 1800.0 * torch.tensor([math.cos(ph), math.sin(ph), 0.2 * k], dtype=torch.float64)
        xyz.append(start + t[:, None] * d + a[:, None] * u + b[:, None] * v)
        energy.append(torch.empty(n, dtype=torch.float64).exponential_(generator=g))
        shower.append(torch.full((n,), k, dtype=torch.int64))
    xyz, energy, shower = torch.cat(xyz), torch.cat(energy), torch.cat(shower)
    return energy, shower, xyz


@pytest.mark.parametrize("tilt_deg", [0.0, 4.0])
def test_pca_axis_recovers_the_polar_angle_of_a_line_of_deposits(tilt_deg):
    """The PCA polar angle is the line's, whatever incident axis is given (it only orients the
    axis and sets the transverse basis): a 4 deg wrong incident axis changes nothing."""
    thetas = [math.radians(a) for a in (30, 45, 62, 90, 110)]
    phis = [0.3, 1.2, 2.0, 4.0, 5.5]
    axis = torch.stack([_direction(th + math.radians(tilt_deg), ph) for th, ph in zip(thetas, phis)])
    for spread, tolerance in ((0.0, 1e-9), (0.5, 3e-3)):
        e, shower, xyz = _line_showers(thetas, phis, spread=spread)
        obs = deposit_observables(e, shower, len(thetas), xyz=xyz, layer=torch.zeros_like(shower),
                                  num_layers=1, incident_energy=torch.ones(len(thetas)),
                                  radial_edges=[0, 10, 1000], axis=axis)
        got = obs.scalars["pca_theta"].numpy()
        # with scatter: ~ spread / (150 mm / sqrt 12) / sqrt(~200 effective deposits) = 0.8 mrad
        assert np.abs(got - np.array(thetas)).max() < tolerance


def test_pca_axis_of_a_shower_with_too_few_deposits_is_the_incident_axis():
    e = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    xyz = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    shower = torch.tensor([0, 0, 1])
    axis = torch.stack([_direction(math.radians(50), 0.0), _direction(math.radians(70), 1.0)])
    obs = deposit_observables(e, shower, 2, xyz=xyz, layer=torch.zeros(3, dtype=torch.int64),
                              num_layers=1, incident_energy=torch.ones(2), radial_edges=[0, 1, 10],
                              axis=axis)
    assert obs.scalars["pca_theta"].tolist() == pytest.approx([math.radians(50), math.radians(70)])


def test_linear_calibration_inverts_a_linear_response():
    inc = np.linspace(10, 100, 50)
    vis = (inc - 0.5) / 40.0
    a, b = linear_calibration(vis, inc)
    assert a == pytest.approx(40.0) and b == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least two showers"):
        linear_calibration([1.0, 1.0], [10.0, 20.0])


def test_binned_response_measures_a_known_resolution():
    rng = np.random.default_rng(3)
    inc = rng.uniform(10, 100, 40000)
    rec = inc * (1 + 0.05 * rng.standard_normal(inc.size))
    rows = binned_response(rec, inc, np.array([10.0, 55.0, 100.0]))
    for r in rows:
        assert abs(r["response"] - 1) < 3 * r["response_err"] + 1e-12
        assert abs(r["resolution"] - 0.05) < 3 * r["resolution_err"]
    angle = binned_angle(np.full(100, 0.51), np.full(100, 0.5), np.array([0.4, 0.6]))
    assert angle[0]["mean"] == pytest.approx(10.0) and angle[0]["std"] == pytest.approx(0.0)


class _Obs:
    def __init__(self, vis, pca, energy, theta):
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.scalars = {"visible_energy": t(vis), "pca_theta": t(pca)}
        self.conditions = {"energy": t(energy), "theta": t(theta)}


def test_reconstruction_check_sees_a_scale_error_and_an_angle_bias(tmp_path):
    rng = np.random.default_rng(5)
    n = 20000
    energy = rng.uniform(10, 100, n)
    theta = rng.uniform(0.5, 1.6, n)
    vis = 25.0 * energy * (1 + 0.04 * rng.standard_normal(n))  # MeV, 2.5 % sampling
    pca = theta + 0.01 * rng.standard_normal(n)
    ref = _Obs(vis, pca, energy, theta)
    same = reconstruction_check(ref, ref, bins=3)
    for row in same["energy"]:
        assert row["generated"] == row["reference"]
        assert abs(row["reference"]["response"] - 1) < 0.005
        assert abs(row["reference"]["resolution"] - 0.04) < 0.003
    off = reconstruction_check(_Obs(1.1 * vis, pca + 0.005, energy, theta), ref, bins=3)
    for row in off["energy"]:
        assert row["generated"]["response"] == pytest.approx(1.1, abs=0.01)
    for row in off["angle"]:
        assert row["generated"]["mean"] - row["reference"]["mean"] == pytest.approx(5.0, abs=0.5)
        assert row["generated"]["std"] == pytest.approx(10.0, rel=0.05)
    assert plot_reconstruction(off, tmp_path / "r.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="pca_theta"):
        bare = _Obs(vis, pca, energy, theta)
        del bare.scalars["pca_theta"]
        reconstruction_check(bare, ref)
