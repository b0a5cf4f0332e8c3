"""The daemon's Prometheus metrics and its ``/metrics`` + ``/healthz`` HTTP endpoint.

prometheus-client does the exposition format and the HTTP serving; this module only names the
series (one registry per daemon, so tests can run several) and adds a health check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["DaemonMetrics", "serve_http"]

OUTCOMES = ("ok", "error", "timeout", "memory", "crashed", "rejected")


class DaemonMetrics:
    """Every series the daemon exports (see README: "The daemon", Observability)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.executions = Counter("isobox_executions", "Runs finished, by outcome", ["outcome"],
                                  registry=r)
        self.duration = Histogram("isobox_execution_duration_seconds",
                                  "Wall time of runs, queueing included", registry=r,
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.timeouts = Counter("isobox_timeouts", "Runs that hit a CPU or wall timeout",
                                ["kind"], registry=r)
        self.memory_limits = Counter("isobox_memory_limit_hits",
                                     "Runs that hit their memory limit", registry=r)
        self.restarts = Counter("isobox_worker_restarts", "Workers replaced, by cause",
                                ["cause"], registry=r)
        self.workers = Gauge("isobox_workers", "Workers by state", ["state"], registry=r)
        self.queue_depth = Gauge("isobox_queue_depth", "Requests waiting for a worker",
                                 registry=r)
        self.clients = Gauge("isobox_clients", "Connected clients", registry=r)
        self.sessions = Gauge("isobox_sessions", "Open sessions", registry=r)
        # Every series exists from the start, at zero; the children are kept (labels() is a
        # lookup under a lock, on every run otherwise).
        self._by_outcome = {outcome: self.executions.labels(outcome) for outcome in OUTCOMES}

    def finished(self, outcome: str, seconds: float, timeout_kind: str = "") -> None:
        """Count one finished run."""
        child = self._by_outcome.get(outcome)
        (child or self.executions.labels(outcome)).inc()
        self.duration.observe(seconds)
        if outcome == "timeout":
            self.timeouts.labels(timeout_kind or "wall").inc()
        elif outcome == "memory":
            self.memory_limits.inc()

    def set_workers(self, states: Iterable[str]) -> None:
        """Refresh the workers gauge from the pool's current states."""
        counts: dict[str, int] = {"idle": 0, "busy": 0}
        for state in states:
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            self.workers.labels(state).set(count)


def serve_http(metrics: DaemonMetrics, host: str, port: int,
               healthy: Callable[[], tuple[bool, str]],
               refresh: Callable[[], None]) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` (refreshed gauges, then the registry) and ``/healthz`` (200 or 503)
    on a daemon thread; returns the server (``shutdown()`` it) and its thread."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok, text = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode() + b"\n"]
        if path == "/metrics":
            refresh()
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would flood the log

    server = make_server(host, port, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="isobox-metrics", daemon=True)
    thread.start()
    return server, thread
