"""The same transform on a Dask LocalCluster: one IsoBox pool per Dask worker.

    .venv/bin/python examples/transform_dask.py

With a real cluster, pass its Client instead (Client("tcp://scheduler:8786")).
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.bag as db
from distributed import Client, LocalCluster
from make_orders import main as make_orders

import isobox.dask

HERE = Path(__file__).parent


def main() -> tuple[int, int]:
    orders = HERE / "orders.jsonl"
    if not orders.exists():
        make_orders(10_000, str(orders))
    code = (HERE / "transform.js").read_text(encoding="utf-8")
    records = [json.loads(line) for line in orders.open(encoding="utf-8")]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # 1. run_batch: BatchItems in input order; a partition whose Dask worker dies is rerun.
        items = isobox.dask.run_batch(client, code, records, partition_size=2_000,
                                      box_options={"timeout": 5})
        ok = sum(item.ok for item in items)
        # 2. The dask.bag recipe: map_partitions with isobox.dask.map_partition.
        bag = db.from_sequence(records, npartitions=4)
        results = bag.map_partitions(isobox.dask.map_partition, code).compute()
        big = sum(1 for r in results if r["ok"] and r["value"]["big"])
    return ok, big


if __name__ == "__main__":
    ok, big = main()
    print(f"{ok} records transformed on Dask; {big} big orders (dask.bag)")
