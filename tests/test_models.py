"""The two denoisers: shapes for every preset, adaLN-Zero init, patching, label dropout."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import devices, perturb_
from simple_dit.config import PRESETS, DiTConfig, UNetConfig, get_preset
from simple_dit.errors import UserError
from simple_dit.models import DiT, UNetCond, build_model, count_parameters
from simple_dit.models.embeddings import LabelEmbedder


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_maps_images_to_images(name):
    config = get_preset(name)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    assert isinstance(model, DiT if config.model.arch == "dit" else UNetCond)
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([0, 999], dtype=torch.long)
    y = torch.tensor([3, 10], dtype=torch.long)  # a real class and the null class
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 1, 28, 28)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["dit-tiny", "dit-mini"])
def test_fresh_dit_outputs_exactly_zero(name):
    """adaLN-Zero: gates and the final projection start at zero, so the model predicts eps = 0."""
    torch.manual_seed(0)
    model = build_model(get_preset(name).model)
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 5, 9, 10])
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            out = model(x, t, y)
        assert out.shape == x.shape
        assert torch.count_nonzero(out) == 0
    # ...and it is the init that does it: the same network with nudged weights is not zero.
    perturb_(model)
    with torch.no_grad():
        assert torch.count_nonzero(model.eval()(x, t, y)) > 0


def test_dit_output_depends_on_x_t_and_y():
    torch.manual_seed(0)
    model = perturb_(build_model(get_preset("dit-tiny").model)).eval()
    x = torch.randn(1, 1, 28, 28)
    t, y = torch.tensor([100]), torch.tensor([3])
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x + 0.5, t, y))
        assert not torch.allclose(base, model(x, torch.tensor([900]), y))
        assert not torch.allclose(base, model(x, t, torch.tensor([10])))
        # Deterministic in eval mode.
        assert torch.equal(base, model(x, t, y))


@pytest.mark.parametrize("patch", [2, 4, 7])
def test_unpatchify_inverts_patching(patch):
    model = DiT(input_size=28, patch_size=patch, hidden_size=32, depth=1, num_heads=2)
    g = 28 // patch
    x = torch.randn(2, 1, 28, 28)
    # Tokens in raster order of patches, each patch flattened as (row-in-patch, col-in-patch, channel).
    tokens = x.reshape(2, 1, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, patch * patch)
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("patch, channels", [(2, 1), (4, 1), (7, 3)])
def test_the_patch_embedding_is_the_papers_strided_convolution(patch, channels, device):
    """One matrix product over the flattened patches computes the stride-p convolution with the
    same weights, values and gradients, tokens in raster order. In float64: cuDNN convolves fp32
    in TF32 by default, which rounds to 1e-3."""
    import torch.nn.functional as F

    from simple_dit.models.dit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(channels, 16, patch).to(device, torch.float64)
    x = torch.randn(3, channels, 28, 28, device=device, dtype=torch.float64)
    ours = embed(x)
    conv = F.conv2d(x, embed.weight, embed.bias, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, conv, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad(out, [embed.weight, embed.bias], upstream) for out in (ours, conv)]
    for g_ours, g_conv in zip(*grads):
        torch.testing.assert_close(g_ours, g_conv, rtol=1e-10, atol=1e-10)


def test_label_dropout_only_in_training():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    labels = torch.arange(10)
    null = emb.embedding_table.weight[10]
    emb.train()
    assert torch.equal(emb(labels), null.expand(10, 8))  # every label dropped to the null class
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table.weight[:10])
    assert emb.null_class == 10


def test_tiny_presets_are_tiny():
    for name in ("dit-tiny", "unet-tiny"):
        assert count_parameters(build_model(get_preset(name).model)) < 200_000


def test_cpu_attention_equals_the_fused_kernel():
    import torch.nn.functional as F

    from simple_dit.models.dit import Attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 49, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(Attention.attend(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(7, 7), (14, 14), (3, 5), (1, 2)])
def test_the_gpu_upsampling_is_bilinear_with_its_gradient(size):
    """The UNet's upsampling on a GPU (sums of shifted copies, no atomic additions in its backward)
    computes PyTorch's bilinear x2, values and gradients, for channels-last input too and under
    vmap (runs trained together)."""
    import torch.nn.functional as F

    from simple_dit.models.unet import bilinear_2x_by_sums

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours, theirs = bilinear_2x_by_sums(x), F.interpolate(x, scale_factor=2, mode="bilinear")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(theirs.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(theirs, x, upstream)[0], rtol=1e-5, atol=1e-5)
    stacked = torch.randn(4, 2, 3, *size, generator=g)
    torch.testing.assert_close(torch.func.vmap(bilinear_2x_by_sums)(stacked), F.interpolate(stacked.flatten(0, 1), scale_factor=2, mode="bilinear").unflatten(0, (4, 2)))


def test_reference_dit_computes_the_same_function():
    from simple_dit.bench import reference_model
    from simple_dit.config import get_preset
    from simple_dit.models import build_model

    from conftest import perturb_

    config = get_preset("dit-tiny").model
    torch.manual_seed(0)
    ours = perturb_(build_model(config)).eval()
    reference = reference_model(config).eval()
    reference.load_state_dict(ours.state_dict())
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 100, 999]), torch.tensor([0, 3, 7, 10])
    torch.testing.assert_close(reference(x, t, y), ours(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, fragment", [
    (None, "a model config is a DiTConfig or a UNetConfig"), ({"arch": "dit"}, "a model config is"),
    (DiTConfig(hidden_size="32"), "model.hidden_size must be a positive integer"), (DiTConfig(patch_size=5), "does not divide"),
    (DiTConfig(hidden_size=-32), "model.hidden_size"), (DiTConfig(mlp_ratio=float("nan")), "model.mlp_ratio"),
    (DiTConfig(hidden_size=32, num_heads=5), "not divisible by 5 heads"), (DiTConfig(depth=0), "model.depth"),
    (DiTConfig(num_classes=2**70), "model.num_classes"), (UNetConfig(channels=(8, 16)), "model.channels"),
    (UNetConfig(channels=(0, 16, 32)), "model.channels"), (UNetConfig(input_size=27), "divisible by 4"),
    (UNetConfig(arch="dit"), "does not match its UNetConfig"), (DiTConfig(mlp_ratio=1e300), "model.mlp_ratio"),
])  # fmt: skip
def test_build_model_refuses_a_bad_config_in_one_line(config, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        build_model(config)
