"""The CPU training step of one preset, ours against the plain reference and against ours with
one lever at a time turned back (fused attention, tanh GELU in bf16, the patch embedding as a
convolution), timed interleaved in one process so that the ratios are fair on a machine whose
speed drifts. DiT presets only.

    .venv/bin/python bench/train_levers.py --preset dit-seed --batch-size 128 --repeats 5 [--compile]

``--compile`` adds ours through ``torch.compile`` (its compilation happens in the untimed warm-up
calls, and is printed apart).

Prints images/s per variant and each one's ratio to the reference; the last line is one JSON object.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from simple_dit.bench import ConvPatchEmbed, FusedAttention, interleaved_median_seconds, median_seconds, reference_model, run_script
from simple_dit.config import get_preset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model
from simple_dit.models.dit import Mlp
from simple_dit.runtime import compile_model, count_arg, cpu_has_fast_bf16, keep_freed_memory
from simple_dit.train import make_optimizer, train_step


class TanhMlp(Mlp):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-seed")
    ap.add_argument("--batch-size", type=count_arg(1), default=128)
    ap.add_argument("--repeats", type=count_arg(1), default=5)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()
    config = get_preset(args.preset)
    device = torch.device("cpu")
    diffusion = make_process(config.diffusion)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    bf16 = "bf16" if cpu_has_fast_bf16() else "fp32"

    def variant(model, precision, fused_adamw=True, swap=None, patch_embed=None, compiled=False):
        if patch_embed is not None:
            model.x_embedder.__class__ = patch_embed
        for block in getattr(model, "blocks", []):
            for name, cls in (swap or {}).items():
                getattr(block, name).__class__ = cls
        opt = make_optimizer(model, config, device) if fused_adamw else torch.optim.AdamW(model.parameters(), lr=config.train.lr)
        forward = compile_model(model, device) if compiled else model
        return lambda: train_step(forward, diffusion, opt, x, y, precision=precision)

    fns = {
        "reference (fp32, fused attention)": variant(reference_model(config.model), "fp32", fused_adamw=False),
        f"ours ({bf16})": variant(build_model(config.model), bf16),
        f"ours ({bf16}), fused attention": variant(build_model(config.model), bf16, swap={"attn": FusedAttention}),
        f"ours ({bf16}), tanh GELU": variant(build_model(config.model), bf16, swap={"mlp": TanhMlp}),
        f"ours ({bf16}), convolution patch embedding": variant(build_model(config.model), bf16, patch_embed=ConvPatchEmbed),
        "ours (fp32)": variant(build_model(config.model), "fp32"),
    }
    if args.compile:
        fns[f"ours ({bf16}), compiled"] = step = variant(build_model(config.model), bf16, compiled=True)
        print(f"compiling ours ({bf16}): {median_seconds(step, device, warmup=0, repeats=1):.1f} s (first step, not timed)")
    seconds = interleaved_median_seconds(fns, device, warmup=2, repeats=args.repeats)
    ref = seconds["reference (fp32, fused attention)"]
    rows = {name: {"images_per_s": args.batch_size / s, "x_reference": ref / s} for name, s in seconds.items()}
    for name, r in rows.items():
        print(f"{name:>46}: {r['images_per_s']:7.1f} images/s  {r['x_reference']:.2f}x reference")
    print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    run_script(main)
