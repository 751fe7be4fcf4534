"""EDM samplers against the exact probability-flow ODE solution for Gaussian data."""

import math

import pytest
import torch

from pcshower.models.edm import EDM
from pcshower.models.samplers import karras_sigmas, sample_euler, sample_heun

MU, S = 1.5, 0.7  # data ~ N(MU, S^2)


def gaussian_denoiser(x, sigma):
    """Optimal denoiser for N(MU, S^2) data: E[x0 | x] = MU + S^2/(S^2+sigma^2) (x - MU)."""
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def exact(x_t, sigma_max):
    # the PF-ODE keeps (x - MU)/sqrt(S^2 + sigma^2) constant
    return MU + (x_t - MU) * S / math.sqrt(S ** 2 + sigma_max ** 2)


def test_karras_sigmas_shape_and_ends():
    s = karras_sigmas(10, 0.002, 80.0, 7.0, dtype=torch.float64)
    assert s.shape == (11,) and s[-1] == 0
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=torch.float64))
    assert torch.isclose(s[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (s[:-1] > s[1:]).all()
    assert torch.equal(karras_sigmas(1, dtype=torch.float64), torch.tensor([80.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        karras_sigmas(0)


# max |error| / S over 20k samples out to 4 standard deviations; Heun converges as 1/N^2
@pytest.mark.parametrize("sampler, steps, tol", [(sample_heun, 25, 0.15), (sample_heun, 200, 0.003),
                                                 (sample_euler, 200, 0.08)])
def test_samplers_hit_the_gaussian_answer(sampler, steps, tol):
    g = torch.Generator().manual_seed(0)
    sigmas = karras_sigmas(steps, 0.002, 80.0, 7.0, dtype=torch.float64)
    x_t = MU + torch.randn(20000, generator=g, dtype=torch.float64) * math.sqrt(S ** 2 + 80.0 ** 2)
    x0 = sampler(gaussian_denoiser, x_t.clone(), sigmas)
    assert torch.allclose(x0, exact(x_t, 80.0), atol=tol * S)
    target = exact(x_t, 80.0)
    assert abs(float(x0.mean() - target.mean())) < 0.01 * S
    assert abs(float(x0.std()) - S) < 0.05 * S


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    sigmas = karras_sigmas(25, dtype=torch.float64)
    x_t = torch.linspace(-100, 100, 101, dtype=torch.float64)
    err_e = (sample_euler(gaussian_denoiser, x_t, sigmas) - exact(x_t, 80.0)).abs().max()
    err_h = (sample_heun(gaussian_denoiser, x_t, sigmas) - exact(x_t, 80.0)).abs().max()
    assert err_h < err_e / 3


def test_edm_preconditioning_is_consistent():
    edm = EDM(sigma_data=0.5)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm.coefficients(sigma)
    # EDM Table 1: c_in gives the network unit-variance input; lambda * c_out^2 = 1 (eq. 8)
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + 0.25), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(c_skip + sigma ** 2 / (sigma ** 2 + 0.25), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(edm.loss_weight(sigma) * c_out ** 2, torch.ones(3, dtype=torch.float64))
