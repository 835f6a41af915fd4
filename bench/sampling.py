"""Sampling speed against quality for a trained run: each (sampler, steps[, guidance interval])
draws the same n class-cycled images (same seed), timed, then scored with the evaluation metrics.
The row with the most forward passes per image (steps, two per guided one) is the reference that
the others' FID is compared with.

    .venv/bin/python bench/sampling.py RUN_DIR|default [--n 1000] [--guidance 3] [--batch-size 500] \
        [--configs euler:5,euler:10,heun:5,euler:20,euler:50,euler:4:0-1] [--seed 0] [--device cuda]

A config's optional third part LO-HI is the guidance interval (default: the objective's). Prints a
markdown table (seconds for n images, the projection to 10,000, FID, FID / reference FID, label
accuracy, precision, recall, and "grey": the fraction of pixels between 10% and 90% ink, a blur
check that the classifier's features may not see) and, last, one JSON object with every row.
"""

import argparse
import json
import time

from simple_dit import Pipeline
from simple_dit.bench import run_script
from simple_dit.diffusion import DEFAULT_GUIDANCE
from simple_dit.errors import UserError
from simple_dit.evaluate import QualityMeter
from simple_dit.runtime import count_arg, keep_freed_memory


def _parse_config(text: str) -> tuple:
    """``sampler:steps[:lo-hi]`` as (sampler, steps, (lo, hi) or None)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or int(parts[1]) < 1:
            raise ValueError
        interval = tuple(float(v) for v in parts[2].split("-")) if len(parts) == 3 else None
        if interval is not None and len(interval) != 2:
            raise ValueError
    except ValueError:
        raise UserError(f"--configs: {text!r} is not sampler:steps or sampler:steps:lo-hi, e.g. euler:10 or euler:4:0-1") from None
    return parts[0], int(parts[1]), interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--n", type=count_arg(1), default=1000)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--batch-size", type=count_arg(1), default=500)
    ap.add_argument("--device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="euler:5,euler:10,heun:5,euler:20,euler:50", help="sampler:steps, comma-separated")
    args = ap.parse_args()
    configs = [_parse_config(text) for text in args.configs.split(",")]  # before the model is loaded
    keep_freed_memory()  # as the CLI does: without it glibc returns and re-faults every batch's memory
    pipe = Pipeline.from_pretrained(args.run, device=args.device)
    meter = QualityMeter(pipe.config.train.dataset, progress=False)
    labels = pipe.cycled_labels(args.n)
    rows_seen = [0]  # images through the network; the sampling copy of the model keeps this hook
    pipe.model.register_forward_hook(lambda module, inputs, output: rows_seen.__setitem__(0, rows_seen[0] + inputs[0].shape[0]))
    rows = []
    for config, (sampler, steps, interval) in zip(args.configs.split(","), configs):
        interval = interval or pipe.diffusion.default_guidance_interval
        rows_seen[0], start = 0, time.perf_counter()
        images = pipe(labels, sampler=sampler, steps=steps, guidance=args.guidance, guidance_interval=interval, seed=args.seed,
                      batch_size=args.batch_size)  # fmt: skip
        seconds = time.perf_counter() - start
        scores = meter.score(images, labels)
        grey = ((images > 0.1 * 255) & (images < 0.9 * 255)).float().mean().item()
        passes = rows_seen[0] / args.n  # two per guided evaluation, one per unguided one
        rows.append({"sampler": sampler, "steps": steps, "guidance_interval": interval, "forward_passes_per_image": passes, "seconds": seconds,
                     "seconds_per_10k": seconds * 10_000 / args.n, "fid": scores.fid, "label_accuracy": scores.label_accuracy,
                     "precision": scores.precision, "recall": scores.recall, "grey": grey})  # fmt: skip
        print(f"{config} done in {seconds:.0f} s: FID {scores.fid:.3f}, label accuracy {scores.label_accuracy:.4f}", flush=True)
    reference = max(rows, key=lambda r: r["forward_passes_per_image"])
    print(f"\nn={args.n}, guidance {args.guidance:g}, batch {args.batch_size}, seed {args.seed}; "
          f"reference: {reference['sampler']} {reference['steps']} steps\n")  # fmt: skip
    print("| sampler | steps | guided where t in | forward passes / image | seconds (n images) | seconds for 10,000 | FID | FID / reference "
          "| label acc. | precision | recall | grey |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["fid_over_reference"] = r["fid"] / reference["fid"]
        lo, hi = r["guidance_interval"]
        print(f"| {r['sampler']} | {r['steps']} | [{lo:g}, {hi:g}] | {r['forward_passes_per_image']:g} | {r['seconds']:.1f} | {r['seconds_per_10k']:.0f} "
              f"| {r['fid']:.3f} | {r['fid_over_reference']:.2f} | {r['label_accuracy']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} "
              f"| {r['grey']:.4f} |")  # fmt: skip
    print(json.dumps({"run": args.run, "n": args.n, "guidance": args.guidance, "batch_size": args.batch_size, "rows": rows}))


if __name__ == "__main__":
    run_script(main)
