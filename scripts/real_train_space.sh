#!/usr/bin/env bash
# `reident-submit tune --train-space` on the real images (issue 22): a training study over one member of
# ensembles/cpu-real.yaml, MEMBER=I (default 0: the first), in its recipe's default space (epochs half to twice,
# learning rate /4..x4, input size 0.8x/1x/1.2x), each trial trained on every held-out fold and pruned from its
# second validation on, then a short post-processing search on the best trial's runs. One member and few
# trials: on 2 CPU cores a trial is one member's training per fold (~7-17 min); the whole pair and 12 trials is
# GPU work. scripts/real_pair_tuned.sh then puts each member's choice into the pair.
#
#   scripts/real_train_space.sh PREPARED_DATA_DIR OUT_DIR [TRAIN_TRIALS] [FOLDS] [TRIALS] [SEEDS]
#
# Defaults: TRAIN_TRIALS 4, FOLDS 1, TRIALS 30 (the post-processing search afterwards), SEEDS "" (none). Writes
# OUT_DIR/spec.yaml (the one-member spec), OUT_DIR/tuned.yaml, OUT_DIR/tune/ (train/trials.csv,
# train-history.png, ...) and prints the machine, the date, the load and the wall time. With SEEDS ("0 1 2"),
# the one-member spec as written and the tuned one are then each trained on all of TRAIN per seed
# (OUT_DIR/seedS/runs-hand, runs-tuned: they differ in training now) and scored on the test split, and
# OUT_DIR/results.md compares them. Rerunning continues both studies and reuses finished runs.
set -euo pipefail
if [[ $# -lt 2 || $# -gt 6 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
DATA=$1
OUT=$2
TRAIN_TRIALS=${3:-4}
FOLDS=${4:-1}
TRIALS=${5:-30}
SEEDS=${6:-}
SEEDS=${SEEDS//,/ }
REPO=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
python "$REPO/scripts/real_table.py" spec "$REPO/ensembles/cpu-real.yaml" 0 "$OUT/spec.yaml" --member "${MEMBER:-0}"
reident-submit weights fetch "$OUT/spec.yaml"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc --all) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS; $(date -Is); load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s)
reident-submit tune --ensemble "$OUT/spec.yaml" --data "$DATA" --holdout 60 --folds "$FOLDS" --train-space \
  --train-trials "$TRAIN_TRIALS" --trials "$TRIALS" --work "$OUT/tune" --out "$OUT/tuned.yaml"
echo "tune --train-space: $(($(date +%s) - t0)) s; $(date -Is); load $(cut -d' ' -f1-3 /proc/loadavg)"
DIRS=()
for S in $SEEDS; do
  D=$OUT/seed$S
  DIRS+=("$D")
  for V in hand tuned; do
    SRC=$OUT/spec.yaml; [[ $V == tuned ]] && SRC=$OUT/tuned.yaml
    python "$REPO/scripts/real_table.py" spec "$SRC" "$S" "$D/$V.yaml"
    bash "$REPO/scripts/real_train_score.sh" "$DATA" "$D/$V.yaml" "$D/runs-$V" "$D/$V"
  done
done
if [[ ${#DIRS[@]} -gt 0 ]]; then
  python "$REPO/scripts/real_table.py" tune "$OUT" "${DIRS[@]}"
fi
