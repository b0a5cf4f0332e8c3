"""Write orders.jsonl: N sample records for the batch examples (default 10,000)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def main(count: int = 10_000, path: str = "orders.jsonl") -> Path:
    rng = random.Random(7)  # noqa: S311 - sample data, not secrets
    out = Path(path)
    with out.open("w", encoding="utf-8") as fh:
        for i in range(count):
            items = [{"price": round(rng.uniform(1, 60), 2), "qty": rng.randint(1, 4)}
                     for _ in range(rng.randint(1, 5))]
            fh.write(json.dumps({"id": i, "items": items}) + "\n")
    return out


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
