#!/usr/bin/env bash
# One spec of a real-image comparison, trained on all of TRAIN and scored on the test split (the seed loop of
# scripts/real_train_space.sh and scripts/real_pair_tuned.sh): train SPEC's members into RUNS_DIR (finished runs
# are reused), then PREFIX-test.csv (the ranking), PREFIX-test.txt (predict's output), PREFIX-score.json.
#
#   scripts/real_train_score.sh PREPARED_DATA_DIR SPEC RUNS_DIR PREFIX
set -euo pipefail
if [[ $# -ne 4 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
DATA=$1
SPEC=$2
RUNS=$3
PREFIX=$4
t0=$(date +%s)
reident-submit train --ensemble "$SPEC" --runs-dir "$RUNS" --data "$DATA"
echo "$SPEC: trained in $(($(date +%s) - t0)) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
reident-submit predict --ensemble "$SPEC" --runs-dir "$RUNS" --data "$DATA" --split test --out "$PREFIX-test.csv" \
  > "$PREFIX-test.txt"
reident-submit evaluate "$PREFIX-test.csv" --data "$DATA" --json > "$PREFIX-score.json"
