"""Every sampler, driven by the exact denoiser of a one-point data distribution, lands on that point."""

import pytest
import torch

from simple_dit.diffusion import GUIDE_EVERY_STEP, DiffusionConfig, GaussianDiffusion, RectifiedFlow
from simple_dit.errors import UserError

TARGET = torch.linspace(-0.8, 0.8, 28 * 28).reshape(1, 1, 28, 28)


class ExactEps(torch.nn.Module):
    """For data = TARGET, x_t = a x* + s eps, so the true noise is (x_t - a x*) / s."""

    def __init__(self, process: GaussianDiffusion):
        super().__init__()
        self.abar = process.alpha_bars.float()

    def forward(self, x, t, y):
        abar = self.abar[t].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * TARGET) / (1 - abar).sqrt()


class ExactVelocity(torch.nn.Module):
    """For data = TARGET, x_t = (1 - t) x* + t n, so the velocity n - x* is (x_t - x*) / t."""

    def __init__(self, process: RectifiedFlow):
        super().__init__()
        self.scale = process.num_timesteps - 1

    def forward(self, x, t, y):
        return (x - TARGET) / (t / self.scale).view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddim", 50), ("dpm++2m", 10), ("dpm++2m", 20), ("ddpm", 1000), ("ddpm", 25)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_eps_samplers_recover_a_point_mass(sampler, steps, schedule):
    process = GaussianDiffusion(DiffusionConfig(beta_schedule=schedule))
    labels = torch.zeros(4, dtype=torch.long)
    x = process.sample(ExactEps(process), labels, sampler=sampler, steps=steps, guidance=1.0, null_class=10,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.allclose(x, TARGET.expand_as(x), atol=1e-3), (x - TARGET).abs().max()


@pytest.mark.parametrize("sampler,steps", [("euler", 5), ("euler", 50), ("heun", 5)])
def test_flow_samplers_recover_a_point_mass(sampler, steps):
    process = RectifiedFlow(DiffusionConfig(objective="flow"))
    labels = torch.zeros(4, dtype=torch.long)
    x = process.sample(ExactVelocity(process), labels, sampler=sampler, steps=steps, guidance=1.0, null_class=10,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.allclose(x, TARGET.expand_as(x), atol=1e-4)


def test_sampler_must_match_the_objective():
    with pytest.raises(UserError, match="does not apply"):
        GaussianDiffusion().sample(ExactEps(GaussianDiffusion()), torch.zeros(1, dtype=torch.long), sampler="euler", null_class=10)


class CountingVelocity(ExactVelocity):
    """ExactVelocity that records the batch size and model time of every call."""

    def __init__(self, process):
        super().__init__(process)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], round(float(t[0]) / self.scale, 4)))
        return super().forward(x, t, y)


@pytest.mark.parametrize(
    "interval,expected",
    [
        (None, [(8, 1.0), (8, 0.75), (8, 0.5), (4, 0.25)]),  # a flow model's default, [0.3, 1]: the last step unguided
        (GUIDE_EVERY_STEP, [(8, 1.0), (8, 0.75), (8, 0.5), (8, 0.25)]),
        ((0.6, 0.9), [(4, 1.0), (8, 0.75), (4, 0.5), (4, 0.25)]),
    ],
)
def test_guidance_runs_only_inside_its_interval(interval, expected):
    process = RectifiedFlow(DiffusionConfig(objective="flow"))
    model = CountingVelocity(process)
    process.sample(model, torch.zeros(4, dtype=torch.long), steps=4, guidance=3.0, guidance_interval=interval, null_class=10)
    assert model.calls == expected


@pytest.mark.parametrize("steps", [10, 20, 40, 50, 100])
def test_a_step_on_the_intervals_edge_is_guided_at_every_step_count(steps):
    """t = 0.3 is a step of each of these grids: guided, whichever way float32 rounds it."""
    process = RectifiedFlow(DiffusionConfig(objective="flow"))
    model = CountingVelocity(process)
    process.sample(model, torch.zeros(1, dtype=torch.long), steps=steps, guidance=3.0, guidance_interval=(0.3, 1.0), null_class=10)
    guided = [t for size, t in model.calls if size == 2]
    assert len(guided) == round(0.7 * steps) + 1 and min(guided) == pytest.approx(0.3)


def test_eps_models_are_guided_at_every_step_by_default():
    process = GaussianDiffusion()
    exact, sizes = ExactEps(process), []

    def model(x, t, y):
        sizes.append(x.shape[0])
        return exact(x, t, y)

    process.sample(model, torch.zeros(4, dtype=torch.long), steps=10, guidance=3.0, null_class=10)
    assert sizes == [8] * 10


def test_an_unguided_step_is_the_conditional_prediction():
    """Outside the interval the step sees the labels, not the null class, and no guidance mix."""
    process = RectifiedFlow(DiffusionConfig(objective="flow"))
    labels = torch.arange(4)

    class LabelShift(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x) + y.view(-1, 1, 1, 1).float()

    def run(interval):
        return process.sample(LabelShift(), labels, steps=2, guidance=3.0, guidance_interval=interval, null_class=10,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip

    # Velocity y everywhere, guided: 10 + 3 (y - 10); a step of size 1/2 moves x by -v/2.
    unguided_last = run((0.6, 1.0)) - run((0.0, 1.0))  # the t = 0.5 step differs: -(y)/2 against -(10 + 3 (y - 10))/2
    expected = (-(labels.float()) / 2 + (10 + 3 * (labels.float() - 10)) / 2).view(-1, 1, 1, 1)
    assert torch.allclose(unguided_last, expected.expand_as(unguided_last), atol=1e-5)


@pytest.mark.parametrize("interval", [(0.5,), (1.0, 0.0), (-0.1, 1.0), (0.0, 1.5), ("a", "b"), 0.3])
def test_a_bad_guidance_interval_is_refused(interval):
    process = RectifiedFlow(DiffusionConfig(objective="flow"))
    with pytest.raises(UserError, match="guidance interval"):
        process.sample(ExactVelocity(process), torch.zeros(1, dtype=torch.long), guidance=3.0, guidance_interval=interval, null_class=10)
