#!/usr/bin/env bash
# The DiT-vs-UNet grid of issue 9 at 10 minutes of training per run on a 2-core CPU: hours, so it
# is meant for the background, and it resumes: run the same command again after an interruption
# and every finished run and evaluation is kept. All of it goes into one comparison directory,
# whose report (report.md, report.html, verdict.png, results.json) covers every step:
#
#   1. unet-seed and dit-seed with the article's epsilon objective at lrs 1e-4,3e-4,1e-3, 3 seeds
#   2. each of them with rectified flow at its best step-1 learning rate, 3 seeds (the backbone's
#      effect apart from the objective's), and dit-mini (flow, its own lr 3e-3), 3 seeds
#
# Every run is confirmed as soon as it finishes, at the guidance it picked, on 5,000 fresh samples
# (--final-n): the report's confirmed table and verdict.
#
# The grid outlives a machine through RECORDS (default docs/verdict-10m, kept in git): each run's
# records without its weights (config, metrics, evaluations, confirmation, sample grids) and the
# report. A fresh checkout starts from them (finished runs are not trained again), and when the
# grid ends or is stopped, or with --save at any time (e.g. before committing), what OUT holds goes
# back to RECORDS.
#
#   bash scripts/verdict-grid.sh [--save] [OUT [RECORDS]]     # OUT defaults to runs/verdict-10m
#
# Nothing else should run on the machine meanwhile: the budget is training time, and a process
# competing for the cores makes a run see fewer images. Environment (defaults in brackets):
# SIMPLE_DIT [.venv/bin/simple-dit, else simple-dit], PYTHON [.venv/bin/python, else python3],
# VERDICT_BUDGET [10m], VERDICT_PRESETS [unet-seed,dit-seed], VERDICT_MINI [dit-mini; empty: none],
# VERDICT_SEEDS [0,1,2], VERDICT_LRS [1e-4,3e-4,1e-3], VERDICT_FINAL_N [5000], VERDICT_EVAL [--guidances
# 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10] (small values try the whole grid with
# the tiny presets in a minute). tests/test_verdict_grid.py drives it with a stub simple-dit.
set -euo pipefail

cd "$(dirname "$0")/.."
save_only=false
if [ "${1:-}" = --save ]; then save_only=true; shift; fi
out=${1:-runs/verdict-10m}
records=${2:-docs/verdict-10m}
if [ -n "${SIMPLE_DIT:-}" ]; then sd=($SIMPLE_DIT); elif [ -x .venv/bin/simple-dit ]; then sd=(.venv/bin/simple-dit); else sd=(simple-dit); fi
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
presets=${VERDICT_PRESETS:-unet-seed,dit-seed}
mini=${VERDICT_MINI-dit-mini}
read -r -a evaluation <<<"${VERDICT_EVAL:---guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10}"
common=(--budget "${VERDICT_BUDGET:-10m}" --seeds "${VERDICT_SEEDS:-0,1,2}" --final-n "${VERDICT_FINAL_N:-5000}" "${evaluation[@]}" --out "$out")
lrs=${VERDICT_LRS:-1e-4,3e-4,1e-3}

step() { echo "verdict-grid: $*" >&2; }

records() {  # records restore|save: finished runs' records (no weights) and the report, RECORDS <-> OUT
  "$py" - "$1" "$out" "$records" <<'EOF'
import shutil, sys
from pathlib import Path

what, out, records = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
WEIGHTS = shutil.ignore_patterns("*.safetensors", "tb", "wandb", ".lock", "samples.png")  # big, of this machine only, or a copy
if what == "restore":  # never over anything OUT already holds
    for run in sorted(records.glob("runs/*/evals.jsonl")):
        if not (out / "runs" / run.parent.name).exists():
            shutil.copytree(run.parent, out / "runs" / run.parent.name)
    if (records / "compare.json").is_file() and not (out / "compare.json").exists():
        shutil.copyfile(records / "compare.json", out / "compare.json")
else:
    for run in sorted(out.glob("runs/*/evals.jsonl")):
        kept = records / "runs" / run.parent.name
        fresh = kept.with_name(kept.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(run.parent, fresh, ignore=WEIGHTS)
        shutil.rmtree(kept, ignore_errors=True)
        fresh.rename(kept)
    for path in out.iterdir():
        if path.is_file() and path.suffix in {".md", ".html", ".json", ".png"}:
            shutil.copyfile(path, records / path.name)
EOF
}

mkdir -p "$out/runs" "$records/runs"
if $save_only; then
  records save
  step "saved the records of $out in $records"
  exit 0
fi
records restore
trap 'records save' EXIT  # also when a step fails or the grid is stopped

step "1/2: $presets, epsilon, lrs $lrs"
"${sd[@]}" compare --presets "$presets" --objective eps --lrs "$lrs" "${common[@]}"

best_lr() {  # best_lr PRESET -> its best learning rate with epsilon, from the report of step 1
  "$py" - "$out/results.json" "$1" <<'EOF'
import json, sys

results, preset = json.load(open(sys.argv[1])), sys.argv[2]
entry = next((e for e in results["presets"] if e["preset"] == preset and e["objective"] == "eps"), None)
if entry is None or entry["best_lr"] is None:
    sys.exit(f"verdict-grid: no epsilon result for {preset} in {sys.argv[1]}")
print(f"{entry['best_lr']:g}")
EOF
}

for preset in ${presets//,/ }; do
  lr=$(best_lr "$preset")
  step "2/2: $preset, rectified flow at its best epsilon lr $lr"
  "${sd[@]}" compare --presets "$preset" --objective flow --lrs "$lr" "${common[@]}"
done
if [ -n "$mini" ]; then
  step "2/2: $mini, its own recipe (rectified flow, lr 3e-3)"
  "${sd[@]}" compare --presets "$mini" --lrs 3e-3 "${common[@]}"
fi
step "report: $out/report.md (its records: $records)"
