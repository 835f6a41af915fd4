#!/usr/bin/env bash
# The DiT-vs-UNet grid of issue 9, in two profiles. Both run for long, so they are meant for the
# background, and both resume: run the same command again after an interruption and every finished
# run and evaluation is kept. Each goes into one comparison directory, whose report (report.md,
# report.html, verdict.png, results.json) covers every step.
#
# The CPU profile (default): 10 minutes of training per run on a 2-core CPU, hours in all.
#   1. unet-seed and dit-seed with the article's epsilon objective at lrs 1e-4,3e-4,1e-3, 3 seeds
#   2. each of them with rectified flow at its best step-1 learning rate, 3 seeds (the backbone's
#      effect apart from the objective's), and dit-mini (flow, its own lr 3e-3), 3 seeds
# The GPU profile (--gpu): the article's 10 epochs (600k images) per run, on one CUDA GPU with
# torch.compile, 9 runs at a time: the article's two and the parameter-matched pair (dit-unet-size, unet-dit-size),
# both objectives, 3 lrs, 3 seeds, in one step (72 runs), evaluated at every quarter of the budget.
#
# Every run is confirmed as soon as it finishes, at the guidance it picked, on 5,000 fresh samples
# (--final-n): the report's confirmed table and verdict.
#
# The grid outlives a machine through RECORDS (default docs/verdict-10m, or docs/verdict-600k-gpu
# with --gpu; kept in git): each run's records without its weights (config, metrics, evaluations,
# confirmation, sample grids) and the report. A fresh checkout starts from them (finished runs are
# not trained again), and when the grid ends or is stopped (SIGTERM or SIGINT: the run in training
# checkpoints first), or with --save at any time (e.g. before committing), what OUT holds goes back
# to RECORDS. So a GPU lent for a few minutes at a time advances it run by run:
#   timeout 480 bash scripts/verdict-grid.sh --gpu; cp -r docs/verdict-600k-gpu "$OUT"/
#
#   bash scripts/verdict-grid.sh [--gpu] [--save] [OUT [RECORDS]]   # OUT: runs/verdict-10m or runs/verdict-600k-gpu
#
# OUT and RECORDS given are taken from the current directory; the defaults lie in the repository.
#
# On the CPU nothing else should run on the machine meanwhile: the budget is training time, and a
# process competing for the cores makes a run see fewer images. Environment (defaults in brackets,
# the GPU profile's after a slash): SIMPLE_DIT [.venv/bin/simple-dit, else simple-dit, else
# PYTHON -m simple_dit.cli from src/], PYTHON [.venv/bin/python, else python3], SIMPLE_DIT_DATA
# [shared/data/mnist or ../shared/data/mnist where one exists], VERDICT_BUDGET [10m / 600k-images],
# VERDICT_PRESETS [unet-seed,dit-seed / unet-seed,dit-seed,dit-unet-size,unet-dit-size], VERDICT_MINI [dit-mini; empty: none; CPU only],
# VERDICT_SEEDS [0,1,2], VERDICT_LRS [1e-4,3e-4,1e-3], VERDICT_FINAL_N [5000], VERDICT_EVAL
# [--guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10 / the same at
# --eval-every-frac 0.25 and --steps 20], VERDICT_TRAIN [none / --device cuda --compile
# --runs-together 9: each preset and objective's 9 runs train as one batched network] (small
# values try the whole grid with the tiny presets in a minute). tests/test_verdict_grid.py drives
# it with a stub simple-dit.
set -euo pipefail

caller=$(pwd)
cd "$(dirname "$0")/.."
save_only=false gpu=false
while [ $# -gt 0 ]; do
  case "$1" in
    --save) save_only=true ;;
    --gpu) gpu=true ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    -*) echo "verdict-grid.sh: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if [ $# -gt 2 ] || [[ "${1:-}" == -* ]] || [[ "${2:-}" == -* ]]; then
  echo "verdict-grid.sh: error: options come before OUT and RECORDS, and nothing after them (see --help)" >&2
  exit 2
fi
# OUT and RECORDS as given are the caller's paths; the defaults are the repository's.
given=()
for path in "$@"; do
  if [[ "$path" == /* ]]; then given+=("$path"); else given+=("$caller/$path"); fi
done
set -- "${given[@]}"
if $gpu; then
  out=${1:-runs/verdict-600k-gpu} records=${2:-docs/verdict-600k-gpu}
  presets=${VERDICT_PRESETS:-unet-seed,dit-seed,dit-unet-size,unet-dit-size}
  budget=${VERDICT_BUDGET:-600k-images}
  evaluation=${VERDICT_EVAL:---guidances 1.5,2,3,4 --eval-every-frac 0.25 --eval-n 1000 --steps 20}
  training=${VERDICT_TRAIN---device cuda --compile --runs-together 9}
else
  out=${1:-runs/verdict-10m} records=${2:-docs/verdict-10m}
  presets=${VERDICT_PRESETS:-unet-seed,dit-seed}
  mini=${VERDICT_MINI-dit-mini}
  budget=${VERDICT_BUDGET:-10m}
  evaluation=${VERDICT_EVAL:---guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10}
  training=${VERDICT_TRAIN-}
fi
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if [ -n "${SIMPLE_DIT:-}" ]; then
  sd=($SIMPLE_DIT)
elif [ -x .venv/bin/simple-dit ]; then
  sd=(.venv/bin/simple-dit)
elif command -v simple-dit >/dev/null; then
  sd=(simple-dit)
else  # not installed (a lent GPU machine): the package from this checkout
  sd=("$py" -m simple_dit.cli)
  export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${SIMPLE_DIT_DATA:-}" ]; then  # the project's MNIST copy, where there is one (a lent GPU has no network)
  for candidate in shared/data/mnist ../shared/data/mnist; do
    if [ -d "$candidate" ]; then export SIMPLE_DIT_DATA=$(cd "$candidate" && pwd); break; fi
  done
fi
read -r -a evaluation <<<"$evaluation"
read -r -a training <<<"$training"
common=(--budget "$budget" --seeds "${VERDICT_SEEDS:-0,1,2}" --final-n "${VERDICT_FINAL_N:-5000}" "${evaluation[@]}" "${training[@]}" --out "$out")
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
# A stop signal, sent to the process group or to this script alone, reaches the running compare
# (it checkpoints and exits; SIGTERM, since a background process ignores SIGINT); the shell waits
# for it, then exits through the EXIT trap above, which saves the records.
child=""
stop() {  # stop EXIT_STATUS
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" || true
  fi
  exit "$1"
}
trap 'stop 143' TERM
trap 'stop 130' INT
compare() {  # in the background, so that a trap runs at once rather than when compare has ended
  "${sd[@]}" compare "$@" &
  child=$!
  wait "$child"
  child=""
}

if $gpu; then
  step "1/1: $presets, epsilon and rectified flow, lrs $lrs"
  compare --presets "$presets" --objective eps,flow --lrs "$lrs" "${common[@]}"
  step "report: $out/report.md (its records: $records)"
  exit 0
fi

step "1/2: $presets, epsilon, lrs $lrs"
compare --presets "$presets" --objective eps --lrs "$lrs" "${common[@]}"

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
  compare --presets "$preset" --objective flow --lrs "$lr" "${common[@]}"
done
if [ -n "$mini" ]; then
  step "2/2: $mini, its own recipe (rectified flow, lr 3e-3)"
  compare --presets "$mini" --lrs 3e-3 "${common[@]}"
fi
step "report: $out/report.md (its records: $records)"
