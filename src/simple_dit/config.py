"""Typed configuration and the named presets.

A run is fully described by a ``RunConfig`` (model + diffusion + training), saved as JSON next to
its checkpoints. Presets are named ``RunConfig`` values; the CLI overrides individual fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Union

from .diffusion import DiffusionConfig
from .errors import UserError


@dataclass
class DiTConfig:
    arch: str = "dit"
    input_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1


@dataclass
class UNetConfig:
    arch: str = "unet"
    input_size: int = 28
    in_channels: int = 1
    channels: tuple[int, int, int] = (64, 128, 256)
    time_embed_dim: int = 100
    num_classes: int = 10
    class_dropout_prob: float = 0.1


ModelConfig = Union[DiTConfig, UNetConfig]


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    ema_decay: float = 0.9999  # the ceiling; the effective decay warms up from 0 (see train.ema_decay_at)
    # When to stop: the first of max_steps and minutes that is set (> 0), else after `epochs`.
    epochs: float = 10.0
    max_steps: int = 0
    minutes: float = 0.0  # training time only: sampling grids and checkpoints are not counted
    sample_every: int = 1000
    eval_every: int = 0  # steps between quality evaluations logged with the loss; 0 disables
    eval_n: int = 500  # samples per such evaluation
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False  # torch.compile the denoiser (CUDA graphs on a GPU); its compile time is logged apart


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        try:
            model_d = dict(d["model"])
            model_cls = {"dit": DiTConfig, "unet": UNetConfig}[model_d["arch"]]
            if "channels" in model_d:
                model_d["channels"] = tuple(model_d["channels"])
            return cls(
                model=model_cls(**model_d),
                diffusion=DiffusionConfig(**d["diffusion"]),
                train=TrainConfig(**d["train"]),
                preset=d.get("preset", "custom"),
                description=d.get("description", ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"invalid run configuration: {e}") from None


def _dit(name: str, description: str, train: TrainConfig, **model) -> RunConfig:
    return RunConfig(model=DiTConfig(**model), train=train, preset=name, description=description)


def _unet(name: str, description: str, train: TrainConfig, **model) -> RunConfig:
    return RunConfig(model=UNetConfig(**model), train=train, preset=name, description=description)


# Every preset, in one table. The DiT paper's sizes: S is 384 wide with 6 heads, B 768 wide with
# 12 heads, both 12 deep; /2, /4, /7 is the patch size.
_SMOKE = dict(ema_decay=0.99, sample_every=50, checkpoint_every=50, log_every=5)
PRESETS: dict[str, RunConfig] = {
    # Chosen by 10-minute runs on a 2-core CPU (BENCHMARKS.md): rectified flow because epsilon
    # prediction drew no digits in that time; a short EMA (0.995, ~200 steps) because a longer one
    # averages in the first half of such a short run.
    "dit-mini": RunConfig(
        model=DiTConfig(patch_size=4, hidden_size=128, depth=6, num_heads=4),
        diffusion=DiffusionConfig(objective="flow"),
        train=TrainConfig(lr=3e-3, batch_size=32, warmup_steps=200, grad_clip=1.0, ema_decay=0.995, sample_every=250, checkpoint_every=250),
        preset="dit-mini",
        description="small rectified-flow DiT for a 2-core CPU: clean digits in about 10 minutes",
    ),
    "dit-seed": _dit("dit-seed", "the article's DiT: patch 4, hidden 384, depth 12, 6 heads", TrainConfig(lr=1e-4, batch_size=128),
                     patch_size=4, hidden_size=384, depth=12, num_heads=6),
    "unet-seed": _unet("unet-seed", "the article's book-style UNetCond, 64-128-256 channels", TrainConfig(lr=1e-3, batch_size=128)),
    "dit-tiny": _dit("dit-tiny", "smoke-test DiT (seconds to train; not for results)", TrainConfig(lr=1e-3, batch_size=32, **_SMOKE),
                     patch_size=7, hidden_size=32, depth=2, num_heads=2),
    "unet-tiny": _unet("unet-tiny", "smoke-test UNet (seconds to train; not for results)", TrainConfig(lr=1e-3, batch_size=32, **_SMOKE),
                       channels=(8, 16, 32), time_embed_dim=16),
    "dit-s-2": _dit("dit-s-2", "DiT-S/2 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "dit-s-4": _dit("dit-s-4", "DiT-S/4 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=4, hidden_size=384, depth=12, num_heads=6),
    "dit-s-7": _dit("dit-s-7", "DiT-S/7 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=7, hidden_size=384, depth=12, num_heads=6),
    "dit-b-2": _dit("dit-b-2", "DiT-B/2 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "dit-b-4": _dit("dit-b-4", "DiT-B/4 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "dit-b-7": _dit("dit-b-7", "DiT-B/7 of the paper at 28x28", TrainConfig(lr=1e-4, batch_size=128), patch_size=7, hidden_size=768, depth=12, num_heads=12),
    # Parameter-matched counterparts of the article's two models, for `simple-dit compare`.
    "dit-unet-size": _dit("dit-unet-size", "DiT with unet-seed's parameter count (2.17M): patch 4, hidden 128, depth 7, 4 heads",
                          TrainConfig(lr=3e-4, batch_size=128), patch_size=4, hidden_size=128, depth=7, num_heads=4),
    "unet-dit-size": _unet("unet-dit-size", "UNetCond with dit-seed's parameter count (32.6M): 252-504-1008 channels",
                           TrainConfig(lr=3e-4, batch_size=128), channels=(252, 504, 1008)),
}  # fmt: skip

DEFAULT_PRESET = "dit-mini"


def get_preset(name: str) -> RunConfig:
    """A fresh copy of a preset, safe to modify."""
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name].to_dict())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# The plain Python numbers a config holds (it is saved as JSON, as compare's records are); a bool is not one.
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_model_config(m: ModelConfig) -> ModelConfig:
    """The model part of ``validate_config``, which ``build_model`` runs too: a one-line
    ``UserError`` naming the field, not an error from deep inside a layer."""
    from .runtime import MAX_COUNT

    _check(isinstance(m, (DiTConfig, UNetConfig)), f"a model config is a DiTConfig or a UNetConfig, got {type(m).__name__}")
    # A config of one architecture must say so (a run saved as another would not load).
    _check(m.arch == ("dit" if isinstance(m, DiTConfig) else "unet"), f"model.arch {m.arch!r} does not match its {type(m).__name__}")
    sizes = ("input_size", "in_channels", "num_classes") + (("patch_size", "hidden_size", "depth", "num_heads") if isinstance(m, DiTConfig) else ("time_embed_dim",))
    for name in sizes:
        value = getattr(m, name)
        _check(_is_int(value) and 0 < value <= MAX_COUNT, f"model.{name} must be a positive integer, got {value!r}")
    p = m.class_dropout_prob
    _check(is_number(p) and 0 <= p < 1, f"model.class_dropout_prob must be in [0, 1), got {p!r}")
    if isinstance(m, DiTConfig):
        # The MLP's width as DiTBlock rounds it: 0.01 x 32 would build an MLP of no units.
        _check(is_number(m.mlp_ratio) and 0 < m.mlp_ratio * m.hidden_size <= MAX_COUNT and int(m.mlp_ratio * m.hidden_size) >= 1,
               f"model.mlp_ratio must be a positive number giving the MLP from 1 to {MAX_COUNT:,} units (times hidden_size "
               f"{m.hidden_size}), got {m.mlp_ratio!r}")  # fmt: skip
        _check(m.input_size % m.patch_size == 0, f"patch size {m.patch_size} does not divide image size {m.input_size}")
        _check(m.hidden_size % m.num_heads == 0, f"hidden size {m.hidden_size} is not divisible by {m.num_heads} heads")
        _check(m.hidden_size % 4 == 0, f"hidden size {m.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
    else:
        _check(isinstance(m.channels, (tuple, list)) and len(m.channels) == 3 and all(_is_int(c) and 0 < c <= MAX_COUNT for c in m.channels),
               f"model.channels must be three positive integers, got {m.channels!r}")  # fmt: skip
        _check(m.input_size % 4 == 0, f"the UNet halves the image twice: its size must be divisible by 4, got {m.input_size}")
    return m


MAX_MINUTES = 10**7


def validate_config(config: RunConfig) -> RunConfig:
    """The one check of a run's recipe, shared by the CLI, compare and the Python API: every bad
    value is a one-line ``UserError`` naming the option."""
    from .data import DATASETS
    from .runtime import MAX_COUNT, PRECISIONS, check_seed

    _check(isinstance(config, RunConfig), f"expected a RunConfig (e.g. get_preset('dit-mini')), got {type(config).__name__}")
    _check(isinstance(config.model, (DiTConfig, UNetConfig)) and isinstance(config.diffusion, DiffusionConfig)
           and isinstance(config.train, TrainConfig), "a RunConfig holds a DiTConfig or UNetConfig, a DiffusionConfig and a TrainConfig")  # fmt: skip
    _check(isinstance(config.preset, str) and isinstance(config.description, str),
           f"a RunConfig's preset and description are strings, got {config.preset!r} and {config.description!r}")  # fmt: skip
    tc, m, d = config.train, config.model, config.diffusion

    def number(name: str) -> float:
        value = getattr(tc, name)
        _check(is_number(value) and math.isfinite(value), f"{_flag(name)} must be a finite number, got {value!r}")
        return value

    for name in ("lr", "batch_size", "epochs", "eval_n", "log_every"):
        _check(number(name) > 0, f"{_flag(name)} must be positive")
    for name in ("warmup_steps", "max_steps", "minutes", "sample_every", "checkpoint_every", "eval_every", "grad_clip", "weight_decay"):
        _check(number(name) >= 0, f"{_flag(name)} must be 0 (off) or positive")
    for name in ("batch_size", "max_steps", "warmup_steps", "sample_every", "checkpoint_every", "eval_every", "eval_n", "log_every", "seed"):
        _check(_is_int(getattr(tc, name)), f"{_flag(name)} must be an integer, got {getattr(tc, name)!r}")
        _check(name == "seed" or getattr(tc, name) <= MAX_COUNT, f"{_flag(name)} must be at most {MAX_COUNT:,}, got {getattr(tc, name)}")
    check_seed(tc.seed)
    _check(tc.minutes <= MAX_MINUTES, f"--minutes must be at most {MAX_MINUTES:,} (about 19 years), got {tc.minutes:g}")
    _check(isinstance(tc.compile, bool), f"compile must be true or false, got {tc.compile!r}")
    _check(0 <= number("ema_decay") < 1, "--ema-decay must be in [0, 1)")
    _check(tc.eval_n >= 6, "--eval-n must be at least 6")
    _check(isinstance(tc.dataset, str) and tc.dataset in DATASETS, f"unknown dataset {tc.dataset!r}; choose one of: {', '.join(DATASETS)}")
    _check(isinstance(tc.precision, str) and tc.precision in PRECISIONS, f"unknown precision {tc.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    validate_model_config(m)
    validate_diffusion_config(d)
    return config


def validate_diffusion_config(d: DiffusionConfig) -> DiffusionConfig:
    """The diffusion part of ``validate_config``, which every diffusion process runs on its config too."""
    from .diffusion import OBJECTIVES

    _check(isinstance(d, DiffusionConfig), f"a diffusion config is a DiffusionConfig, got {type(d).__name__}")
    _check(isinstance(d.objective, str) and d.objective in OBJECTIVES, f"unknown objective {d.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    # The process keeps tables of T float64s; 100 times DDPM's 1000 is far past any use.
    _check(_is_int(d.num_timesteps) and 2 <= d.num_timesteps <= 100_000,
           f"diffusion.num_timesteps must be an integer from 2 to 100,000, got {d.num_timesteps!r}")  # fmt: skip
    _check(isinstance(d.beta_schedule, str) and d.beta_schedule in ("linear", "cosine"), f"unknown beta schedule {d.beta_schedule!r}; choose linear or cosine")
    if d.beta_schedule == "linear":
        _check(is_number(d.beta_start) and is_number(d.beta_end) and 0 < d.beta_start <= d.beta_end < 1,
               f"diffusion betas must satisfy 0 < beta_start <= beta_end < 1, got {d.beta_start!r} and {d.beta_end!r}")  # fmt: skip
    return d
