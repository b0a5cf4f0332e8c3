"""Who runs next when clients of the daemon want more runs than there are workers (pure).

:class:`FairQueue` orders waiting requests: the highest ``priority`` first; among requests of
equal priority, clients take turns (round robin), and each client's own requests keep their
order. One client's batch of thousands therefore delays another client's interactive call by
at most one run per worker, not by the whole batch. The queue is bounded in total and per
client: :meth:`FairQueue.push` raises :class:`QueueFull` instead of letting waits grow without
bound. No clocks, no IO: the daemon owns the waiting; tests drive it with plain values.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["FairQueue", "QueueFull"]

T = TypeVar("T")


class QueueFull(Exception):
    """The queue (or this client's share of it) is full; the message says which."""


class FairQueue(Generic[T]):
    """A bounded queue with priorities, round robin between clients, FIFO within a client."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        if max_total < 1 or max_per_client < 1:
            raise ValueError("queue bounds must be >= 1")
        self.max_total = max_total
        self.max_per_client = max_per_client
        # priority -> client -> that client's items, oldest first; the first client is next
        self._levels: dict[int, OrderedDict[Hashable, deque[T]]] = {}
        self._per_client: dict[Hashable, int] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self, client: Hashable) -> int:
        """How many of ``client``'s requests are waiting."""
        return self._per_client.get(client, 0)

    def push(self, client: Hashable, item: T, priority: int = 0) -> None:
        """Queue ``item`` for ``client``; raises :class:`QueueFull` past either bound."""
        if self._size >= self.max_total:
            raise QueueFull(f"the daemon's queue is full ({self.max_total} waiting requests)")
        if self.depth(client) >= self.max_per_client:
            raise QueueFull(f"this client already has {self.max_per_client} waiting requests")
        level = self._levels.setdefault(priority, OrderedDict())
        level.setdefault(client, deque()).append(item)
        self._per_client[client] = self.depth(client) + 1
        self._size += 1

    def pop(self) -> T | None:
        """The next item (highest priority, next client in turn), or None if empty."""
        if not self._levels:
            return None
        priority = max(self._levels)
        level = self._levels[priority]
        client, items = next(iter(level.items()))
        item = items.popleft()
        if items:
            level.move_to_end(client)  # its next request waits for the other clients' turns
        else:
            del level[client]
            if not level:
                del self._levels[priority]
        self._forget(client)
        return item

    def remove(self, client: Hashable, item: T, priority: int = 0) -> bool:
        """Take a waiting ``item`` out (its request was cancelled); False if not queued."""
        level = self._levels.get(priority)
        items = level.get(client) if level is not None else None
        if level is None or items is None or item not in items:
            return False
        items.remove(item)
        if not items:
            del level[client]
            if not level:
                del self._levels[priority]
        self._forget(client)
        return True

    def _forget(self, client: Hashable) -> None:
        self._size -= 1
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]
