#!/usr/bin/env bash
# The transform over a JSONL file from the command line. Run from the repository root:
#   bash examples/transform_cli.sh
# Kill it at any moment (even kill -9) and run it again: --resume finishes the job with every
# record exactly once.
set -euo pipefail
cd "$(dirname "$0")"
PY=../.venv/bin
[ -f orders.jsonl ] || "$PY/python" make_orders.py 10000 >/dev/null
if [ -f totals.jsonl ]; then RESUME=--resume; else RESUME=; fi
"$PY/isobox" batch transform.js --input orders.jsonl --output totals.jsonl --workers 2 \
  --timeout 5 $RESUME || [ $? -eq 8 ]   # 8: some records failed (they are in the output)
head -3 totals.jsonl
