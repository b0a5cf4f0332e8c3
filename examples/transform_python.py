"""The same transform from Python with box.map: results stream back as they finish.

    .venv/bin/python examples/transform_python.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from make_orders import main as make_orders

from isobox import IsoBox

HERE = Path(__file__).parent


def records(path: Path):  # a generator: map reads it lazily, however long the file is
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def main() -> Counter[str]:
    orders = HERE / "orders.jsonl"
    if not orders.exists():
        make_orders(10_000, str(orders))
    code = (HERE / "transform.js").read_text(encoding="utf-8")
    outcome: Counter[str] = Counter()
    with IsoBox(timeout=5, pool={"min": 2, "max": 2}) as box:
        for item in box.map(code, records(orders), ordered=False):
            if item.ok:
                outcome["big" if item.value["big"] else "small"] += 1
            else:  # the same typed errors run() raises: TimeoutError, ScriptError, ...
                outcome[type(item.error).__name__] += 1
    return outcome


if __name__ == "__main__":
    print(dict(main()))
