"""Box events: ``box.on(name, handler)``; handlers get one dict and run in the emitting thread.

A handler that raises is logged and ignored: events never break runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["EVENTS", "EventEmitter", "Handler"]

log = logging.getLogger("isobox")

EVENTS = frozenset({
    "metrics:recorded", "security:violation", "timeout", "error", "worker:started",
    "worker:crashed", "worker:recycled", "session:expired",
})

Handler = Callable[[dict[str, Any]], Any]


class EventEmitter:
    """Thread-safe registry of handlers per event name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[Handler, ...]] = {}

    def on(self, name: str, handler: Handler) -> None:
        """Call ``handler(payload)`` whenever ``name`` is emitted."""
        if name not in EVENTS:
            raise ValueError(f"unknown event {name!r}; known: {sorted(EVENTS)}")
        with self._lock:
            self._handlers[name] = (*self._handlers.get(name, ()), handler)

    def off(self, name: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (or every handler) for ``name``."""
        with self._lock:
            kept = () if handler is None else tuple(
                h for h in self._handlers.get(name, ()) if h != handler)
            self._handlers[name] = kept

    def has(self, name: str) -> bool:
        """True if anyone listens to ``name`` (lets hot paths skip building payloads)."""
        return bool(self._handlers.get(name))

    def emit(self, name: str, payload: dict[str, Any]) -> None:
        """Deliver ``payload`` to the handlers of ``name``."""
        for handler in self._handlers.get(name, ()):
            try:
                handler(payload)
            except Exception:
                log.exception("isobox event handler for %r raised", name)
