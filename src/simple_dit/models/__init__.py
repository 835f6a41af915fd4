"""The two denoisers, both called as ``model(x_t, t, y) -> eps``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import DiTConfig, ModelConfig, validate_model_config
from .dit import DiT
from .unet import UNetCond

__all__ = ["DiT", "UNetCond", "build_model", "count_parameters", "forward_gflops", "parameters_and_gflops"]


def build_model(config: ModelConfig) -> nn.Module:
    validate_model_config(config)
    return (DiT if isinstance(config, DiTConfig) else UNetCond).from_config(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: nn.Module, image_size: int = 28) -> float:
    """GFLOPs of one forward pass for one image (a multiply-add counts as two), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the dummy inputs go where the weights are
    x = torch.zeros(1, model.in_channels, image_size, image_size, device=device)
    t = y = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def parameters_and_gflops(config: ModelConfig) -> tuple[int, float]:
    """The parameter count and forward GFLOPs per image of the network ``config`` describes,
    counted on the meta device: no memory and no initialisation (seconds for DiT-B on a CPU)."""
    with torch.device("meta"):
        model = build_model(config)
    return count_parameters(model), forward_gflops(model, config.input_size)
