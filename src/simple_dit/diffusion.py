"""The DDPM process (Ho et al. 2020) with epsilon prediction, its samplers, and classifier-free guidance.

Timesteps are indexed 0..T-1; ``alpha_bars[t]`` is the signal fraction after step t, so x_t =
sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. Any increasing subsequence of timesteps defines
a shorter Markov chain with the same marginals (the "respacing" of Nichol & Dhariwal 2021), which
is how the ancestral sampler runs with fewer than T steps; with all T steps it is exactly the
article's sampler.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

# Classifier-free guidance scale of every sampling entry point, chosen on the 10-minute dit-mini
# (BENCHMARKS.md).
DEFAULT_GUIDANCE = 3.0
GUIDE_EVERY_STEP = (0.0, 1.0)  # the guidance interval that covers the whole path


@dataclass
class DiffusionConfig:
    objective: str = "eps"  # "eps": DDPM epsilon prediction; "flow": rectified-flow velocity
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" (1e-4..0.02, the article's) or "cosine"
    beta_start: float = 1e-4
    beta_end: float = 0.02


def make_process(config: DiffusionConfig | None = None) -> "GaussianDiffusion | RectifiedFlow":
    from .config import validate_diffusion_config

    config = validate_diffusion_config(config or DiffusionConfig())
    return OBJECTIVES[config.objective](config)


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    T = config.num_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    if config.beta_schedule == "cosine":
        # Nichol & Dhariwal 2021: alpha_bar follows a squared cosine, betas capped at 0.999.
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise UserError(f"unknown beta schedule {config.beta_schedule!r}; choose linear or cosine")


def guided_prediction(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float, null_class: int) -> torch.Tensor:
    """The model's prediction (eps, or the velocity of a flow model) under classifier-free
    guidance, uncond + g * (cond - uncond), both halves from one batched forward pass."""
    if guidance == 1.0:
        return model(x, t, y)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out.float().chunk(2)
    return uncond + guidance * (cond - uncond)


def check_guidance(guidance, name: str = "guidance") -> float:
    """A classifier-free guidance scale: finite and at least 0 (1 = none, 0 = unconditional)."""
    value = math.nan
    if isinstance(guidance, numbers.Real) and not isinstance(guidance, (bool, np.bool_)):
        try:
            value = float(guidance)
        except OverflowError:  # an int past float's range
            value = math.inf
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name} must be finite and at least 0 (1 = no guidance), got {guidance!r}")
    return value


def check_guidance_interval(interval, name: str = "the guidance interval") -> tuple[float, float]:
    """(lo, hi) from two numbers or the text "LO,HI"; a UserError unless 0 <= lo < hi <= 1."""
    values = interval.split(",") if isinstance(interval, str) else interval
    try:
        if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) for v in values):
            raise TypeError
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be two numbers LO,HI, got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"{name} must satisfy 0 <= LO < HI <= 1 (times from the data, 0, to pure noise, 1), got {lo:g},{hi:g}")
    return lo, hi


def check_sampler(process, sampler: str | None) -> str:
    if sampler is None:
        return process.samplers[0]
    if sampler not in process.samplers:
        raise UserError(
            f"sampler {sampler!r} does not apply to the {process.config.objective!r} objective; "
            f"choose one of: {', '.join(process.samplers)}"
        )
    return sampler


class ImageNoise:
    """Standard normal draws of shape (count, *image_shape), one after another: the starting noise,
    then DDPM's fresh noise at each step. From one generator for the whole batch, or, given one
    generator per image (as diffusers takes them), each image's from its own, on the generator's
    device: an image's noise then does not depend on the batch it is drawn in (one generator's
    stream does not split across calls of different sizes on a GPU), and CPU generators give it the
    same noise on every device. Per image, the first draw is one image and the rest come
    STEPS_AHEAD at a time, the same calls in whatever batch, so that a DDPM step does not cost a
    draw per image."""

    STEPS_AHEAD = 20

    def __init__(self, generator: torch.Generator | list[torch.Generator] | None, count: int, image_shape: tuple, device: torch.device):
        if isinstance(generator, list) and len(generator) != count:
            raise UserError(f"one generator per image: {len(generator)} generators for {count} images")
        self.generator, self.count, self.image_shape, self.device = generator, count, tuple(image_shape), device
        self._ahead: list[torch.Tensor] = []
        self._first = True

    def __call__(self) -> torch.Tensor:
        if not isinstance(self.generator, list):
            return torch.randn((self.count, *self.image_shape), generator=self.generator, device=self.device)
        if not self._ahead:
            k = 1 if self._first else self.STEPS_AHEAD
            block = torch.stack([torch.randn((k, *self.image_shape), generator=g, device=g.device) for g in self.generator], dim=1)
            self._ahead, self._first = list(block.to(self.device).unbind(0))[::-1], False
        return self._ahead.pop()


class _Process:
    """What both processes share: sampler selection and the sampling loop's frame. Subclasses
    define ``samplers`` (the first is the default), ``default_steps`` and ``_steps``, a generator
    of the successive states x from pure noise to the sample."""

    samplers: tuple[str, ...] = ()
    # Classifier-free guidance is applied where the path's time, as a fraction of it (0 = data,
    # 1 = pure noise), lies in [lo, hi]; elsewhere the conditional prediction alone, one forward
    # pass instead of two (the guidance interval of Kynkaanniemi et al. 2024).
    default_guidance_interval: tuple[float, float] = GUIDE_EVERY_STEP

    def __init__(self, config: DiffusionConfig):
        from .config import validate_diffusion_config

        self.config = validate_diffusion_config(config)  # a bad one fails here, not as NaN tables or at the first sample
        self.num_timesteps = config.num_timesteps

    def ready_for(self, device: torch.device | str) -> "_Process":
        """This process with the tables its training step reads already on ``device``: copied there
        inside a compiled step, they would be CPU inputs (no CUDA graphs) and cost a recompile."""
        return self

    def check_steps(self, steps: int) -> None:
        """Named for the API's argument and the command line's flag alike."""
        if not 1 <= steps <= self.num_timesteps:
            raise UserError(f"steps must be between 1 and {self.num_timesteps} (the process's timesteps), got {steps}")

    def training_loss(self, model, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective's MSE at a time and noise drawn from the global RNG."""
        return self.loss_at(model, x0, y, *self.training_draws(x0))

    @torch.no_grad()
    def sample(
        self,
        model,
        labels: torch.Tensor,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        null_class: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] for ``labels``; ``on_step(i, x)`` sees the state after each step.
        ``generator``: one for the batch, or a list of one per image (``ImageNoise``)."""
        sampler = check_sampler(self, sampler)
        lo, hi = check_guidance_interval(self.default_guidance_interval if guidance_interval is None else guidance_interval)
        noise = ImageNoise(generator, labels.shape[0], image_shape, labels.device)
        x = noise()

        def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
            """The prediction at model time t (a number in 0..T-1, the same for the whole batch)."""
            # An edge counts within a millionth: the flow's time grid is float32, where 0.3 is
            # 0.30000001 at 20 steps and 0.29999998 at 50, and [lo, hi] includes its edges.
            g = guidance if lo - 1e-6 <= t / (self.num_timesteps - 1) <= hi + 1e-6 else 1.0
            return guided_prediction(model, x, torch.full((x.shape[0],), t, device=x.device), labels, g, null_class).float()

        for i, x in enumerate(self._steps(denoise, x, sampler, steps or self.default_steps(sampler), noise)):
            if on_step is not None:
                on_step(i, x)
        return x


class GaussianDiffusion(_Process):
    samplers = ("ddim", "ddpm", "dpm++2m")  # the first is the default

    def __init__(self, config: DiffusionConfig | None = None):
        super().__init__(config or DiffusionConfig())
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.posterior_variance = self.betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)
        # Square roots taken in float64: sqrt(1 - alpha_bar) near t = 0 loses digits in float32.
        self.sqrt_alpha_bars = self.alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1 - self.alpha_bars).sqrt()
        self._tables_on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def ready_for(self, device: torch.device | str) -> "GaussianDiffusion":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the key a tensor's own device will give
            device = torch.device("cuda", torch.cuda.current_device())
        self._q_tables(device)
        return self

    def _q_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar) and sqrt(1 - alpha_bar) in float32 on ``device``, copied there once: a copy
        per training step is a host-to-device transfer, and inside a compiled step a CPU input that
        keeps the step out of CUDA graphs."""
        key = str(device)
        if key not in self._tables_on:
            self._tables_on[key] = (self.sqrt_alpha_bars.float().to(device), self.sqrt_one_minus_alpha_bars.float().to(device))
        return self._tables_on[key]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sqrt_alpha_bars, sqrt_one_minus_alpha_bars = self._q_tables(x0.device)
        shape = (-1, *([1] * (x0.ndim - 1)))  # one value per image, broadcast over its pixels
        return sqrt_alpha_bars[t].view(shape) * x0 + sqrt_one_minus_alpha_bars[t].view(shape) * noise

    def training_draws(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly drawn timestep per sample, and the noise."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        return t, torch.randn_like(x0)

    def loss_at(self, model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Epsilon-prediction MSE."""
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, y).float(), noise)

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` evenly spaced timesteps from T-1 down to 0."""
        self.check_steps(steps)
        return torch.linspace(self.num_timesteps - 1, 0, steps).round().long().unique_consecutive().tolist()

    def default_steps(self, sampler: str) -> int:
        # Never more than the process has (a short process of a toy config): a default is not refused.
        return min(self.num_timesteps, {"ddpm": self.num_timesteps, "ddim": 50, "dpm++2m": 20}[sampler])

    def _steps(self, denoise, x: torch.Tensor, sampler: str, steps: int, noise: ImageNoise):
        ts = self.timesteps(steps)
        previous = None  # DPM-Solver++'s last (x0 prediction, step size h)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            abar = self.alpha_bars[t].item()
            abar_prev = self.alpha_bars[t_prev].item() if t_prev >= 0 else 1.0
            eps = denoise(x, t)
            if sampler == "ddpm":
                beta = 1 - abar / abar_prev
                mean = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
                if t_prev >= 0:
                    std = math.sqrt(beta * (1 - abar_prev) / (1 - abar))
                    mean = mean + std * noise()
                x = mean
            elif sampler == "dpm++2m":
                x, previous = self._dpm_solver_2m_step(x, eps, abar, abar_prev, previous)
            else:
                # DDIM (eta = 0) with the x0 prediction clipped to the data range, and eps
                # re-derived from the clipped x0 so the update stays on the same line.
                x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
                x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
            yield x

    @staticmethod
    def _dpm_solver_2m_step(x, eps, abar, abar_next, previous):
        """One multistep DPM-Solver++(2M) step (Lu et al. 2022) in the data-prediction form.

        With alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma), the
        update is x' = (sigma'/sigma) x - alpha' (e^-h - 1) D, where h = lambda' - lambda and D
        extrapolates the x0 predictions of this and the previous step. The last step (to t = 0,
        where sigma' = 0) is first order, i.e. it returns the x0 prediction."""
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = (x - sigma * eps) / alpha
        if abar_next >= 1.0:
            return x0, None
        alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1 - abar_next)
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
        d = x0
        if previous is not None:
            x0_prev, h_prev = previous
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d, (x0, h)


class RectifiedFlow(_Process):
    """Rectified flow (Liu et al. 2022; the SD3 recipe of Esser et al. 2024).

    x_t = (1 - t) x_0 + t * noise for t in [0, 1]; the model predicts the velocity noise - x_0 and
    sampling integrates dx/dt = v from t = 1 to 0. Training times are logit-normal, which puts
    more weight on the middle of the path where the velocity is hardest to predict. The network
    sees t scaled to 0..num_timesteps so both objectives share the same time embeddings.
    """

    samplers = ("euler", "heun")
    # Near the data guidance changes little and still costs a second forward pass: on the default
    # model, guiding only where t >= 0.3 scores FID, label accuracy, precision and recall as well as
    # guiding every step, for 4, 10 and 20 Euler steps and two seeds (BENCHMARKS.md), and spares
    # one of the eight forward passes of the default 4-step sampler.
    default_guidance_interval = (0.3, 1.0)

    def _model_time(self, t: torch.Tensor | float) -> torch.Tensor | float:
        return t * (self.num_timesteps - 1)

    def training_draws(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A logit-normal time per sample, and the noise."""
        t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
        return t, torch.randn_like(x0)

    def loss_at(self, model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity MSE on the straight path from x0 (t = 0) to the noise (t = 1)."""
        t_ = t.view(-1, *([1] * (x0.ndim - 1)))
        v = model((1 - t_) * x0 + t_ * noise, self._model_time(t), y)
        return F.mse_loss(v.float(), noise - x0)

    def default_steps(self, sampler: str) -> int:
        # Few steps suffice for a straight-path flow model: on the default model, 4 Euler steps
        # score as well as 20 (the sweep is in BENCHMARKS.md); never more than the process has.
        return min(self.num_timesteps, 4 if sampler == "euler" else 10)

    def timesteps(self, steps: int) -> list[float]:
        self.check_steps(steps)  # as for DDPM, at most one step per time the network was trained to tell apart
        return torch.linspace(1.0, 0.0, steps + 1).tolist()

    def _steps(self, denoise, x: torch.Tensor, sampler: str, steps: int, noise: ImageNoise):
        ts = self.timesteps(steps)

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            return denoise(x, self._model_time(t))

        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            v = velocity(x, t)
            x_next = x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:
                # Heun: average the slopes at both ends (the last step stays Euler, as in EDM).
                x_next = x + (t_next - t) * 0.5 * (v + velocity(x_next, t_next))
            x = x_next
            yield x


# The registries every parser and validator reads: objective name -> process, and all samplers.
OBJECTIVES: dict[str, type[_Process]] = {"eps": GaussianDiffusion, "flow": RectifiedFlow}
SAMPLERS: tuple[str, ...] = tuple(s for process in OBJECTIVES.values() for s in process.samplers)
