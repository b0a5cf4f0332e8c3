#!/usr/bin/env bash
# Set up .venv in the repository root (IsoBox with its dev tools) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev,dask]'
if [ "${ISOBOX_BUILD_QUICKJS:-wheel}" = "source" ]; then
  # About 80 s of compiling; call-heavy JS runs about 1.6x faster (see README: Dependencies).
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps --no-binary quickjs-ng quickjs-ng
fi
.venv/bin/python scripts/demo.py
