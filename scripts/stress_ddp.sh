#!/usr/bin/env bash
# Run the 2-process gloo training job N times under torchrun and count the runs that exit nonzero.
#   bash scripts/stress_ddp.sh [N=20] [WORK_DIR]
# The job is the one tests/test_reporting.py launches: `train models/tiny-test.yaml` on a synthetic DATA_DIR,
# 2 CPU processes (gloo), 3 optimiser steps, validation, TensorBoard events. Each run gets a fresh --out and a
# 300 s limit (a hang counts as a failure, exit 124). A failed run's exit status and the last lines of its
# output are printed; the last line is `failures: K of N`, and the script exits 1 when K > 0.
# STRESS_CPUS=0 pins every run to CPU 0 (taskset), so the ranks' threads contend for one core: races between
# a rank's exit and its gloo threads show more often. Each run starts in its own --out folder, so with `ulimit -c unlimited` a crashed rank leaves its core there.
# Runs inside the project's virtualenv (scripts/dev.sh) unless `python` already imports `submit`.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if [ -z "${STRESS_DDP_INNER:-}" ] && ! python -c "import submit, torch" >/dev/null 2>&1; then
  STRESS_DDP_INNER=1 exec bash scripts/dev.sh run bash scripts/stress_ddp.sh "$@"
fi
n="${1:-20}"
work="${2:-$(mktemp -d "${TMPDIR:-/tmp}/stress_ddp.XXXXXX")}"
mkdir -p "$work"
work=$(cd "$work" && pwd)
cores=$(nproc --all)
export OMP_NUM_THREADS=1
if [ ! -f "$work/data/manifest.csv" ]; then
  python - "$work" <<'EOF' || { echo "could not make the synthetic data" >&2; exit 2; }
import sys
from pathlib import Path
from submit.prepare import prepare
from submit.synthetic import make_dataset
root = Path(sys.argv[1])
make_dataset(root / "src", players=30, seqs=2, frames=3, seed=2)
prepare(root / "src", root / "data", progress=False)
EOF
fi
echo "machine: $cores cores ($(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg); $(python -c 'import torch; print("torch", torch.__version__)'); $(date -Iseconds)"
pin=()
[ -n "${STRESS_CPUS:-}" ] && pin=(taskset -c "$STRESS_CPUS")
echo "job: 2 processes, gloo, tiny-test, 3 steps + validation${STRESS_CPUS:+; pinned to CPU(s) $STRESS_CPUS}"
failures=0
for i in $(seq 1 "$n"); do
  out="$work/run$i"
  rm -rf "$out"
  mkdir -p "$out"
  start=$(date +%s)
  (cd "$out" && ${pin[@]+"${pin[@]}"} timeout -k 10 300 python -m torch.distributed.run --standalone --nproc_per_node 2 -m submit.cli \
    train "$repo/models/tiny-test.yaml" --data "$work/data" --out "$out" --device cpu --max-steps 3 \
    --set train.pairs_per_batch=4 --set data.workers=0 --set train.checkpoint_every=0) >"$work/log$i" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    failures=$((failures + 1))
    echo "run $i: FAILED, exit $rc after $(( $(date +%s) - start ))s; last lines of $work/log$i:"
    grep -v '^\s*$' "$work/log$i" | tail -n 12 | sed 's/^/    /'
  else
    echo "run $i: ok ($(( $(date +%s) - start ))s)"
  fi
done
echo "failures: $failures of $n"
[ $failures -eq 0 ]
