"""The small conditional UNet of the article (the book-style ``UNetCond``).

Two down blocks, a bottleneck and two up blocks of (conv3x3-BatchNorm-ReLU) x 2, max-pool down,
bilinear up, concatenated skips. The time encoding goes through a small MLP per block and is added
to the block's input; the label embedding is added to the time encoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import LabelEmbedder


def book_time_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The book's sinusoidal encoding (sin on even, cos on odd channels), for a whole batch at once."""
    i = torch.arange(dim, device=t.device)
    div_term = torch.exp(i / dim * math.log(10000.0))
    angles = t.float()[:, None] / div_term[None]
    return torch.where(i % 2 == 0, torch.sin(angles), torch.cos(angles))


def bilinear_2x_by_sums(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear")`` (align_corners=False) of (N, C, H, W),
    equal to rounding, built from shifted copies and sums, one spatial axis at a time: output 2i is
    0.75 x[i] + 0.25 x[i-1], output 2i+1 is 0.75 x[i] + 0.25 x[i+1], the edges repeated. Its
    backward is sums and slices, with no atomic additions."""

    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
        return torch.stack([torch.lerp(x, before, 0.25), torch.lerp(x, after, 0.25)], dim + 1).flatten(dim, dim + 1)

    return along(along(x, 2), 3)


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_embed_dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(),
        )  # fmt: skip
        self.mlp = nn.Sequential(nn.Linear(time_embed_dim, in_ch), nn.ReLU(), nn.Linear(in_ch, in_ch))

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.convs(x + self.mlp(v)[:, :, None, None])


class UNetCond(nn.Module):
    # oneDNN's convolutions run faster on channels-last tensors (BENCHMARKS.md); the weights are
    # stored that way too, and checkpoints still hold ordinary contiguous tensors.
    memory_format = torch.channels_last
    # Device types whose bilinear kernel adds its gradient with atomics (see ``upsample``).
    upsample_by_sums_on: tuple[str, ...] = ("cuda",)

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int, int] = (64, 128, 256),
        time_embed_dim: int = 100,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.in_channels = self.out_channels = in_channels
        self.time_embed_dim = time_embed_dim
        self.num_classes = num_classes
        self.down1 = ConvBlock(in_channels, c1, time_embed_dim)
        self.down2 = ConvBlock(c1, c2, time_embed_dim)
        self.bot1 = ConvBlock(c2, c3, time_embed_dim)
        self.up2 = ConvBlock(c2 + c3, c2, time_embed_dim)
        self.up1 = ConvBlock(c1 + c2, c1, time_embed_dim)
        self.out = nn.Conv2d(c1, in_channels, 1)
        self.label_emb = LabelEmbedder(num_classes, time_embed_dim, class_dropout_prob)
        self.to(memory_format=self.memory_format)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Bilinear x2. On a GPU from shifted copies and sums (``bilinear_2x_by_sums``), whose
        backward has no atomic additions: PyTorch's CUDA kernel adds the gradient with atomics, in
        whatever order the threads run (on an H200 fp32 UNet runs still did not repeat themselves
        without it, so it was not the only such kernel). On a CPU PyTorch's own kernel, ten times faster
        there (forward and backward at unet-seed's shapes, 2-core Zen 5), and repeatable (a
        compiled CPU run uses PyTorch's deterministic mode)."""
        if x.device.type not in self.upsample_by_sums_on:
            return F.interpolate(x, scale_factor=2, mode="bilinear")
        return bilinear_2x_by_sums(x).contiguous(memory_format=self.memory_format)

    @classmethod
    def from_config(cls, config) -> "UNetCond":
        """The network a ``UNetConfig`` describes."""
        return cls(
            in_channels=config.in_channels,
            channels=tuple(config.channels),
            time_embed_dim=config.time_embed_dim,
            num_classes=config.num_classes,
            class_dropout_prob=config.class_dropout_prob,
        )

    def encode_time(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, time_embed_dim). The book counts timesteps from 1 where the
        schedule indexes them from 0."""
        return book_time_encoding(t + 1, self.time_embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W); t, y: (N,); c1, c2, c3 are the constructor's channels.
        v = self.encode_time(t) + self.label_emb(y)  # (N, E), E = time_embed_dim
        x1 = self.down1(x.contiguous(memory_format=self.memory_format), v)  # (N, c1, H, W)
        x2 = self.down2(F.max_pool2d(x1, 2), v)  # (N, c2, H/2, W/2)
        x = self.bot1(F.max_pool2d(x2, 2), v)  # (N, c3, H/4, W/4)
        x = self.up2(torch.cat([self.upsample(x), x2], dim=1), v)  # (N, c2, H/2, W/2)
        x = self.up1(torch.cat([self.upsample(x), x1], dim=1), v)  # (N, c1, H, W)
        return self.out(x)  # (N, C, H, W)
