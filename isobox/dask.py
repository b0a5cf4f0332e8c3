"""Batch jobs on a Dask cluster: one IsoBox pool per Dask worker, partitions as Dask tasks.

::

    from distributed import Client
    import isobox.dask

    client = Client("tcp://scheduler:8786")
    items = isobox.dask.run_batch(client, "input.x * 2", records, timeout=5)

:class:`IsoBoxPlugin` (a distributed ``WorkerPlugin``) gives every Dask worker process its own
:class:`~isobox.IsoBox`, started when the worker starts and shut down with it. A partition is
one task: it runs ``box.map`` there and returns plain records (errors as dicts: no exception
object has to survive pickling). If a Dask worker dies, the scheduler runs its partitions again
elsewhere (``distributed``'s own retry), so the job still finishes; inside a partition,
IsoBox's own retries handle a sandbox worker that crashed.

``map_partition`` is the building block for ``dask.bag`` and ``dask.dataframe`` (see README:
"Batch jobs on Dask").
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import cloudpickle
from distributed import WorkerPlugin, get_worker

from isobox.batch import BatchItem
from isobox.errors import error_from_dict, error_to_dict

__all__ = ["IsoBoxPlugin", "box_key", "map_partition", "run_batch"]

PLUGIN = "isobox"


class IsoBoxPlugin(WorkerPlugin):
    """A distributed WorkerPlugin: one IsoBox per Dask worker process and per set of box
    options (the options given here make the first one, at the worker's start; a later
    ``run_batch`` with other ``box_options`` gets a box of its own beside it)."""

    name = PLUGIN
    idempotent = True  # registering it again (a second run_batch) keeps the running boxes

    def __init__(self, **box_options: Any) -> None:
        self.box_options = box_options
        # Made here, in the client, once: options holding callables (host functions) reach
        # each worker and task as new objects, so they cannot be compared there.
        self.key = box_key(box_options)
        self.boxes: dict[str, Any] = {}

    @property
    def box(self) -> Any:
        """The box of the plugin's own options (None before setup or after teardown)."""
        return self.boxes.get(self.key)

    def box_for(self, box_options: dict[str, Any], key: str | None = None) -> Any:
        """The box with ``box_options`` (known by ``key``, made by :func:`box_key` in the
        client) in this worker, started on first use."""
        key = box_key(box_options) if key is None else key
        with _BOXES_LOCK:  # the Dask worker's task threads share the plugin
            box = self.boxes.get(key)
            if box is None:
                from isobox.api import IsoBox  # noqa: PLC0415 - in the Dask worker process

                box = self.boxes[key] = IsoBox(typescript="lazy", **box_options)
        return box

    def setup(self, worker: Any) -> None:
        self.box_for(self.box_options, self.key)

    def teardown(self, worker: Any) -> None:
        with _BOXES_LOCK:
            boxes = list(self.boxes.values())
            self.boxes.clear()
        for box in boxes:
            box.shutdown()


_BOXES_LOCK = threading.Lock()


def box_key(box_options: dict[str, Any]) -> str:
    """What tells boxes apart: a hash of the options pickled as Dask ships them
    (cloudpickle: a host function by its code and closure, not by its address, which a
    later function can reuse); options that cannot be pickled get a key of their own."""
    try:
        data = cloudpickle.dumps(dict(sorted(box_options.items())))
    except Exception:  # anything unpicklable: never share its box
        return f"unshared-{uuid.uuid4().hex}"
    return hashlib.sha256(data).hexdigest()


def _box(box_options: dict[str, Any] | None, key: str | None) -> Any:
    worker = get_worker()
    plugins: dict[str, Any] = worker.plugins
    plugin = plugins.get(PLUGIN)
    if not isinstance(plugin, IsoBoxPlugin):
        plugin = IsoBoxPlugin()  # not registered: boxes for this process all the same
        plugins[PLUGIN] = plugin
    if box_options is None:
        return plugin.box_for(plugin.box_options, plugin.key)
    return plugin.box_for(box_options, key)


def map_partition(items: Iterable[Any], code: str, start: int = 0,
                  options: dict[str, Any] | None = None, *,
                  box_options: dict[str, Any] | None = None,
                  box_id: str | None = None) -> list[dict[str, Any]]:
    """Run ``code`` over one partition on this Dask worker's IsoBox; a record per item
    (``index`` counts from ``start``): ``{"index", "ok", "value"}`` or ``{"index", "ok",
    "error": {...}}`` with the error as :func:`isobox.errors.error_to_dict` gives it.
    ``options`` are ``map``'s; ``box_options`` choose the box (default: the registered
    plugin's), ``box_id`` names it (:func:`box_key` of the options, made in the client; pass
    it when the options hold callables). The partition comes first, as ``map_partitions``
    passes it."""
    out: list[dict[str, Any]] = []
    for item in _box(box_options, box_id).map(code, items, **(options or {})):
        record: dict[str, Any] = {"index": start + item.index, "ok": item.ok,
                                  "attempts": item.attempts}
        if item.ok:
            record["value"] = item.value
        else:
            record["error"] = error_to_dict(item.error) if item.error is not None else {}
        out.append(record)
    return out


def to_items(records: Iterable[dict[str, Any]]) -> list[BatchItem]:
    """Records from :func:`map_partition` as BatchItems (errors rebuilt as their types)."""
    return [BatchItem(int(r["index"]), bool(r["ok"]), r.get("value"),
                      None if r["ok"] else error_from_dict(r.get("error") or {}),
                      int(r.get("attempts", 1)))
            for r in records]


def run_batch(client: Any, code: str, inputs: Iterable[Any], *, partition_size: int = 10_000,
              box_options: dict[str, Any] | None = None, **options: Any) -> list[BatchItem]:
    """Run ``code`` over ``inputs`` on the cluster of ``client``; a :class:`BatchItem` per
    input, in input order. ``options`` are ``map``'s (``retries``, ``chunk_size``, run
    options); ``box_options`` configure each worker's IsoBox (``pool``, limits). A later call
    with other ``box_options`` runs on boxes of its own (the earlier ones stay up until the
    plugin is unregistered or the worker ends)."""
    if partition_size < 1:
        raise ValueError("partition_size must be >= 1")
    plugin = IsoBoxPlugin(**(box_options or {}))
    client.register_plugin(plugin, name=PLUGIN)
    futures = []
    it = iter(inputs)
    start = 0
    while batch := list(itertools.islice(it, partition_size)):
        futures.append(client.submit(map_partition, batch, code, start, options,
                                     box_options=plugin.box_options, box_id=plugin.key,
                                     pure=False))
        start += len(batch)
    items: list[BatchItem] = []
    for records in client.gather(futures):
        items.extend(to_items(records))
    items.sort(key=lambda item: item.index)  # input order, whatever map options were given
    return items
