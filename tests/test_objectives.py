"""Objectives of the point network against cases with known answers: flow matching on Gaussian
data (the analytic velocity field and its optimal-transport map), consistency distillation from
the exact Gaussian denoiser (the teacher's ODE solution in one step)."""

import math

import pytest
import torch
from torch import nn

from pcshower.models.objectives import EDM, OBJECTIVES, Consistency, FlowMatching, build_objective
from pcshower.models.samplers import ode_euler, ode_heun, ode_midpoint

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 1.5, 0.7  # data ~ N(MU, S^2)


def fm_velocity(x, t, sigma_min=0.0):
    """Marginal velocity of the OT path for N(MU, S^2) data: x_t ~ N(t MU, a_t^2 + t^2 S^2)
    with a_t = 1 - (1 - sigma_min) t, so v = d(mean)/dt + (d std/dt / std) (x - mean)."""
    a = 1 - (1 - sigma_min) * t
    var = a * a + t * t * S * S
    dstd_over_std = (-(1 - sigma_min) * a + t * S * S) / var
    return MU + dstd_over_std * (x - t * MU)


def test_flow_matching_euler_is_exact_for_a_shift():
    # S = 1, sigma_min = 0: every path is straight with the same velocity MU, one step is exact
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    out = ode_euler(lambda x, t: torch.full_like(x, MU), z.clone(), torch.tensor([0.0, 1.0]))
    assert torch.allclose(out, z + MU)


@pytest.mark.parametrize("solver, steps, tol", [(ode_heun, 64, 1e-3), (ode_midpoint, 64, 1e-3),
                                                (ode_euler, 512, 2e-2)])
@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
def test_flow_matching_solvers_reach_the_ot_map(solver, steps, tol, sigma_min):
    # the marginal flow of Gaussian to Gaussian is the monotone (OT) map z -> MU + std_1 z
    z = torch.linspace(-4, 4, 201, dtype=torch.float64)
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    out = solver(lambda x, t: fm_velocity(x, t, sigma_min), z.clone(), ts)
    assert torch.allclose(out, MU + math.sqrt(S * S + sigma_min ** 2) * z, atol=tol * S)


def test_flow_matching_loss_is_smallest_at_the_true_velocity():
    fm = FlowMatching(sigma_min=0.0)
    g = torch.Generator().manual_seed(0)
    x = MU + S * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    batch = torch.arange(20000)

    def loss(scale, shift):
        return float(fm.loss(lambda xt, t: scale * fm_velocity(xt, t[:, None]) + shift, x, batch,
                             20000, torch.Generator().manual_seed(1)))

    best = loss(1.0, 0.0)
    assert best < loss(1.1, 0.0) and best < loss(0.9, 0.0) and best < loss(1.0, 0.1)


class _Tiny(nn.Module):
    """A small MLP of (x, t) for 1-D toys."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                               nn.Linear(64, 1))

    def forward(self, x, t):
        return self.f(torch.cat([x, t[:, None].expand(len(x), 1).to(x.dtype)], 1))


def test_flow_matching_learns_a_gaussian():
    torch.manual_seed(0)
    net, fm = _Tiny(), FlowMatching()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        x = MU + S * torch.randn(256, 1, generator=g)
        # one "shower" per point: each gets its own time
        loss = fm.loss(net, x, torch.arange(256), 256, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = fm.sample(net, (5000, 1), torch.arange(5000), 5000, 8, "heun",
                        torch.Generator().manual_seed(2))
    assert abs(float(out.mean()) - MU) < 0.05 and abs(float(out.std()) - S) < 0.05


def gaussian_denoiser(x, sigma):
    return MU + S ** 2 / (S ** 2 + sigma[:, None] ** 2) * (x - MU)


def exact_consistency(x, sigma, sigma_min):
    """The PF-ODE of Gaussian data keeps (x - MU) / sqrt(S^2 + sigma^2) constant."""
    return MU + (x - MU) * math.sqrt(S ** 2 + sigma_min ** 2) / (S ** 2 + sigma ** 2).sqrt()


def test_consistency_boundary_condition_and_calls():
    cm = Consistency()
    sigma = torch.full((3,), cm.sigma_min)
    x = torch.randn(3, 4)
    out = cm.function(lambda xi, t: torch.randn_like(xi) * 100, x, sigma, torch.arange(3))
    assert torch.allclose(out, x)  # f(x, sigma_min) = x whatever the network says
    assert cm.network_calls("multistep", 2) == 2
    levels = cm.sample_levels(2)
    assert levels[0] == cm.sigma_max and cm.sigma_min < levels[1] < cm.sigma_max
    assert len(cm.levels()) == cm.bins and (cm.levels().diff() > 0).all()
    with pytest.raises(ValueError, match="multistep"):
        cm.network_calls("heun", 2)


def test_consistency_loss_vanishes_at_the_exact_function():
    cm = Consistency(sigma_data=1.0, bins=40)
    sd2 = cm.sigma_data ** 2

    def exact_net(x_in, c_noise):
        # the raw network output that makes f the exact consistency function
        sigma = (4 * c_noise).exp()[:, None].double()
        x = x_in * (sigma ** 2 + sd2).sqrt()
        c_skip = sd2 / ((sigma - cm.sigma_min) ** 2 + sd2)
        c_out = (sigma - cm.sigma_min) * cm.sigma_data / (sigma ** 2 + sd2).sqrt()
        return (exact_consistency(x, sigma, cm.sigma_min) - c_skip * x) / c_out

    g = torch.Generator().manual_seed(0)
    x = MU + S * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    batch = torch.arange(4000)
    exact = float(cm.loss(exact_net, x, batch, 4000, g, teacher=gaussian_denoiser))
    off = float(cm.loss(lambda xi, c: 1.05 * exact_net(xi, c), x, batch, 4000, g,
                        teacher=gaussian_denoiser))
    assert exact < 1e-4 * S ** 2 and off > 100 * exact
    with pytest.raises(ValueError, match="teacher"):
        cm.loss(exact_net, x, batch, 4000, g)


def test_consistency_distillation_reproduces_the_teacher_in_one_step():
    torch.manual_seed(0)
    cm = Consistency(bins=18)
    net = _Tiny()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        x = MU + S * torch.randn(256, 1, generator=g)
        loss = cm.loss(net, x, torch.arange(256), 256, g, teacher=gaussian_denoiser)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x_t = MU + torch.linspace(-2, 2, 201)[:, None] * math.sqrt(S ** 2 + cm.sigma_max ** 2)
    with torch.no_grad():
        one = cm.function(net, x_t, torch.full((201,), cm.sigma_max), torch.arange(201))
    truth = exact_consistency(x_t, torch.full((201, 1), cm.sigma_max), cm.sigma_min)
    # measured 0.072 S at worst, 0.038 S rms over the +-2 sigma range of x_T
    assert float((one - truth).abs().max()) < 0.15 * S
    assert float((one - truth).pow(2).mean().sqrt()) < 0.06 * S
    with torch.no_grad():
        out = cm.sample(net, (5000, 1), torch.arange(5000), 5000, 1, "multistep",
                        torch.Generator().manual_seed(3))
    assert abs(float(out.mean()) - MU) < 0.05 and abs(float(out.std()) - S) < 0.07


def test_edm_objective_samples_the_gaussian():
    edm = EDM()

    def raw(x_in, c_noise):  # the raw output whose preconditioned denoiser is the exact one
        sigma = (4 * c_noise).exp()[:, None]
        c_skip, c_out, c_in, _ = edm.coefficients(sigma)
        x = x_in / c_in
        return (gaussian_denoiser(x, sigma[:, 0]) - c_skip * x) / c_out

    out = edm.sample(raw, (20000, 1), torch.zeros(20000, dtype=torch.long), 1, 200, "heun",
                     torch.Generator().manual_seed(0))
    x_t = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)) * edm.sigma_max
    exact = MU + (x_t - MU) * S / math.sqrt(S ** 2 + edm.sigma_max ** 2)
    assert torch.allclose(out, exact, atol=3e-3 * S)  # Heun: error ~ 1/N^2
    assert edm.network_calls("heun", 16) == 31 and edm.network_calls("euler", 4) == 4


def test_build_objective_and_bad_settings():
    cfg = {"objective": "consistency", "edm": {"sigma_data": 1.0, "p_mean": 0, "p_std": 1,
                                                "sigma_min": 0.01, "sigma_max": 40.0, "rho": 7.0},
           "consistency": {"bins": 10, "mode": "training", "target_decay": 0.0}}
    cm = build_objective(cfg)
    assert isinstance(cm, Consistency) and cm.sigma_max == 40.0 and cm.bins == 10
    assert set(OBJECTIVES) == {"edm", "flow_matching", "consistency"}
    with pytest.raises(ValueError, match="unknown objective 'ddpm'"):
        build_objective({**cfg, "objective": "ddpm"})
    with pytest.raises(ValueError, match="logit_normal"):
        FlowMatching(time="beta")
    with pytest.raises(ValueError, match="bins"):
        Consistency(bins=1)
    assert FlowMatching().network_calls("heun", 3) == 6
    assert FlowMatching().network_calls("euler", 3) == 3
