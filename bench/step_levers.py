"""A DiT preset's training step as training takes it (``train.make_step``: with ``--compile`` the
compiled network, on a GPU replayed as one CUDA graph), against the same step with one lever at a
time, timed interleaved in one process so that the ratios are fair on a machine whose speed
drifts. It tries a lever on a lent GPU before the package takes it in; the levers live here, not
in the package.

    .venv/bin/python bench/step_levers.py --preset dit-mini [--batch-size 32] [--device cuda] [--compile] [--repeats 10]

The levers, for the two GPU targets still missed on an H200 (BENCHMARKS.md, "Fourth GPU check"):
dit-mini's step at batch 32 is bound by its ~420 kernel launches, dit-seed's at 1024 by the bytes
its elementwise kernels move.

- combo kernels (``--compile`` only): inductor launches independent small kernels as one.
- one product for adaLN: every block's and the final layer's modulation from one matrix product
  of SiLU(c), c being the same for all of them (the same weights, concatenated): 2 x depth fewer
  products and bias sums in each step.
- bf16 residual stream (bf16 precision only): each block hands on its output in bf16 where
  autocast keeps it in fp32; on the H200 it took 4% off dit-seed's step at 1024 (a patch, before
  this script). It changes the numerics, which a lever that pays would have to measure first.

Prints images/s per variant and its ratio to ours; the last line is one JSON object.
"""

import contextlib
import json

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from simple_dit.bench import calls_per_timing, interleaved_median_seconds, run_script
from simple_dit.config import DiTConfig, get_preset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model
from simple_dit.models.dit import DiT, DiTBlock, modulate
from simple_dit.runtime import device_name, keep_freed_memory, parse_device
from simple_dit.train import make_optimizer, make_step, training_precision
from step_parts import step_arguments  # a sibling: a script's own directory is on its import path


class OneProductAdaLN(DiT):
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        layers = [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]
        weight, bias = torch.cat([layer.weight for layer in layers]), torch.cat([layer.bias for layer in layers])
        modulations = F.linear(F.silu(c), weight, bias).split([layer.out_features for layer in layers], dim=1)
        for block, m in zip(self.blocks, modulations):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m.chunk(6, dim=1)  # each (N, D)
            x = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
            x = x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
        shift, scale = modulations[-1].chunk(2, dim=1)
        final = self.final_layer
        return self.unpatchify(final.linear(modulate(final.norm_final(x), shift, scale)))


class BF16ResidualBlock(DiTBlock):
    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return super().forward(x, c).to(torch.bfloat16)


def main() -> None:
    ap = step_arguments(repeats=10)
    args = ap.parse_args()
    config = get_preset(args.preset)
    if not isinstance(config.model, DiTConfig):
        ap.error(f"--preset {args.preset}: the levers are a DiT's; choose a DiT preset")
    keep_freed_memory()
    dev = parse_device(args.device)
    precision = training_precision(config.train.precision, dev)
    batch = args.batch_size or config.train.batch_size
    diffusion = make_process(config.diffusion).ready_for(dev)
    torch.manual_seed(0)
    x = torch.randn(batch, config.model.in_channels, config.model.input_size, config.model.input_size, device=dev)
    y = torch.randint(0, config.model.num_classes, (batch,), device=dev)

    def variant(model_class=None, block_class=None, inductor=None):
        torch.manual_seed(0)
        model = build_model(config.model)
        if model_class is not None:
            model.__class__ = model_class
        for block in model.blocks if block_class is not None else []:
            block.__class__ = block_class
        model = model.to(dev).train()
        optimizer = make_optimizer(model, config, dev)
        with inductor_config.patch(inductor) if inductor else contextlib.nullcontext():  # read while make_step compiles
            step, _ = make_step(model, model, diffusion, optimizer, x, y, precision=precision, grad_clip=config.train.grad_clip,
                                compile=args.compile, capture=args.compile and dev.type == "cuda")  # fmt: skip
        return lambda: step(x, y)

    fns = {"ours": variant(), "one product for adaLN": variant(model_class=OneProductAdaLN)}
    if args.compile:
        fns["combo kernels"] = variant(inductor={"combo_kernels": True})
    if precision == "bf16":
        fns["bf16 residual stream"] = variant(block_class=BF16ResidualBlock)
    seconds = interleaved_median_seconds(fns, dev, warmup=3, repeats=args.repeats, calls=calls_per_timing(dev))
    rows = {name: {"images_per_s": batch / s, "x_ours": seconds["ours"] / s} for name, s in seconds.items()}
    print(f"{args.preset} batch {batch} ({precision}, {'compiled' if args.compile else 'eager'}) on {device_name(dev)}:")
    for name, row in rows.items():
        print(f"{name:>24}: {row['images_per_s']:10,.1f} images/s  {row['x_ours']:.3f}x ours")
    print(json.dumps({"preset": args.preset, "batch_size": batch, "precision": precision, "compiled": args.compile,
                      "device": device_name(dev), "torch": torch.__version__, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    run_script(main)
