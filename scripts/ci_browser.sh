#!/usr/bin/env bash
# Install what the browser test needs, then (optionally) run it:
#
#   scripts/ci_browser.sh          # install Debian's chromium + chromium-driver, and selenium into the active Python
#   scripts/ci_browser.sh --run    # ... and run `pytest -m browser` (tests/test_mlflow_ui.py)
#
# Debian's packages, not a browser download: nothing but the package registries is reachable here. Needs root
# (or sudo) for apt-get. selenium is the `browser` extra: pip install -e '.[browser]'. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "ci_browser: installing Debian's chromium and chromium-driver" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi
PY=${PYTHON:-python}
if ! "$PY" -c "import selenium" 2>/dev/null; then
  echo "ci_browser: installing selenium" >&2
  "$PY" -m pip install -q -c constraints.txt -e '.[browser]' >&2
fi
chromium --version >&2 2>/dev/null || true

if [ "${1:-}" = --run ]; then
  # pytest's addopts deselect `browser`; select it alone here.
  "$PY" -m pytest -o addopts="--strict-markers" -m browser tests/test_mlflow_ui.py
fi
