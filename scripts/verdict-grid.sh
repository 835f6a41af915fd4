#!/usr/bin/env bash
# The DiT-vs-UNet grid of issue 9 at 10 minutes of training per run on a 2-core CPU: hours, so it
# is meant for the background, and it resumes: run the same command again after an interruption
# and every finished run and evaluation is kept. All of it goes into one comparison directory,
# whose report (report.md, report.html, verdict.png, results.json) covers every step:
#
#   1. unet-seed and dit-seed with the article's epsilon objective at lrs 1e-4,3e-4,1e-3, 3 seeds
#   2. each of them with rectified flow at its best step-1 learning rate, 3 seeds (the backbone's
#      effect apart from the objective's), and dit-mini (flow, its own lr 3e-3), 3 seeds
#   3. every preset and objective at its best learning rate and guidance on 5,000 fresh samples
#      per seed (--final-n): the confirmed table and verdict
#
#   bash scripts/verdict-grid.sh [OUT]            # OUT defaults to runs/verdict-10m
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
out=${1:-runs/verdict-10m}
if [ -n "${SIMPLE_DIT:-}" ]; then sd=($SIMPLE_DIT); elif [ -x .venv/bin/simple-dit ]; then sd=(.venv/bin/simple-dit); else sd=(simple-dit); fi
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
presets=${VERDICT_PRESETS:-unet-seed,dit-seed}
mini=${VERDICT_MINI-dit-mini}
read -r -a evaluation <<<"${VERDICT_EVAL:---guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10}"
common=(--budget "${VERDICT_BUDGET:-10m}" --seeds "${VERDICT_SEEDS:-0,1,2}" "${evaluation[@]}" --out "$out")
lrs=${VERDICT_LRS:-1e-4,3e-4,1e-3}

step() { echo "verdict-grid: $*" >&2; }

step "1/3: $presets, epsilon, lrs $lrs"
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
  step "2/3: $preset, rectified flow at its best epsilon lr $lr"
  "${sd[@]}" compare --presets "$preset" --objective flow --lrs "$lr" "${common[@]}"
done
if [ -n "$mini" ]; then
  step "2/3: $mini, its own recipe (rectified flow, lr 3e-3)"
  "${sd[@]}" compare --presets "$mini" --lrs 3e-3 "${common[@]}"
fi

step "3/3: every preset and objective at its best lr and guidance on ${VERDICT_FINAL_N:-5000} fresh samples"
"${sd[@]}" compare --presets "$presets" --objective eps --lrs "$lrs" --final-n "${VERDICT_FINAL_N:-5000}" "${common[@]}"
step "report: $out/report.md"
