#!/usr/bin/env bash
# The first-GPU check: the CUDA-marked tests, then the training and embedder throughput benchmarks for
# ViT-B/16 and ViT-L/14 from random weights in bf16 and the embedder's input path (uint8 vs float32
# hand-over); prints one markdown table for docs/benchmarks.md.
# Self-contained: no downloads, at most 8 minutes on one CUDA GPU (each step has a time limit).
#
#   scripts/gpu_check.sh [--python PY] [--wheels DIR] [--logs DIR] [--budget SECONDS] [--no-tests] [--no-bench]
#                        [--plan] [--device DEV] [--quick]
#
#   --python PY       the interpreter with torch (default: $PYTHON, else python3)
#   --wheels DIR      install these wheels (no index, no deps) into a temporary folder first, for a machine
#                     that lacks some of the project's packages (e.g. open_clip_torch, ftfy, wcwidth)
#   --logs DIR        keep each step's log there (default: a temporary folder, removed at the end)
#   --budget SECONDS  total time limit (default 480); a step that no longer fits is skipped, and says so
#   --plan            print the steps and exit without running anything
#   --device DEV      where the benchmarks run (default cuda; 'cpu' with --quick rehearses the flow without a GPU)
#   --quick           the tiny recipe and resnet18 at a few steps instead of ViT-B/16 and ViT-L/14 (a rehearsal)
# Exit status: 0 all ran and passed, 1 a step failed, 2 bad arguments or missing packages, 3 no CUDA GPU.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS=""
LOGS=""
BUDGET=480
RUN_TESTS=1
RUN_BENCH=1
PLAN=0
DEVICE=cuda
QUICK=0

die() { echo "gpu_check: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a value (an interpreter)"; PY="$2"; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a value (a folder of .whl files)"; WHEELS="$2"; shift 2 ;;
    --logs) [ $# -ge 2 ] || die "--logs needs a value (a folder)"; LOGS="$2"; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs a value (seconds)"; BUDGET="$2"; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --no-bench) RUN_BENCH=0; shift ;;
    --plan) PLAN=1; shift ;;
    --device) [ $# -ge 2 ] || die "--device needs a value (cuda, cuda:N or cpu)"; DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) die "--budget '$BUDGET': expected whole seconds (e.g. 480)" ;; esac
[ "$BUDGET" -ge 60 ] || die "--budget $BUDGET: expected at least 60 seconds"
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels $WHEELS: not a folder"
case "$DEVICE" in cuda|cuda:[0-9]*|cpu) ;; *) die "--device '$DEVICE': expected cuda, cuda:N or cpu" ;; esac

TESTS=(tests/test_precision.py tests/test_cuda.py tests/test_preflight.py)
MODELS=(vit-b-16-openai vit-l-14-openai)
EMBED="vit-b-16 vit-l-14"
TRAIN_ARGS="--steps 10 --warmup 3 --rounds 1 --workers 6 --players 80"
EMBED_ARGS="--images 512 --batch 64 --workers 6 --repeats 1"
LOADER_ARGS="--images 1024 --batch 64 --workers 6 --repeats 2"
if [ "$QUICK" = 1 ]; then
  MODELS=(tiny-test); EMBED="resnet18-128x64"
  TRAIN_ARGS="--steps 2 --warmup 1 --rounds 1 --workers 0 --players 30"; EMBED_ARGS="--images 16 --batch 8 --workers 0 --repeats 1"
  LOADER_ARGS="--images 16 --batch 8 --workers 0 --repeats 1 --size 64 32"
fi
STEPS=()
[ "$RUN_TESTS" = 1 ] && STEPS+=("tests|200|$PY -m pytest -q -p no:cacheprovider -m cuda -rs ${TESTS[*]}")
if [ "$RUN_BENCH" = 1 ]; then
  for m in "${MODELS[@]}"; do
    STEPS+=("train-$m|110|$PY scripts/bench_training.py --recipe models/$m.yaml --device $DEVICE --precision bf16 \
--random-weights $TRAIN_ARGS")
  done
  STEPS+=("embed|120|$PY scripts/bench_embedding.py --device $DEVICE --precision bf16 --models $EMBED $EMBED_ARGS")
  STEPS+=("loader|40|$PY scripts/bench_loader.py --device $DEVICE $LOADER_ARGS")
fi

if [ "$PLAN" = 1 ]; then
  echo "gpu_check plan (budget ${BUDGET} s, python $PY):"
  for s in "${STEPS[@]}"; do IFS='|' read -r name limit cmd <<<"$s"; echo "  $name (<= ${limit} s): $cmd"; done
  exit 0
fi

cd "$REPO" || die "cannot enter $REPO"
CLEAN=""
if [ -z "$LOGS" ]; then LOGS="$(mktemp -d)"; CLEAN="$LOGS"; fi
mkdir -p "$LOGS" || die "--logs $LOGS: cannot create the folder"
trap '[ -n "$CLEAN" ] && rm -rf "$CLEAN"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$LOGS/site" "$WHEELS"/*.whl \
    || die "--wheels $WHEELS: pip could not install them"
  export PYTHONPATH="$PYTHONPATH:$LOGS/site"
fi
missing="$("$PY" - <<'EOF' 2>/dev/null
import importlib.util
print(" ".join(m for m in ("torch", "open_clip", "timm", "pandas", "click", "rich", "yaml", "PIL", "pytest")
               if importlib.util.find_spec(m) is None))
EOF
)" || die "cannot run $PY"
[ -z "$missing" ] || die "missing Python packages for $PY: $missing (pip install -e . on a connected machine, or --wheels DIR)"
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
  echo "gpu_check: skipped: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run it on a machine with one"
  exit 3
fi
"$PY" -c "import submit.training, submit.preflight" || die "the project does not import with $PY (see above)"

START=$SECONDS
STATUS=0
declare -A RESULT
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    RESULT[$name]="skipped: the ${BUDGET} s budget is spent"; STATUS=1; continue
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (<= ${limit} s): $cmd" >&2
  t0=$SECONDS
  OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 timeout -k 10 "$limit" $cmd >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 4 "$LOGS/$name.log" >&2
  if [ "$rc" = 0 ]; then RESULT[$name]="ok ($((SECONDS - t0)) s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then RESULT[$name]="timed out after ${limit} s"; STATUS=1
  else RESULT[$name]="failed (exit $rc, $((SECONDS - t0)) s)"; STATUS=1
  fi
done

# One markdown table from the logs.
GPU="$("$PY" -c "import torch; c = torch.cuda; print((f'{c.get_device_name(0)} x {c.device_count()}' if c.is_available() else 'no GPU (rehearsal on CPU)') + f', torch {torch.__version__}')")"
echo
echo "### GPU check: $GPU, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
echo
echo "| check | result | details |"
echo "| --- | --- | --- |"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  log="$LOGS/$name.log"
  details=""
  if [ -f "$log" ]; then
    case "$name" in
      tests) details="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|passed|failed|skipped' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
             skips="$(grep -E '^SKIPPED' "$log" | sed 's/^SKIPPED \[[0-9]*\] //' | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
             [ -z "$skips" ] || details="$details; skipped: $skips" ;;
      train-*) details="$(grep -E '^(ours|reference|ratio)' "$log" | sed -E 's/ \((train loop|as the run|bare |target)[^)]*\)//g' | tr '\n' ';' | sed 's/;$//; s/;/; /g')" ;;
      embed) details="$(grep -E 'views=' "$log" | sed -E 's/ +/ /g; s/ \(ours:.*//' | tr '\n' ';' | sed 's/;$//; s/;/; /g')" ;;
      loader) details="$(grep -E 'hand-over|ratio' "$log" | sed -E 's/ +/ /g; s/ \(runs:.*//; s/^ //' | tr '\n' ';' | sed 's/;$//; s/;/; /g')" ;;
    esac
  fi
  echo "| $name | ${RESULT[$name]:-not run} | ${details//|//} |"
done
exit $STATUS
