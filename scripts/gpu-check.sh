#!/usr/bin/env bash
# One unattended check of the GPU path (issue 8): the test suite, `simple-dit bench` for the seed
# presets and dit-mini, bench/diffusers_compare.py and the article's experiment, in under 8
# minutes, with ONE JSON summary object as the very last line of the output.
#
#   bash scripts/gpu-check.sh [--out DIR]          # on a machine with a CUDA GPU
#   bash scripts/gpu-check.sh --cpu-dry-run        # the same steps on the CPU with tiny presets (< 3 min)
#   bash scripts/gpu-check.sh --plan [--cpu-dry-run]   # print the steps and exit
#
# Every step runs with its own timeout (per kind of step; GPU_CHECK_CAPS="tests=300 compare=400"
# changes them) and the whole check within GPU_CHECK_BUDGET_S seconds (default 470), so that one
# hang cannot eat the budget; a failing step does not stop the others.
# The steps run one at a time (timings stay clean), most wanted first: environment, the compiled
# benches (issue 8's targets), the tests (does the suite pass on a GPU), the comparison (--compile,
# each run's step one CUDA graph: the article's experiment), the other benches (9 runs trained together first;
# the eager ones repeat the issue's own table), diffusers, then where each target's step spends its
# time (bench/step_parts.py: its parts, its kernels by kind and by name), and last the two missed
# training targets' steps against the same steps with one lever at a time (bench/step_levers.py;
# its cap rarely fits after the rest: GPU_CHECK_ONLY=levers gives it a call), then whether two
# identical UNet runs train the same weights, and under which of PyTorch's switches they do
# (bench/repeatability.py); a step that would start with under 10 s of the budget left is recorded
# as not_run. GPU_CHECK_ONLY="KIND ..." runs only those kinds (env, bench-compile, bench, compare,
# tests, diffusers, parts, levers, repeat, verdict).
# GPU_CHECK_RESUME=1 keeps DIR/compare from the last call, so a comparison its cap cut off resumes
# (its step then says "resumed": its seconds are this call's only); without it the comparison
# starts afresh.
# The kind `verdict` runs only when named there: GPU_CHECK_ONLY=verdict spends the whole budget
# advancing issue 9's GPU grid (`scripts/verdict-grid.sh --gpu`; in the dry run, tiny presets into
# DIR), which resumes from its records in docs/verdict-600k-gpu; stopped at the budget (not a
# failure), it saves them, and DIR/verdict-600k-gpu receives a copy to commit.
# Exit status 0 when every step passed or was skipped for a recorded reason (no pytest, no
# diffusers, no MNIST), 1 otherwise; a step whose log says torch.compile failed (the step then
# ran eager), ran without CUDA graphs or could not capture the training step counts as failed.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3; the package is run from
# src/ through PYTHONPATH, so it need not be installed); SIMPLE_DIT_DATA (the MNIST IDX directory;
# default shared/data/mnist or ../shared/data/mnist, whichever exists); GPU_CHECK_WHEELS (a
# directory of wheels to install pytest, and pytest-xdist if there, from where pytest is missing).
#
# DIR (default runs/gpu-check in the repository; one given is taken from the current directory) receives logs/<step>.log for every step, the comparison under
# compare/, steps.tsv and summary.json (the same object as the last line, numbers to 4 significant
# digits).
set -uo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"  # the comment block above
}

mode=gpu
out=runs/gpu-check out_given=
plan_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) mode=cpu-dry-run ;;
    --plan) plan_only=1 ;;
    --out)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "gpu-check.sh: error: --out needs a directory" >&2; exit 2; fi
      out=$2 out_given=1
      shift ;;
    --out=*) out=${1#--out=} out_given=1; [ -n "$out" ] || { echo "gpu-check.sh: error: --out needs a directory" >&2; exit 2; } ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu-check.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

caller=$(pwd)
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)
if [ -n "$out_given" ] && [[ "$out" != /* ]]; then out=$caller/$out; fi  # a DIR given is the caller's; the default, the repository's

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"

data=${SIMPLE_DIT_DATA:-}
if [ -z "$data" ]; then
  for candidate in shared/data/mnist ../shared/data/mnist; do
    if [ -d "$candidate" ]; then data=$candidate; break; fi
  done
fi
if [ -n "$data" ] && [ -d "$data" ]; then
  data=$(cd "$data" && pwd)
  export SIMPLE_DIT_DATA=$data
else
  data_missing="no MNIST directory: SIMPLE_DIT_DATA is unset or missing and neither shared/data/mnist nor ../shared/data/mnist exists"
fi

# ---- the plan: the same steps in both modes, tiny presets and small batches on the CPU ----------
cli=("$py" -m simple_dit.cli)
if [ "$mode" = gpu ]; then
  device=cuda
  tests=(-m pytest -q)
  # preset, batch ("" = the preset's own), extra flags
  # Issue 8's targets (compiled) run before the tests and the comparison, the other benches after
  # them: where the budget runs out, what is left unmeasured is mostly what the issue's table has.
  target_benches=("dit-seed||--compile" "dit-seed|1024|--compile" "unet-seed||--compile" "dit-mini||--compile")
  benches=("dit-seed||--runs-together 9" "unet-seed||--runs-together 9" "dit-mini||--runs-together 9"
           "dit-seed||--compile --runs-together 9"
           "dit-seed||" "dit-seed|1024|" "unet-seed||" "unet-seed|1024|" "dit-mini||" "dit-mini|1024|"
           "dit-seed||--reference" "unet-seed||--reference" "dit-mini||--reference")
  bench_repeats=10
  diffusers=(bench/diffusers_compare.py --preset dit-seed --batch-size 128 --repeats 3 --device cuda)
  # The targets, furthest missed first; then dit-mini's step (426 launches of ~2.5 us, 1.05 ms of
  # kernels in a 1.26 ms step on the H200) with inductor's combo kernels, which launch independent
  # small kernels as one.
  parts=("dit-mini||--compile" "dit-seed|1024|--compile" "unet-seed||--compile" "dit-seed||--compile"
         "dit-mini||--compile --inductor combo_kernels=True")
  # The two training targets still missed on the H200 (2026-12-04, fourth check): dit-mini's step,
  # bound by its launches, and dit-seed's at 1024, bound by the bytes its elementwise kernels move
  # (max-autotune's Triton products lost to cuBLAS on every shape: nothing for them to fuse into).
  levers=("dit-mini||--compile" "dit-seed|1024|--compile")
  # Two identical fp32 UNet runs parted on the H200 with the upsampling's atomics gone; bf16 ones
  # repeated once. Which kernel still adds in a varying order (cuDNN's convolutions or BatchNorm)?
  repeat=("unet-tiny|fp32|" "unet-tiny|bf16|")
  # One run at a time, each step one captured CUDA graph: on the H200 (2026-12-04) 3 runs trained
  # together (--runs-together 3, compiled) made 18,700 unet-seed and 13,600 dit-seed images/s in
  # all, where one captured run makes 39,500 and 20,400 (BENCHMARKS.md, "Second GPU check").
  compare=(--presets unet-seed,dit-seed --budget 600k-images --lrs 1e-4,3e-4,1e-3 --compile)
  caps=(tests=300 env=60 bench=45 bench-compile=120 diffusers=60 parts=90 levers=240 repeat=120 compare=300 verdict=600)
  verdict=(env "SIMPLE_DIT=$py -m simple_dit.cli" "PYTHON=$py" bash scripts/verdict-grid.sh --gpu)
  verdict_records=docs/verdict-600k-gpu
else
  device=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # robust timings on a small, shared CPU
  tests=(-m pytest -q tests/test_models.py)
  # One compiled bench, training only, of runs trained together (the verdict grid's GPU path; the
  # plain compiled step is in tests/test_compile.py): a cold compile costs ~50 s here, and the dry
  # run has 3 minutes, so the dry comparison trains eager.
  target_benches=("dit-tiny||--compile --runs-together 3 --what train")
  benches=("dit-tiny|8|" "dit-tiny|32|" "dit-tiny|8|--runs-together 3" "unet-tiny|8|" "unet-tiny|32|" "dit-mini|8|" "dit-mini|32|"
           "dit-tiny|8|--reference" "unet-tiny|8|--reference" "dit-mini|8|--reference")
  bench_repeats=2
  diffusers=(bench/diffusers_compare.py --preset dit-tiny --batch-size 8 --repeats 2 --device cpu)
  parts=("dit-tiny|8|" "unet-tiny|8|")
  levers=("dit-tiny|8|")
  repeat=("unet-tiny|fp32|--steps 4 --settings as-trained,deterministic-algorithms")
  compare=(--presets unet-tiny,dit-tiny --budget 2k-images --lrs 1e-4,3e-4,1e-3 --eval-n 12 --eval-every-frac 0.5)
  caps=(tests=120 env=60 bench=60 bench-compile=120 diffusers=60 parts=60 levers=60 repeat=60 compare=120 verdict=120)
  verdict_records=$out/verdict-records
  verdict=(env VERDICT_PRESETS=unet-tiny,dit-tiny VERDICT_BUDGET=2k-images VERDICT_SEEDS=0 VERDICT_LRS=1e-3 VERDICT_FINAL_N=24
           "VERDICT_EVAL=--guidances 1,3 --eval-every-frac 0.5 --eval-n 12 --steps 2" "VERDICT_TRAIN=--device cpu"
           "SIMPLE_DIT=$py -m simple_dit.cli" "PYTHON=$py" bash scripts/verdict-grid.sh --gpu "$out/verdict" "$verdict_records")
fi
kinds="env bench-compile bench compare tests diffusers parts levers repeat verdict"
budget_s=${GPU_CHECK_BUDGET_S:-470}
case $budget_s in ''|*[!0-9]*) echo "gpu-check.sh: error: GPU_CHECK_BUDGET_S='$budget_s' is not a number of seconds" >&2; exit 2 ;; esac
budget_s=$((10#$budget_s))  # decimal: bash reads 08 as a bad octal number and 0100 as 64
read -r -a extra_caps <<<"${GPU_CHECK_CAPS:-}"  # e.g. GPU_CHECK_CAPS="tests=300 compare=400"
for kv in "${extra_caps[@]}"; do
  if [[ $kv != [a-z]*=[0-9]* || ${kv#*=} == *[!0-9]* ]]; then
    echo "gpu-check.sh: error: GPU_CHECK_CAPS entry '$kv' is not KIND=SECONDS" >&2; exit 2
  fi
  case " $kinds " in *" ${kv%%=*} "*) ;; *) echo "gpu-check.sh: error: GPU_CHECK_CAPS names no step kind '${kv%%=*}' (${kinds// /, })" >&2; exit 2 ;; esac
  # No 0: timeout 0 is no limit at all, and every step runs under a limit.
  [ $((10#${kv#*=})) -gt 0 ] || { echo "gpu-check.sh: error: GPU_CHECK_CAPS entry '$kv': a step needs at least 1 second" >&2; exit 2; }
  caps+=("${kv%%=*}=$((10#${kv#*=}))")
done
for kind in ${GPU_CHECK_ONLY:-}; do  # a typo would otherwise drop its steps without a word
  case " $kinds " in *" $kind "*) ;; *) echo "gpu-check.sh: error: GPU_CHECK_ONLY names no step kind '$kind' (${kinds// /, })" >&2; exit 2 ;; esac
done

cap() {  # cap KIND -> seconds (the last setting wins)
  local kv found=60
  for kv in "${caps[@]}"; do
    if [ "${kv%%=*}" = "$1" ]; then found=${kv#*=}; fi
  done
  echo "$found"
}

# Steps as "name<TAB>kind<TAB>command words joined by \x1f"
steps=()
add_step() {  # add_step NAME KIND WORD...
  local name=$1 kind=$2 IFS=$'\x1f'
  shift 2
  steps+=("$name"$'\t'"$kind"$'\t'"$*")
}
env_py='import json, os, platform, sys, torch; cuda = torch.cuda.is_available(); print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": cuda, "gpu": torch.cuda.get_device_name() if cuda else None, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}))'
add_step environment env "$py" -c "$env_py"
add_benches() {  # add_benches SPEC...: a bench step for each "preset|batch|extra flags"
  local spec preset batch extra kind suffix together
  for spec in "$@"; do
    IFS='|' read -r preset batch extra <<<"$spec"
    kind=bench suffix=
    case " $extra " in *" --runs-together "*) together=${extra##*--runs-together } suffix="-together${together%% *}" ;; esac
    case " $extra " in *" --compile "*) kind=bench-compile suffix+=-compile ;; *" --reference "*) suffix+=-reference ;; esac
    add_step "bench-$preset-b${batch:-preset}$suffix" "$kind" "${cli[@]}" bench --preset "$preset" ${batch:+--batch-size "$batch"} --repeats "$bench_repeats" --device "$device" $extra
  done
}
add_benches "${target_benches[@]}"
add_step tests tests "$py" "${tests[@]}"
add_step compare-article compare "${cli[@]}" compare "${compare[@]}" --device "$device" --out "$out/compare"
add_benches "${benches[@]}"
add_step diffusers-compare diffusers "$py" "${diffusers[@]}"
for spec in "${parts[@]}"; do
  IFS='|' read -r preset batch extra <<<"$spec"
  suffix=
  case " $extra " in *" --inductor "*) setting=${extra##*--inductor } suffix="-${setting%%=*}" ;; esac
  add_step "parts-$preset-b${batch:-preset}$suffix" parts "$py" bench/step_parts.py --preset "$preset" ${batch:+--batch-size "$batch"} --device "$device" $extra
done
for spec in "${levers[@]}"; do
  IFS='|' read -r preset batch extra <<<"$spec"
  suffix=
  case " $extra " in *" --compile "*) suffix=-compile ;; esac
  add_step "levers-$preset-b${batch:-preset}$suffix" levers "$py" bench/step_levers.py --preset "$preset" ${batch:+--batch-size "$batch"} \
    --repeats "$bench_repeats" --device "$device" $extra
done
for spec in "${repeat[@]}"; do
  IFS='|' read -r preset precision extra <<<"$spec"
  add_step "repeat-$preset-$precision" repeat "$py" bench/repeatability.py --preset "$preset" --precision "$precision" --device "$device" $extra
done
want_verdict=false
case " ${GPU_CHECK_ONLY:-} " in *" verdict "*) want_verdict=true ;; esac
if $want_verdict; then add_step verdict-grid verdict "${verdict[@]}"; fi

# GPU_CHECK_ONLY="bench-compile compare" keeps the steps of those kinds (e.g. a second, shorter call).
if [ -n "${GPU_CHECK_ONLY:-}" ]; then
  kept=()
  for step in "${steps[@]}"; do
    IFS=$'\t' read -r name kind words <<<"$step"
    case " $GPU_CHECK_ONLY " in *" $kind "*) kept+=("$step") ;; esac
  done
  if [ ${#kept[@]} -eq 0 ]; then
    echo "gpu-check.sh: error: GPU_CHECK_ONLY='$GPU_CHECK_ONLY' names no step kind (${kinds// /, })" >&2
    exit 2
  fi
  steps=("${kept[@]}")
fi

# Each test process is single-threaded (tests/conftest.py): with pytest-xdist, one per core, at
# most 8 (the GPU machines have 16 cores; every process holds a CUDA context).
extra_args() {  # extra_args KIND: what this machine adds to a step of KIND's command
  if [ "$1" = tests ] && "$py" -c 'import xdist' >/dev/null 2>&1; then
    local cores
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)  # not nproc: it obeys OMP_NUM_THREADS
    echo "-n $((cores < 8 ? cores : 8))"
  fi
}

if [ "$plan_only" = 1 ]; then
  for step in "${steps[@]}"; do
    IFS=$'\t' read -r name kind words <<<"$step"
    extra=$(extra_args "$kind")
    printf '%s\t%s\t%s\n' "$name" "$(cap "$kind")" "${words//$'\x1f'/ }${extra:+ $extra}"
  done
  exit 0
fi

# ---- run ------------------------------------------------------------------------------------------
mkdir -p "$out" || exit 2
resumed_compare=""
if [ "${GPU_CHECK_RESUME:-0}" = 1 ] && [ -d "$out/compare" ]; then
  resumed_compare=1
else
  rm -rf "$out/compare"
fi
rm -rf "$out/logs" "$out/steps.tsv" "$out/summary.json"
mkdir -p "$out/logs"
start=$(date +%s.%N)
# The lent GPU machines have no pytest and no network: GPU_CHECK_WHEELS=DIR installs it from the
# wheels in DIR (made here with `pip download pytest pytest-xdist -d DIR`, carried along) into $out/site.
if [ -n "${GPU_CHECK_WHEELS:-}" ] && ! "$py" -c 'import pytest' >/dev/null 2>&1; then
  site="$(cd "$out" && pwd)/site"
  if "$py" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" --target "$site" pytest >"$out/logs/wheels.log" 2>&1; then
    export PYTHONPATH="$site:$PYTHONPATH"
    # pytest-xdist too where its wheels came along (optional: the suite then runs in one process)
    "$py" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" --target "$site" pytest-xdist >>"$out/logs/wheels.log" 2>&1 || true
  else
    echo "gpu-check: installing pytest from $GPU_CHECK_WHEELS failed; see $out/logs/wheels.log" >&2
  fi
fi
: >"$out/steps.tsv"

elapsed() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%d", n - s }'; }

record() {  # record NAME KIND STATUS RC SECONDS REASON
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >>"$out/steps.tsv"
  echo "gpu-check: $1: $3 (${5} s)${6:+: $6}" >&2
}

skip_reason() {  # why a step cannot run here, or nothing
  case "$1" in
    tests)
      "$py" -c 'import pytest' >/dev/null 2>&1 || { echo "pytest is not importable by $py"; return; }
      [ -z "${data_missing:-}" ] || echo "$data_missing" ;;
    diffusers) "$py" -c 'import diffusers' >/dev/null 2>&1 || echo "diffusers is not importable by $py (pip install -e .[bench])" ;;
    compare | verdict) [ -z "${data_missing:-}" ] || echo "$data_missing" ;;
  esac
}

for step in "${steps[@]}"; do
  IFS=$'\t' read -r name kind words <<<"$step"
  IFS=$'\x1f' read -r -a cmd <<<"$words"
  log="$out/logs/$name.log"
  reason=$(skip_reason "$kind")
  if [ -n "$reason" ]; then
    echo "skipped: $reason" >"$log"
    record "$name" "$kind" skipped "" 0 "$reason"
    continue
  fi
  left=$((budget_s - $(elapsed)))
  if [ "$left" -lt 10 ]; then
    echo "not run: the check's ${budget_s} s budget is spent" >"$log"
    record "$name" "$kind" not_run "" 0 "the check's ${budget_s} s budget is spent"
    continue
  fi
  limit=$(cap "$kind")
  [ "$left" -lt "$limit" ] && limit=$left
  read -r -a extra <<<"$(extra_args "$kind")"
  cmd+=("${extra[@]}")
  echo "gpu-check: $name (at most ${limit} s): ${cmd[*]}" >&2
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "${cmd[@]}" >"$log" 2>&1 </dev/null
  rc=$?
  seconds=$(awk -v s="$t0" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }')
  case $rc in
    0) record "$name" "$kind" ok "$rc" "$seconds" "" ;;
    124 | 137)
      if [ "$kind" = verdict ]; then  # the grid is longer than any budget: stopping is its normal end
        record "$name" "$kind" ok "$rc" "$seconds" "stopped after its ${limit} s limit; the next call resumes it"
      else
        record "$name" "$kind" timeout "$rc" "$seconds" "stopped after its ${limit} s limit"
      fi ;;
    *) record "$name" "$kind" failed "$rc" "$seconds" "exit status $rc; see $log" ;;
  esac
done

if $want_verdict && [ "$mode" = gpu ] && [ -d "$verdict_records" ]; then
  rm -rf "$out/verdict-600k-gpu" && cp -r "$verdict_records" "$out/verdict-600k-gpu"  # what a lent machine sends back
fi

# ---- summary: one JSON object, the last line ----------------------------------------------------
summary_py=python3
command -v python3 >/dev/null 2>&1 || summary_py=$py
"$summary_py" - "$out" "$mode" "$py" "${data:-}" "$(elapsed)" "$budget_s" "$verdict_records" "$resumed_compare" <<'EOF'
import glob, json, os, re, sys

out, mode, python, data, seconds, budget, verdict_records, resumed_compare = sys.argv[1:9]
BENCH_KEYS = ("preset", "batch_size", "precision", "reference", "compiled", "runs_together", "calls_per_timing", "device", "torch",
              "params_m", "gflops_per_image", "train_images_per_s", "sample_images_per_s", "train_gflop_per_s", "train_compile_s", "train_cuda_graph", "sample_compile_s",
              "peak_gpu_mb", "peak_rss_mb")
DIFFUSERS_KEYS = ("preset", "batch_size", "precision", "device", "ours_images_per_s", "reference_images_per_s",
                  "diffusers_images_per_s", "ours_over_reference", "ours_over_diffusers")
PARTS_KEYS = ("preset", "batch_size", "inductor", "cuda_graph", "step_ms", "forward_backward_ms", "optimizer_ms", "images_per_s", "profile")
LEVERS_KEYS = ("preset", "batch_size", "compiled", "rows")
REPEAT_KEYS = ("preset", "precision", "compiled", "settings")


def last_json(path):
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def numbers(kind, log):
    if kind in ("env", "bench", "bench-compile", "levers", "repeat", "diffusers", "parts"):
        found = last_json(log)
        keys = {"bench": BENCH_KEYS, "bench-compile": BENCH_KEYS, "levers": LEVERS_KEYS, "repeat": REPEAT_KEYS, "diffusers": DIFFUSERS_KEYS,
                "parts": PARTS_KEYS}.get(kind)
        if found is None or keys is None:
            return found
        picked = {k: found[k] for k in keys if k in found}
        if isinstance(picked.get("profile"), dict):  # the kernels by name stay in the log: the last line must stay short
            picked["profile"] = {k: v for k, v in picked["profile"].items() if k != "top_kernels"}
        return picked
    if kind == "tests":
        try:
            text = open(log, errors="replace").read()
        except OSError:
            return None
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", last)}
        return counts or None
    if kind == "compare":
        compare_dir = os.path.join(out, "compare")
        evals = {os.path.basename(os.path.dirname(p)): sum(1 for line in open(p) if line.strip())
                 for p in sorted(glob.glob(os.path.join(compare_dir, "runs", "*", "evals.jsonl")))}
        result = {"evals_done": evals}
        if resumed_compare:
            result["resumed"] = True
        try:
            results = json.load(open(os.path.join(compare_dir, "results.json")))
        except (OSError, ValueError):
            return result
        result["floor_fid"] = results.get("floor", {}).get("fid")
        result["presets"] = [
            {"preset": p["preset"], "best_lr": p.get("best_lr"), "fid": (p.get("best") or {}).get("fid"),
             "label_accuracy": (p.get("best") or {}).get("label_accuracy"), "images_per_s": p.get("images_per_s"),
             "train_seconds": {f"{r['lr']:g}": (r.get("final") or {}).get("train_seconds") for r in p.get("runs", [])}}
            for p in results.get("presets", [])
        ]
        return result
    if kind == "verdict":  # how far the grid has come: its runs with records, those confirmed (finished)
        runs = [os.path.dirname(p) for p in glob.glob(os.path.join(verdict_records, "runs", "*", "evals.jsonl"))]
        return {"records": verdict_records, "runs": len(runs),
                "finished": sum(os.path.isfile(os.path.join(r, "confirm.jsonl")) for r in runs)}
    return None


def compile_fallback(log):
    """The line saying torch.compile failed (the step went on eager), left out the CUDA graphs or
    could not capture the training step as one, if the step's log has one."""
    if not os.path.isfile(log):
        return None
    signs = ("torch.compile failed", "torch.compile ran without CUDA graphs", "CUDA graph capture failed")
    with open(log, errors="replace") as f:
        return next((line.strip() for line in f if any(sign in line for sign in signs)), None)


steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, kind, status, rc, secs, reason = line.rstrip("\n").split("\t")
    log = os.path.join(out, "logs", name + ".log")
    step = {"name": name, "status": status, "seconds": float(secs)}
    if rc:
        step["rc"] = int(rc)
    if reason:
        step["reason"] = reason
    result = numbers(kind, log)
    if result is not None:
        step["result"] = result
    fell_back = compile_fallback(log)
    if fell_back and status == "ok":  # it asked for the compiler and quietly trained eager instead
        step["status"], step["reason"] = "failed", fell_back
    steps.append(step)
failed = [s["name"] for s in steps if s["status"] not in ("ok", "skipped")]
# A check that ran no step checked nothing: not ok.
summary = {"check": "gpu-check", "mode": mode, "ok": bool(steps) and not failed, "failed": failed, "seconds": int(seconds),
           "budget_s": int(budget), "python": python, "data_dir": data or None, "out": out, "steps": steps}


def short(value):
    """Four significant digits: the last line must fit the tail of output a remote runner returns."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [short(v) for v in value]
    return value


summary = short(summary)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, separators=(",", ":")))
sys.exit(1 if failed else 0)
EOF
