#!/usr/bin/env bash
# The training studies' choice for the whole of ensembles/cpu-real.yaml (issue 22): cpu-real with each member's
# training (epochs, lr, input size) as its own `tune --train-space` study chose it on held-out TRAIN identities
# (scripts/real_train_space.sh, MEMBER=I per member) and everything else as written ("tuned"), beside cpu-real
# as written ("hand"); both trained on all of TRAIN per seed and scored on the test split, which no choice read.
#
#   scripts/real_pair_tuned.sh PREPARED_DATA_DIR OUT_DIR SEEDS STUDY_DIR [STUDY_DIR ...]
#
# STUDY_DIR: a real_train_space.sh OUT_DIR (its tuned.yaml). A member no study names keeps its training as
# written. REUSE="DIR ..." names earlier OUT_DIRs (real_tune.sh, real_train_space.sh) whose seedS/runs*/NAME
# runs are linked instead of trained when their recipe.yaml is exactly the member's. Writes OUT_DIR/tuned.yaml
# (seed 0, with the studies' comment lines), OUT_DIR/seedS/{hand,tuned}.yaml, runs-{hand,tuned}, test scores
# and OUT_DIR/results.md (the machine, the date, the load, mean ± sd over seeds). Rerunning reuses finished runs.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
DATA=$1
OUT=$2
SEEDS=${3//,/ }
shift 3
TUNED=()
for S in "$@"; do TUNED+=("$S/tuned.yaml"); done
REPO=$(cd "$(dirname "$0")/.." && pwd)
SPEC=$REPO/ensembles/cpu-real.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
python "$REPO/scripts/real_table.py" spec "$SPEC" 0 "$OUT/tuned.yaml" --training-from "${TUNED[@]}"
reident-submit weights fetch "$SPEC"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc --all) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS; $(date -Is); load $(cut -d' ' -f1-3 /proc/loadavg)"
DIRS=()
for S in $SEEDS; do
  D=$OUT/seed$S
  DIRS+=("$D")
  python "$REPO/scripts/real_table.py" spec "$SPEC" "$S" "$D/hand.yaml"
  python "$REPO/scripts/real_table.py" spec "$SPEC" "$S" "$D/tuned.yaml" --training-from "${TUNED[@]}"
  for V in hand tuned; do
    FOUND=()
    for R in ${REUSE:-}; do
      for F in "$R/seed$S"/runs*/; do [[ -d $F ]] && FOUND+=("$F"); done
    done
    if [[ ${#FOUND[@]} -gt 0 ]]; then
      python "$REPO/scripts/real_table.py" link "$D/$V.yaml" "$D/runs-$V" "${FOUND[@]}"
    fi
    bash "$REPO/scripts/real_train_score.sh" "$DATA" "$D/$V.yaml" "$D/runs-$V" "$D/$V"
  done
done
python "$REPO/scripts/real_table.py" tune "$OUT" "${DIRS[@]}"
