#!/usr/bin/env bash
# The README's real-image pictures from a finished benchmark: the HTML report of a test ranking file (a
# headless-Chromium screenshot of its first page) and the Score-CAM of a query and its first true match.
#
#   scripts/readme_images.sh PREPARED_DATA_DIR TEST_CSV RUN_DIR [OUT_DIR] [QUERY_INDEX]
#
# TEST_CSV: a test-split ranking file (e.g. OUT/test.csv of scripts/real_benchmark.sh); RUN_DIR: the training
# run whose tower Score-CAM explains (e.g. OUT/seed0/runs/cpu-real-mobilenetv2). OUT_DIR defaults to
# docs/images (writes report-real.jpg, scorecam-real.png and scorecam-real-zero-shot.png: the same pair with
# the untrained ImageNet tower). QUERY_INDEX (default 0): which test query (ranking-file order) Score-CAM
# explains, with its first match from another location. Needs chromium on the PATH.
set -euo pipefail
if [[ $# -lt 3 || $# -gt 5 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
DATA=$1
CSV=$2
RUN=$3
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${4:-$REPO/docs/images}
INDEX=${5:-0}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
reident-submit report "$CSV" --data "$DATA" --out "$TMP/report" --top-k 8 --per-page 6
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$TMP/profile" \
  --window-size=1280,1100 --virtual-time-budget=8000 --screenshot="$TMP/shot.png" \
  "file://$TMP/report/index.html" 2>/dev/null
python - "$TMP/shot.png" "$OUT/report-real.jpg" <<'PY'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").save(sys.argv[2], quality=80)
PY
# The first test query (ranking-file order) and the first gallery crop of the same runner, another location.
read -r QUERY MATCH < <(python - "$DATA" "$INDEX" <<'PY'
import sys
from submit.manifest import read_manifest, select
m = read_manifest(sys.argv[1])
q = select(m, "test", "query").iloc[int(sys.argv[2])]
g = select(m, "test", "gallery")
g = g[(g["pid"] == q["pid"]) & (g["seq"] != q["seq"])].iloc[0]
print(f"{sys.argv[1]}/{q['path']} {sys.argv[1]}/{g['path']}")
PY
)
reident-submit explain "$QUERY" "$MATCH" --run "$RUN" --checkpoint last --out "$OUT/scorecam-real.png"
BACKBONE=$(python -c "from submit.recipe import load_recipe; b = load_recipe('$RUN/recipe.yaml').backbone; print(b.name, b.pretrained)")
read -r NAME WEIGHTS <<< "$BACKBONE"
reident-submit explain "$QUERY" "$MATCH" --model "$NAME" --pretrained "$WEIGHTS" --out "$OUT/scorecam-real-zero-shot.png"
echo "wrote $OUT/report-real.jpg, $OUT/scorecam-real.png and $OUT/scorecam-real-zero-shot.png"
