#!/usr/bin/env bash
# Tuning on real images (issue 22): `reident-submit tune` chooses ensembles/cpu-real.yaml's post-processing,
# fusion and member weights on held-out TRAIN identities (never the test or challenge split), then the tuned
# spec and the hand-chosen one are scored on the test split on the same trained runs (they differ only in
# post-processing, fusion and weights): first on each fold's runs (TRAIN minus that fold's held-out identities,
# already trained by tune: no extra training), then over SEEDS on members trained on all of TRAIN.
#
#   scripts/real_tune.sh PREPARED_DATA_DIR OUT_DIR [SEEDS] [FOLDS] [TRIALS] [SEARCH_SECONDS]
#
# Defaults: SEEDS "0 1 2" ("" for the fold runs only), FOLDS 3, TRIALS 200, SEARCH_SECONDS 1800 (the search stops at whichever comes first;
# training the members on each fold comes before and is not counted). Writes OUT_DIR/tuned.yaml, OUT_DIR/tune/
# (folds, runs, study.db, trials.csv, pictures), OUT_DIR/seedS/{hand,tuned}.yaml and their test scores, and
# OUT_DIR/results.md (the machine, the date, the load, mean ± sd over seeds). Rerunning resumes every part.
# NESTED=1 adds `tune --nested` (the search again on each pair of folds, scored on the third). ONLY="KEY ..."
# tunes a copy of the spec, OUT_DIR/cpu-real-narrow.yaml, whose `tune.only` searches those keys alone
# (ONLY="postprocess[1].k postprocess[3].k1 postprocess[3].k2": the three keys the full study ranked first).
set -euo pipefail
if [[ $# -lt 2 || $# -gt 6 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
DATA=$1
OUT=$2
SEEDS=${3:-0 1 2}
SEEDS=${SEEDS//,/ }
FOLDS=${4:-3}
TRIALS=${5:-200}
SEARCH=${6:-1800}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SPEC=$REPO/ensembles/cpu-real.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
if [[ -n ${ONLY:-} ]]; then  # the same spec, its search narrowed to the keys named
  read -ra KEYS <<< "$ONLY"  # no glob expansion of the brackets
  python "$REPO/scripts/real_table.py" spec "$SPEC" 0 "$OUT/cpu-real-narrow.yaml" --only "${KEYS[@]}"
  SPEC=$OUT/cpu-real-narrow.yaml
fi
reident-submit weights fetch "$SPEC"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc --all) cores; $(date -Is); load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s)
reident-submit tune --ensemble "$SPEC" --data "$DATA" --holdout 60 --folds "$FOLDS" --trials "$TRIALS" \
  --timeout "$SEARCH" --work "$OUT/tune" --out "$OUT/tuned.yaml" ${NESTED:+--nested}
echo "tune: $(($(date +%s) - t0)) s (members trained on $FOLDS fold(s), then the search); load $(cut -d' ' -f1-3 /proc/loadavg)"
DIRS=()
for F in "$OUT"/tune/runs/*/; do  # the runs tune trained on each fold: scored on the real test split
  D=$OUT/$(basename "$F")
  DIRS+=("$D")
  mkdir -p "$D"
  python -c "import sys; from submit.tune import rescore
for name, spec in (('hand', sys.argv[1]), ('tuned', sys.argv[2])):
    print(f'held-out mAP on {sys.argv[3]}, {name}: {100 * rescore(spec, sys.argv[3], sys.argv[4]):.2f}')" \
    "$SPEC" "$OUT/tuned.yaml" "$OUT/tune/folds/$(basename "$F")" "$F" | tee "$D/held-out.txt"
  for V in hand tuned; do
    SRC=$SPEC; [[ $V == tuned ]] && SRC=$OUT/tuned.yaml
    reident-submit predict --ensemble "$SRC" --runs-dir "$F" --data "$DATA" --split test \
      --out "$D/$V-test.csv" > "$D/$V-test.txt"
    reident-submit evaluate "$D/$V-test.csv" --data "$DATA" --json > "$D/$V-score.json"
  done
done
for S in $SEEDS; do
  D=$OUT/seed$S
  DIRS+=("$D")
  python "$REPO/scripts/real_table.py" spec "$SPEC" "$S" "$D/hand.yaml"
  python "$REPO/scripts/real_table.py" spec "$OUT/tuned.yaml" "$S" "$D/tuned.yaml"
  t0=$(date +%s)
  reident-submit train --ensemble "$D/hand.yaml" --runs-dir "$D/runs" --data "$DATA"
  echo "seed $S: members trained in $(($(date +%s) - t0)) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
  for V in hand tuned; do
    reident-submit predict --ensemble "$D/$V.yaml" --runs-dir "$D/runs" --data "$DATA" --split test \
      --out "$D/$V-test.csv" > "$D/$V-test.txt"
    reident-submit evaluate "$D/$V-test.csv" --data "$DATA" --json > "$D/$V-score.json"
  done
done
python "$REPO/scripts/real_table.py" tune "$OUT" "${DIRS[@]}"
echo "wrote $OUT/tuned.yaml and $OUT/results.md"
