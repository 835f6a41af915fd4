"""The DDPM schedule, posterior, samplers and classifier-free guidance against closed forms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import devices, perturb_
from simple_dit.config import get_preset
from simple_dit.diffusion import DiffusionConfig, GaussianDiffusion, guided_prediction, make_betas, make_process
from simple_dit.errors import UserError
from simple_dit.models import build_model


def linear_schedule(T: int, start: float = 1e-4, end: float = 0.02):
    """betas, alphas, alpha_bars as plain Python floats, computed by hand."""
    betas = [start + (end - start) * i / (T - 1) for i in range(T)]
    alphas = [1 - b for b in betas]
    alpha_bars, prod = [], 1.0
    for a in alphas:
        prod *= a
        alpha_bars.append(prod)
    return betas, alphas, alpha_bars


def stub_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A known, deterministic 'network': linear in x, shifted by t and y."""
    return 0.3 * x + 0.01 * (t.float() + 1).view(-1, 1, 1, 1) - 0.02 * y.float().view(-1, 1, 1, 1)


# ---- schedule ----------------------------------------------------------------------------------


def test_linear_schedule_matches_closed_form():
    d = GaussianDiffusion()
    betas, alphas, alpha_bars = linear_schedule(1000)
    assert d.num_timesteps == 1000 and d.betas.shape == (1000,)
    assert d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    torch.testing.assert_close(d.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.alphas, torch.tensor(alphas, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.alpha_bars, torch.tensor(alpha_bars, dtype=torch.float64), rtol=1e-10, atol=1e-15)
    # The familiar end point of the DDPM schedule: almost no signal is left at t = T-1.
    assert 3.5e-5 < d.alpha_bars[-1].item() < 4.5e-5
    assert torch.all(d.alpha_bars[1:] < d.alpha_bars[:-1])
    assert d.alpha_bars_prev[0].item() == 1.0
    torch.testing.assert_close(d.alpha_bars_prev[1:], d.alpha_bars[:-1], rtol=0, atol=0)


def test_posterior_variance_formula():
    d = GaussianDiffusion()
    betas, _, alpha_bars = linear_schedule(1000)
    expected = [0.0] + [betas[t] * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) for t in range(1, 1000)]
    torch.testing.assert_close(d.posterior_variance, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert d.posterior_variance[0].item() == 0.0
    # The posterior is narrower than the forward step: beta~_t <= beta_t.
    assert torch.all(d.posterior_variance <= d.betas)


def test_cosine_schedule_is_bounded_and_follows_its_closed_form():
    T = 1000
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, beta_schedule="cosine"))
    assert torch.all(d.betas > 0) and torch.all(d.betas <= 0.999)
    assert torch.all((d.alpha_bars > 0) & (d.alpha_bars < 1))
    assert torch.all(d.alpha_bars[1:] < d.alpha_bars[:-1])
    assert d.alpha_bars[0].item() > 0.999 and d.alpha_bars[-1].item() < 1e-3
    assert torch.all(torch.isfinite(d.posterior_variance)) and torch.all(d.posterior_variance >= 0)
    # alpha_bar_t = f(t+1) / f(0), f(u) = cos^2(((u/T) + s) / (1 + s) * pi/2), wherever beta is not capped.
    s = 0.008

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(d.alpha_bars[: T - 1], expected, rtol=1e-9, atol=1e-12)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="beta schedule"):
        make_betas(DiffusionConfig(beta_schedule="quadratic"))


def test_q_sample_is_the_closed_form():
    d = GaussianDiffusion()
    _, _, alpha_bars = linear_schedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 5, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 5, 5, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    xt = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = alpha_bars[ti]
        # (q_sample forms 1 - alpha_bar in float32, which costs ~1e-4 relative precision in
        # sqrt(1 - alpha_bar) at t = 0; hence atol 1e-5 rather than float32 round-off.)
        torch.testing.assert_close(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_mean_and_variance(t):
    """x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I), checked empirically."""
    d = GaussianDiffusion()
    _, _, alpha_bars = linear_schedule(1000)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    xt = d.q_sample(x0, torch.full((n,), t), noise)
    ab = alpha_bars[t]
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-5)


# ---- timesteps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 3, 7, 25, 50, 999, 1000])
def test_timesteps_decrease_from_T_minus_1_to_0(steps):
    ts = GaussianDiffusion().timesteps(steps)
    assert ts[0] == 999 and ts[-1] == 0
    assert len(ts) == steps
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert all(isinstance(t, int) for t in ts)


def test_all_timesteps_walk_every_step():
    assert GaussianDiffusion().timesteps(1000) == list(range(999, -1, -1))
    assert GaussianDiffusion(DiffusionConfig(num_timesteps=5)).timesteps(5) == [4, 3, 2, 1, 0]
    assert GaussianDiffusion().timesteps(1) == [999]


@pytest.mark.parametrize("objective", ["eps", "flow"])
@pytest.mark.parametrize("steps", [0, -1, 1001, 10**9])
def test_timesteps_out_of_range(steps, objective):
    """Flow's steps are capped too: a billion of them would have filled the memory with times."""
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        make_process(DiffusionConfig(objective=objective)).timesteps(steps)


@pytest.mark.parametrize("objective, samplers", [("eps", ["ddpm", "ddim", "dpm++2m"]), ("flow", ["euler", "heun"])])
def test_a_default_step_count_fits_a_short_process(objective, samplers):
    """A two-step process of a toy config samples with its defaults; they are not refused."""
    process = make_process(DiffusionConfig(objective=objective, num_timesteps=2))
    for sampler in samplers:
        assert 1 <= process.default_steps(sampler) <= 2 and process.timesteps(process.default_steps(sampler))


# ---- samplers ----------------------------------------------------------------------------------


def hand_ddpm(T, labels, shape, seed):
    """The article's ancestral sampler, written out: returns every intermediate x and the generator."""
    betas, alphas, alpha_bars = linear_schedule(T)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((labels.shape[0], *shape), generator=g)
    states = []
    for t in reversed(range(T)):
        eps = stub_eps(x, torch.full((labels.shape[0],), t), labels)
        mu = (x - (1 - alphas[t]) / math.sqrt(1 - alpha_bars[t]) * eps) / math.sqrt(alphas[t])
        if t > 0:
            std = math.sqrt((1 - alphas[t]) * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]))
            x = mu + std * torch.randn(x.shape, generator=g)
        else:
            x = mu  # no noise at the last step
        states.append(x)
    return states, g


@pytest.mark.parametrize("T,shape,tol", [(5, (1, 6, 6), 1e-6), (1000, (1, 2, 2), 1e-4)])
def test_ddpm_all_steps_is_the_articles_update(T, shape, tol):
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T))
    labels = torch.tensor([0, 4, 9])
    seen = []
    g = torch.Generator().manual_seed(123)
    out = d.sample(
        stub_eps, labels, sampler="ddpm", guidance=1.0, null_class=10, generator=g, image_shape=shape,
        on_step=lambda i, x: seen.append(x.clone()),
    )
    expected, g_hand = hand_ddpm(T, labels, shape, seed=123)
    assert len(seen) == T
    for i in (0, 1, T // 2, T - 2, T - 1):
        torch.testing.assert_close(seen[i], expected[i], rtol=tol, atol=tol)
    torch.testing.assert_close(out, expected[-1], rtol=tol, atol=tol)
    # Exactly one initial draw and T-1 noise draws: none at the last step.
    assert torch.equal(g.get_state(), g_hand.get_state())


def test_ddpm_last_step_adds_no_noise():
    """The output is the posterior mean computed from the state before the last step, nothing added."""
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=5))
    labels = torch.tensor([1, 2])
    before_last = {}

    def on_step(i, x):
        if i == 3:
            before_last["x"] = x.clone()

    out = d.sample(stub_eps, labels, sampler="ddpm", guidance=1.0, null_class=10,
                   generator=torch.Generator().manual_seed(0), image_shape=(1, 4, 4), on_step=on_step)  # fmt: skip
    _, alphas, alpha_bars = linear_schedule(5)
    x = before_last["x"]
    eps = stub_eps(x, torch.zeros(2, dtype=torch.long), labels)
    mu = (x - (1 - alphas[0]) / math.sqrt(1 - alpha_bars[0]) * eps) / math.sqrt(alphas[0])
    torch.testing.assert_close(out, mu, rtol=1e-6, atol=1e-6)


def test_ddim_matches_hand_computation_with_respacing():
    T, steps = 5, 3
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T))
    _, _, alpha_bars = linear_schedule(T)
    labels = torch.tensor([3, 7])
    out = d.sample(stub_eps, labels, sampler="ddim", steps=steps, guidance=1.0, null_class=10,
                   generator=torch.Generator().manual_seed(5), image_shape=(1, 4, 4))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 1, 4, 4), generator=g)
    ts = [4, 2, 0]
    for i, t in enumerate(ts):
        ab = alpha_bars[t]
        ab_prev = alpha_bars[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = stub_eps(x, torch.full((2,), t), labels)
        x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert out.abs().max().item() <= 1.0 + 1e-6  # the last step returns the clipped x0


@pytest.fixture(scope="module")
def random_dit():
    torch.manual_seed(0)
    return perturb_(build_model(get_preset("dit-tiny").model), seed=1).eval()


def test_ddim_is_deterministic_given_the_seed(random_dit):
    d = GaussianDiffusion()
    labels = torch.tensor([0, 3, 7, 9])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = d.sample(random_dit, labels, sampler="ddim", steps=8, guidance=2.0, null_class=10, generator=g)
        return x, g

    a, g_a = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert a.shape == (4, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # eta = 0: the only randomness is the starting noise.
    g_ref = torch.Generator().manual_seed(0)
    torch.randn((4, 1, 28, 28), generator=g_ref)
    assert torch.equal(g_a.get_state(), g_ref.get_state())


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(UserError, match="sampler"):
        GaussianDiffusion().sample(stub_eps, torch.tensor([0]), sampler="euler", null_class=10)


# ---- classifier-free guidance ------------------------------------------------------------------


class CountingModel:
    def __init__(self, model):
        self.model = model
        self.batch_sizes = []
        self.labels = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        self.labels.append(y.clone())
        return self.model(x, t, y)


def test_guidance_one_is_the_conditional_prediction(random_dit):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 500, 990]), torch.tensor([1, 5, 8])
    counting = CountingModel(random_dit)
    with torch.no_grad():
        out = guided_prediction(counting, x, t, y, 1.0, null_class=10)
        cond = random_dit(x, t, y)
    assert torch.equal(out, cond)
    assert counting.batch_sizes == [3]


@pytest.mark.parametrize("guidance", [0.0, 2.0, 4.5])
def test_guidance_combines_both_predictions_in_one_batched_call(random_dit, guidance):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 500, 990]), torch.tensor([1, 5, 8])
    counting = CountingModel(random_dit)
    with torch.no_grad():
        out = guided_prediction(counting, x, t, y, guidance, null_class=10)
        eps_c = random_dit(x, t, y)
        eps_u = random_dit(x, t, torch.full_like(y, 10))
    assert not torch.allclose(eps_c, eps_u, atol=1e-3)  # the check below is not vacuous
    assert counting.batch_sizes == [6]  # once, with the batch doubled
    assert sorted(counting.labels[0].tolist()) == sorted(y.tolist() + [10, 10, 10])
    torch.testing.assert_close(out, eps_u + guidance * (eps_c - eps_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices)
def test_the_training_tables_are_on_the_device_before_the_first_step(device):
    """A compiled training step must find q_sample's tables on its device, not copy them there."""
    process = make_process(DiffusionConfig()).ready_for(device)
    x0 = torch.zeros(2, 1, 28, 28, device=device)
    before = dict(process._tables_on)
    process.q_sample(x0, torch.tensor([0, 999], device=device), torch.randn_like(x0))
    assert process._tables_on == before and all(t.device == x0.device for pair in before.values() for t in pair)


@pytest.mark.parametrize("change, fragment", [
    ({"num_timesteps": 10.5}, "num_timesteps must be"), ({"num_timesteps": "10"}, "num_timesteps must be"),
    ({"num_timesteps": 2**70}, "num_timesteps must be"), ({"num_timesteps": 0}, "num_timesteps must be"),
    ({"beta_start": -0.1}, "betas must satisfy"), ({"beta_end": 2.0}, "betas must satisfy"), ({"objective": "x0"}, "unknown objective"),
    ({"objective": ["eps"]}, "unknown objective"), ({"beta_schedule": [1]}, "unknown beta schedule"),
])  # fmt: skip
def test_a_process_refuses_a_bad_config_in_one_line(change, fragment):
    """Built directly or through make_process: not NaN tables or an error at the first sample."""
    config = dataclasses.replace(DiffusionConfig(), **change)
    for build in (make_process, GaussianDiffusion):
        with pytest.raises(UserError, match=fragment):
            build(config)
