"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Written from the paper: patchify, timestep and label embeddings summed into a conditioning vector
c, a stack of adaLN-Zero blocks, an adaptive final layer, unpatchify.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import LabelEmbedder, timestep_embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Conv2d):
    """Each p x p patch's pixels mapped linearly to one D-vector: the paper's stride-p convolution,
    with its weights (and checkpoint keys), done as one matrix product over the flattened patches:
    PyTorch's CPU convolution of a 1-channel image is slow enough that a 2-core CPU's bf16 training
    step of dit-mini or dit-seed runs 5-9% faster this way (BENCHMARKS.md)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        p = self.stride[0]
        patches = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
        return F.linear(patches.reshape(N, -1, C * p * p), self.weight.flatten(1), self.bias)  # (N, T, D), raster order


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP (the paper's 256 frequencies)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape  # N images of T tokens of width D; h heads of D/h channels each
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # each (N, h, T, D/h)
        x = self.attend(q, k, v)  # (N, h, T, D/h)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # heads side by side again: (N, T, D)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v. On a GPU, PyTorch's fused kernel; on a CPU, for DiT's short
        sequences, the three plain ops train faster than the fused CPU kernel (BENCHMARKS.md)."""
        if q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        return plain_attention(q, k, v)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v from three plain ops."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v  # (N, h, T, T) @ (N, h, T, D/h)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (N, T, 4D)
        # The paper's tanh-approximated GELU. In bf16 the erf form is the same function as far as
        # bf16 can tell (they differ by at most 5e-4; bf16 rounds GELU's output by up to 8e-3) and
        # PyTorch's CPU kernel for it is several times faster (BENCHMARKS.md).
        return self.fc2(F.gelu(h, approximate="none" if h.dtype == torch.bfloat16 else "tanh"))  # (N, T, D)


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated by c, with residual gates initialised to zero."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D) tokens, c: (N, D) conditioning; every shift/scale/gate below is (N, D), one per image
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C): one patch per token


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions: half the channels encode the row, half the column."""
    if embed_dim % 4:
        raise ValueError("hidden size must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class DiT(nn.Module):
    def __init__(
        self,
        input_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide image size {input_size}")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # (1, T, D) fixed positions, T = grid_size**2; not in checkpoints (recomputed here)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, config) -> "DiT":
        """The network a ``DiTConfig`` describes."""
        return cls(
            input_size=config.input_size,
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            hidden_size=config.hidden_size,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=config.num_classes,
            class_dropout_prob=config.class_dropout_prob,
        )

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch embedding is a linear map of each flattened patch.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model's output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens back to (N, C, H, W) images, T = g*g patches in raster order."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (N, g, g, p, p, C): patch row, patch column, pixel in patch
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, g * p, g * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W) noisy images, t: (N,) timesteps, y: (N,) labels (num_classes = "no label")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D): one D-vector per p x p patch, T = (H/p)*(W/p) in raster order
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D): one conditioning vector per image
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x)  # (N, C, H, W)
