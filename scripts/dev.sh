#!/usr/bin/env bash
# One-step set-up and run: creates (or reuses) a virtualenv keyed by the dependency files, installs
# the project into it, then runs `demo` (the embedded demo) or `test` (the whole test suite).
#   bash scripts/dev.sh demo [--out DIR]     bash scripts/dev.sh test [pytest args]
#   bash scripts/dev.sh run CMD...           (any command inside the virtualenv)
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-12)
venv="${REIDENT_VENV:-$HOME/.cache/reident-submit/venv-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run: several minutes, torch is large)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  log="$venv.log"
  {
    python3 -m venv "$venv" &&
    "$venv/bin/pip" install --upgrade pip setuptools wheel &&
    # torch first, pinned to the wheels this machine keeps on disk (pip's cap); then everything else.
    { "$venv/bin/pip" install "torch==2.14.1" "torchvision==0.29.1" || "$venv/bin/pip" install torch torchvision; } &&
    "$venv/bin/pip" install -e ".[dev]"
  } >"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "set-up failed; full log: $log" >&2; exit 1; }
  touch "$venv/.complete"
fi
ensure_chromium() {
  # The report test renders a page in headless Chromium; install Debian's package where we may.
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the report's browser test" >&2
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } >/tmp/reident-chromium.log 2>&1 \
      || echo "chromium could not be installed (see /tmp/reident-chromium.log); its test will skip" >&2
  fi
}
# Point the (cached) virtualenv at this checkout; quick, and right for a fresh clone elsewhere.
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PATH="$venv/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
what="${1:-}"; shift || true
case "$what" in
  demo) [ $# -eq 0 ] && set -- --out demo-out; exec reident-submit demo "$@" ;;
  test) ensure_chromium; status=0; python -m pytest -q "$@" || status=$?
        [ $status -eq 5 ] && { echo "no tests ran" >&2; exit 1; }; exit $status ;;
  run) exec "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test|run ..." >&2; exit 2 ;;
esac
