"""Sampling speed against quality for a trained run: each (sampler, steps) draws the same n
class-cycled images (same seed), timed, then scored with the evaluation metrics. The row with the
most steps is the reference that the others' FID is compared with.

    .venv/bin/python bench/sampling.py RUN_DIR [--n 1000] [--guidance 3] [--batch-size 500] \
        [--configs euler:5,euler:10,heun:5,euler:20,euler:50] [--device cuda]

Prints a markdown table (seconds for n images, the projection to 10,000, FID, FID / reference FID,
label accuracy) and, last, one JSON object with every row.
"""

import argparse
import json
import time

from simple_dit import Pipeline
from simple_dit.diffusion import DEFAULT_GUIDANCE
from simple_dit.evaluate import QualityMeter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device")
    ap.add_argument("--configs", default="euler:5,euler:10,heun:5,euler:20,euler:50", help="sampler:steps, comma-separated")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.run, device=args.device)
    meter = QualityMeter(pipe.config.train.dataset, progress=False)
    labels = pipe.cycled_labels(args.n)
    configs = [(name, int(steps)) for name, steps in (c.split(":") for c in args.configs.split(","))]
    rows = []
    for sampler, steps in configs:
        start = time.perf_counter()
        images = pipe(labels, sampler=sampler, steps=steps, guidance=args.guidance, seed=0, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = meter.score(images, labels)
        evals = 2 * steps - 1 if sampler == "heun" else steps  # Heun's last step is a plain Euler step
        rows.append({"sampler": sampler, "steps": steps, "evals_per_image": evals, "seconds": seconds,
                     "seconds_per_10k": seconds * 10_000 / args.n, "fid": scores.fid, "label_accuracy": scores.label_accuracy})  # fmt: skip
        print(f"{sampler}:{steps} done in {seconds:.0f} s: FID {scores.fid:.3f}, label accuracy {scores.label_accuracy:.3f}", flush=True)
    reference = max(rows, key=lambda r: r["evals_per_image"])
    print(f"\nn={args.n}, guidance {args.guidance:g} (2 denoiser evaluations per step), batch {args.batch_size}; reference: {reference['sampler']} {reference['steps']} steps\n")
    print("| sampler | steps | evaluations / image | seconds (n images) | seconds for 10,000 | FID | FID / reference | label acc. |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["fid_over_reference"] = r["fid"] / reference["fid"]
        print(f"| {r['sampler']} | {r['steps']} | {r['evals_per_image']} | {r['seconds']:.1f} | {r['seconds_per_10k']:.0f} "
              f"| {r['fid']:.3f} | {r['fid_over_reference']:.2f} | {r['label_accuracy']:.3f} |")  # fmt: skip
    print(json.dumps({"run": args.run, "n": args.n, "guidance": args.guidance, "batch_size": args.batch_size, "rows": rows}))


if __name__ == "__main__":
    main()
