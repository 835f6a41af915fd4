"""Conditioning embeddings shared by both denoisers."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LabelEmbedder(nn.Module):
    """Class labels to vectors, with one extra "null" row that classifier-free guidance uses.

    While training, each label is replaced by the null class with probability ``dropout_prob`` so
    that the same network also learns the unconditional prediction. The draw uses the global
    torch RNG, whose state every checkpoint stores, so a resumed run drops the same labels.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with each replaced by the null class with probability ``dropout_prob``."""
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels)
        return self.embedding_table(labels)
