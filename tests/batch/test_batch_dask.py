"""``isobox.dask`` on a real ``LocalCluster`` with 2 worker processes: ``run_batch`` in input
order with typed errors, the ``dask.bag`` recipe, a Dask worker SIGKILLed during a job (the
scheduler runs its partitions again), and the plugin's boxes shut down with their workers (no
fork server outlives the cluster).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import dask.bag as db
import pytest
from batch_helpers import (
    alive,
    fork_servers,
    isobox_processes,
    kill,
    no_isobox_leftovers,
    wait_until,
)
from distributed import Client, LocalCluster

import isobox.dask as idask
from isobox.errors import ScriptError, SerializationError, TimeoutError

# dashboard_address=None still starts the scheduler's HTTP routes, on 8787 or (taken by the
# module's cluster) on a random port with a warning: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")

BOX = {"pool": {"min": 1, "max": 1}}  # one sandbox worker per Dask worker (2 CPUs here)
CODE = """
if (input === 1234) throw new RangeError('bad ' + input);
if (input === 77) (() => input);
else if (input === 1500) { while (true) {} }
else input * 2
"""


@contextlib.contextmanager
def cluster() -> Iterator[Client]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as local, Client(local) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


def worker_pids(client: Client) -> dict[str, int]:
    return client.run(os.getpid)  # type: ignore[no-any-return]


def servers_under(pids: Iterator[int] | list[int]) -> list[int]:
    return [p.pid for pid in pids for p in fork_servers(pid)]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """A cluster for the tests that leave it as they found it; no fork server or sandbox
    worker may outlive it."""
    with no_isobox_leftovers(), cluster() as c:
        yield c


def test_run_batch_in_order_with_typed_errors(client: Client) -> None:
    """2,000 items over partitions on both Dask workers: a BatchItem per input in input order,
    values right, and the failures rebuilt as their IsoBox types with their fields."""
    items = idask.run_batch(client, CODE, range(2000), partition_size=250, box_options=BOX,
                            cpu_timeout=0.3, chunk_size=32)
    assert [item.index for item in items] == list(range(2000))
    failed = {item.index: item.error for item in items if not item.ok}
    assert set(failed) == {77, 1234, 1500}
    thrown, unserializable, timed_out = failed[1234], failed[77], failed[1500]
    assert isinstance(thrown, ScriptError)
    assert (thrown.name, thrown.message) == ("RangeError", "bad 1234")
    assert isinstance(unserializable, SerializationError)
    assert unserializable.path == "result"
    assert isinstance(timed_out, TimeoutError)
    assert (timed_out.kind, timed_out.limit) == ("cpu", 0.3)
    assert all(item.value == 2 * item.index for item in items if item.ok)
    assert all(item.attempts == 1 for item in items)
    # Every Dask worker ran partitions on its own box (a fork server under each).
    has_box = client.run(lambda dask_worker: dask_worker.plugins["isobox"].box is not None)
    assert list(has_box.values()) == [True, True]
    assert len(servers_under(list(worker_pids(client).values()))) == 2


def test_run_batch_empty_and_small_partitions(client: Client) -> None:
    """No inputs: an empty list; partitions of one item: still in order."""
    assert idask.run_batch(client, "input", [], box_options=BOX) == []
    items = idask.run_batch(client, "input + '!'", ["a", "b", "c"], partition_size=1,
                            box_options=BOX)
    assert [(i.index, i.value) for i in items] == [(0, "a!"), (1, "b!"), (2, "c!")]
    with pytest.raises(ValueError):
        idask.run_batch(client, "input", [1], partition_size=0)


def test_bag_map_partitions_recipe(client: Client) -> None:
    """The README's dask.bag recipe: map_partitions(map_partition, code) gives a record per
    item, partition by partition (an index counts from 0 in each partition unless start is
    given), values as they are, errors as dicts."""
    bag = db.from_sequence(range(100), npartitions=4)
    code = "if (input === 42) throw new TypeError('no'); ({v: input * 3})"
    records: list[dict[str, Any]] = bag.map_partitions(idask.map_partition, code).compute()
    assert len(records) == 100
    assert [r["index"] for r in records] == [i % 25 for i in range(100)]
    assert [r.get("value") for r in records] == [None if i == 42 else {"v": 3 * i}
                                                 for i in range(100)]
    bad = records[42]
    assert not bad["ok"]
    assert bad["error"]["type"] == "ScriptError"
    assert (bad["error"]["name"], bad["error"]["message"]) == ("TypeError", "no")
    rebuilt = idask.to_items(records)[42].error
    assert isinstance(rebuilt, ScriptError) and rebuilt.name == "TypeError"


@pytest.mark.timeout(180)  # real processes: slow on a loaded machine
@pytest.mark.usefixtures("no_leftovers")
def test_a_dask_worker_killed_during_run_batch() -> None:
    """A Dask worker process SIGKILLed while run_batch runs slow items: the scheduler runs its
    partitions again (on the other worker or the nanny's replacement) and run_batch still
    returns every item once, in order, ok."""
    code = "let s = 0; for (let i = 0; i < 150000; i++) s += i % 7; input * 2 + (s - s)"
    total = 400
    with cluster() as client:
        before = worker_pids(client)
        result: dict[str, Any] = {}

        def job() -> None:
            try:
                result["items"] = idask.run_batch(client, code, range(total), partition_size=10,
                                                  box_options=BOX)
            except BaseException as exc:  # re-raised in the test's thread
                result["error"] = exc

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        # Both workers are busy in their boxes (a fork server under each), then one dies.
        assert wait_until(lambda: len(servers_under(list(before.values()))) == 2, 60.0)
        time.sleep(0.5)
        victim = sorted(before.values())[0]
        assert kill(victim)
        thread.join(120)
        assert not thread.is_alive(), "run_batch did not return"
        if "error" in result:
            raise result["error"]
        items = result["items"]
        assert not alive(victim)
        # (No client.run here: right after a kill, a broadcast may still reach for the dead
        # worker's address and fail, which says nothing about run_batch.)
    assert [item.index for item in items] == list(range(total))
    assert all(item.ok and item.value == 2 * item.index for item in items)


@pytest.mark.usefixtures("no_leftovers")
def test_plugin_boxes_shut_down_with_their_workers() -> None:
    """Unregistering the plugin shuts each worker's box down (its fork server exits while the
    Dask worker lives on); closing the cluster leaves no fork server behind either, for boxes
    made by the plugin and for those map_partition makes when none is registered."""
    with cluster() as client:
        pids = list(worker_pids(client).values())
        idask.run_batch(client, "input", range(50), partition_size=10, box_options=BOX)
        assert len(servers_under(pids)) == 2
        client.unregister_worker_plugin(idask.PLUGIN)
        assert wait_until(lambda: not servers_under(pids), 15.0)
        assert all(alive(pid) for pid in pids)
        # map_partition without a registered plugin makes a box of its own.
        bag = db.from_sequence(range(20), npartitions=2)
        assert len(bag.map_partitions(idask.map_partition, "input").compute()) == 20
        assert servers_under(pids)
        seen = {key for pid in pids for key in isobox_processes(pid)}
    assert seen
    assert wait_until(lambda: not (set(isobox_processes()) & seen), 15.0), \
        "fork servers or workers outlived the cluster"


@pytest.mark.usefixtures("no_leftovers")
def test_run_batch_is_in_input_order_even_with_ordered_false() -> None:
    """run_batch returns input order whatever map options it passes on."""
    code = "if (input % 50 === 0) { let s = 0; for (let i = 0; i < 3e7; i++) s++; } input"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as local, Client(local) as client:
        items = idask.run_batch(client, code, range(100), partition_size=50, ordered=False,
                                chunk_size=1, box_options={"pool": {"min": 2, "max": 2}})
    assert [item.index for item in items] == list(range(100))
    assert [item.value for item in items] == list(range(100))


@pytest.mark.usefixtures("no_leftovers")
def test_a_second_run_batch_with_other_box_options_gets_boxes_of_its_own() -> None:
    """box_options choose the box: a second run_batch with other options runs on a box of
    its own in each Dask worker (beside the first, which a third call with the first's
    options uses again), options with host functions get one box per worker too, and
    unregistering the plugin shuts them all down."""
    code = "k * 100 + input"
    with cluster() as client:
        pids = list(worker_pids(client).values())
        one = idask.run_batch(client, code, range(40), partition_size=10,
                              box_options={**BOX, "sandbox": {"k": 1}})
        two = idask.run_batch(client, code, range(40), partition_size=10,
                              box_options={**BOX, "sandbox": {"k": 2}})
        again = idask.run_batch(client, code, range(40), partition_size=10,
                                box_options={**BOX, "sandbox": {"k": 1}})
        assert [i.value for i in one] == [100 + i for i in range(40)]
        assert [i.value for i in two] == [200 + i for i in range(40)]
        assert [i.value for i in again] == [100 + i for i in range(40)]
        # Host functions in box_options arrive in each task as new objects: the box is still
        # found by the key run_batch made, not started again for every partition.
        tagged = idask.run_batch(client, "tag() + input", range(40), partition_size=5,
                                 box_options={**BOX, "functions": {"tag": lambda: "t"}})
        assert [i.value for i in tagged] == [f"t{i}" for i in range(40)]
        counts = client.run(lambda dask_worker: len(dask_worker.plugins["isobox"].boxes))
        assert set(counts.values()) <= {1, 2, 3}  # a worker that got no partition has fewer
        assert sum(counts.values()) == len(servers_under(pids))
        assert max(counts.values()) == 3
        client.unregister_worker_plugin(idask.PLUGIN)
        assert wait_until(lambda: not servers_under(pids), 15.0)


def test_box_keys_follow_what_the_options_are() -> None:
    """A box is known by what its options are, host functions by their code and closure (not
    their address, which a later function may reuse): equal options share a box, others do
    not, and options that cannot be pickled never share one."""
    def make(value: int) -> Any:
        return lambda: value

    one, same, two = make(1), make(1), make(2)
    assert idask.box_key({"functions": {"t": one}}) == idask.box_key({"functions": {"t": same}})
    assert idask.box_key({"functions": {"t": one}}) != idask.box_key({"functions": {"t": two}})
    assert idask.box_key({"pool": {"min": 1}}) == idask.box_key({"pool": {"min": 1}})
    assert idask.box_key({"pool": {"min": 1}}) != idask.box_key({"pool": {"min": 2}})
    lock = threading.Lock()
    assert idask.box_key({"x": lock}) != idask.box_key({"x": lock})
