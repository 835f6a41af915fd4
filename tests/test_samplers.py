"""Every sampler, driven by the exact denoiser of a one-point data distribution, lands on that point."""

import pytest
import torch

from simple_dit.diffusion import DiffusionConfig, GaussianDiffusion, RectifiedFlow

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
    from simple_dit.errors import UserError

    with pytest.raises(UserError, match="does not apply"):
        GaussianDiffusion().sample(ExactEps(GaussianDiffusion()), torch.zeros(1, dtype=torch.long), sampler="euler", null_class=10)
