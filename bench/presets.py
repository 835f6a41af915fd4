"""Training and sampling throughput of every preset, one fresh process each (so peak RSS is per preset).

    .venv/bin/python bench/presets.py [--batch-size 32] [--repeats 5] [--presets dit-mini,unet-seed]

Prints a markdown table (the one in BENCHMARKS.md) built from `simple-dit bench`'s JSON lines.
"""

import argparse
import json
import subprocess
import sys

from simple_dit.bench import run_script
from simple_dit.config import PRESETS, get_preset
from simple_dit.errors import UserError
from simple_dit.runtime import count_arg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=count_arg(1), default=32)
    ap.add_argument("--repeats", type=count_arg(1), default=5)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--extra", default="", help="extra arguments for simple-dit bench, e.g. '--reference'")
    args = ap.parse_args()
    presets = args.presets.split(",")
    for preset in presets:  # all of them before the first is timed
        get_preset(preset)
    print("| preset | params (M) | GFLOPs/img | batch | precision | train img/s | sample img/s | train GFLOP/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        cmd = [sys.executable, "-m", "simple_dit.cli", "bench", "--preset", preset, "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats), *args.extra.split()]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. a flag of --extra it does not take: its own one line
            raise UserError(f"simple-dit bench --preset {preset} failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {preset} | {r['params_m']:.2f} | {r['gflops_per_image']:.3f} | {r['batch_size']} | {r['precision']} "
              f"| {r['train_images_per_s']:.1f} | {r['sample_images_per_s']:.1f} | {r['train_gflop_per_s']:.1f} "
              f"| {r['peak_rss_mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    run_script(main)
