#!/usr/bin/env bash
# GPU check of training (`tilecore train --device`, issue 17 part B), for a bare GPU machine with torch, timm,
# onnx, opencv and scikit-learn installed and no network. It
#   1. installs the small dependencies this Python lacks from wheels in $WHEELS
#      (pip install --no-index --no-deps --find-links; the list: `python tools/device_check.py missing`),
#   2. installs tilecore from this checkout (pip, editable, no build isolation; where pip cannot, a folder of
#      links on PYTHONPATH serves instead),
#   3. runs tools/device_check.py check: demo config and ENS9 at 512 px, cuda against cpu, into one JSON file.
#
#   tools/device_check.sh [OUT]    OUT: where device_check.json goes (default: $OUT, else runs/device_check)
#
# Environment: PYTHON (python3), WHEELS (tools/wheels), DEVICE_CHECK_INSTALL (pip, or links: no pip install of
# tilecore), DEVICE_CHECK_SKIP_CUDA=1, DEVICE_CHECK_SCALE=tiny,
# DEVICE_CHECK_DEVICES ("cuda cpu"), DEVICE_CHECK_BUDGET_S (480; the check's own steps stop there, the install
# comes before it). Fill $WHEELS on a machine with network, for the GPU machine's Python and platform, e.g.
#   pip download --no-deps --only-binary=:all: -c constraints.txt -d tools/wheels $(python tools/device_check.py missing)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-tools/wheels}
out=${1:-${OUT:-runs/device_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/install.log"
: >"$log"

missing=$("$PYTHON" tools/device_check.py missing)
for dist in $missing; do
  if ! "$PYTHON" -m pip install --no-index --no-deps --find-links "$WHEELS" "$dist" >>"$log" 2>&1; then
    echo "device_check: no wheel of $dist in $WHEELS (see $log); the steps that need it will fail" >&2
  fi
done

install=${DEVICE_CHECK_INSTALL:-pip}  # pip (links where pip fails) or links
if [ "$install" = pip ] && "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . >>"$log" 2>&1; then
  export TILECORE_INSTALL=pip
else
  # the package maps tilecore.train -> train/ (pyproject's package-dir): mirror that with links
  site="$out/site"
  rm -rf "$site" && mkdir -p "$site/tilecore"
  for entry in "$repo"/tilecore/*; do ln -s "$entry" "$site/tilecore/$(basename "$entry")"; done
  for package in train export runtime; do ln -s "$repo/$package" "$site/tilecore/$package"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export TILECORE_INSTALL=links
  [ "$install" = links ] || echo "device_check: pip could not install tilecore (see $log); links in $site" >&2
fi

exec "$PYTHON" tools/device_check.py check --out "$out"
