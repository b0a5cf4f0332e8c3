"""``isobox-supervisor``: the daemon's command line, environment and config file.

Every option is also read from an environment variable ``ISOBOX_<OPTION>`` (``--max-queue`` is
``ISOBOX_MAX_QUEUE``) and from a TOML file (``--config``, keys as the options with ``_``).
The command line wins over the environment, which wins over the file. SIGHUP re-reads the file
and the environment (the command line stays as given).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from isobox.errors import DaemonError

__all__ = ["supervisor_main"]

_FIELDS = ("socket", "listen", "workers", "min_workers", "idle_timeout", "max_runs", "max_queue",
           "max_client_queue", "max_client_runs", "max_timeout", "max_memory", "grace",
           "frame_timeout", "max_rss", "max_rss_growth", "health_interval", "heartbeat_timeout",
           "max_sessions", "max_client_sessions", "metrics_port",
           "metrics_host", "confinement")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("isobox")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _read_toml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    with Path(path).open("rb") as fh:
        data = tomllib.load(fh)
    table = data.get("supervisor", data)  # either top-level keys or a [supervisor] table
    if not isinstance(table, dict):
        raise click.BadParameter("the config file needs key = value pairs", param_hint="--config")
    found = {str(k).replace("-", "_"): v for k, v in table.items()}
    unknown = set(found) - {*_FIELDS, "token_file", "log_level", "log_format"}
    if unknown:
        raise click.BadParameter(f"unknown keys {sorted(unknown)}", param_hint="--config")
    return found


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise click.BadParameter("the token file is empty", param_hint="--token-file")
    return token


def _config(values: dict[str, Any]) -> Any:
    from isobox.supervisor.daemon import DaemonConfig  # noqa: PLC0415 - keep --help light

    fields = {k: values[k] for k in _FIELDS if values.get(k) is not None}
    return DaemonConfig(token=_read_token(values.get("token_file")), **fields)


def _from_sources(given: dict[str, Any], config_file: str | None) -> dict[str, Any]:
    """File, then environment, then what was given on the command line."""
    merged = _read_toml(config_file)
    for name in (*_FIELDS, "token_file"):
        env = os.environ.get(f"ISOBOX_{name.upper()}")
        if env is not None:
            merged[name] = env
    merged.update(given)
    return merged


_OPTIONS: list[tuple[str, Any, str]] = [
    ("socket", str, "Unix socket path (default: $XDG_RUNTIME_DIR/isobox/supervisor.sock, else "
                    "/tmp/isobox-UID/supervisor.sock); created mode 0600."),
    ("listen", str, "Listen on TCP HOST:PORT instead of a Unix socket (needs --token-file)."),
    ("token-file", str, "File holding the token clients must send (required with --listen; "
                        "optional on a Unix socket)."),
    ("workers", int, "Worker processes, which is also how many runs go at once [2]."),
    ("min-workers", int, "Workers kept started even when idle [1]."),
    ("idle-timeout", float, "Seconds an idle worker above the minimum lives [300]."),
    ("max-runs", int, "Runs after which a worker is recycled (with 10% jitter) [10000]."),
    ("max-queue", int, "Requests that may wait for a worker, all clients together [1000]."),
    ("max-client-queue", int, "Requests one client may have waiting [500]."),
    ("max-client-runs", int, "Requests one client may have in flight [1000]."),
    ("max-timeout", float, "Ceiling on any run's timeout and cpu_timeout, seconds [300]."),
    ("max-memory", int, "Ceiling on any run's memory_limit, bytes [1 GiB]."),
    ("grace", float, "On SIGTERM/SIGINT, seconds in-flight runs may still finish [10]."),
    ("frame-timeout", float, "Seconds a client may stall inside a frame before it is dropped "
                             "[10]."),
    ("max-rss", int, "Recycle a worker whose RSS is above this many bytes [off]."),
    ("max-rss-growth", int, "Recycle a worker whose memory climbs by this many bytes over its "
                            "last 6 checks [256 MiB]."),
    ("health-interval", float, "Seconds between health checks (heartbeat, memory) of a worker "
                               "[5]."),
    ("heartbeat-timeout", float, "A worker that does not answer a heartbeat within this many "
                                 "seconds is stuck and is killed [2]."),
    ("max-sessions", int, "Open sessions, all clients together [1000]."),
    ("max-client-sessions", int, "Open sessions of one client (one session scope) [100]."),
    ("metrics-port", int, "Serve Prometheus /metrics and /healthz on this port [off]."),
    ("metrics-host", str, "Address of the metrics endpoint [127.0.0.1]."),
    ("confinement", click.Choice(["strict", "best-effort"]),
     "strict: a worker that cannot be fully confined refuses to start [strict]."),
]


def _options(fn: Any) -> Any:
    for name, kind, text in reversed(_OPTIONS):
        envvar = "ISOBOX_" + name.upper().replace("-", "_")
        fn = click.option(f"--{name}", type=kind, default=None, help=f"{text} (env {envvar})")(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              envvar="ISOBOX_CONFIG", help="TOML file with these options (env ISOBOX_CONFIG); "
              "re-read on SIGHUP.")
@click.option("--log-level", default=None, envvar="ISOBOX_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level [info] (env ISOBOX_LOG_LEVEL).")
@click.option("--log-format", default=None, envvar="ISOBOX_LOG_FORMAT",
              type=click.Choice(["text", "json"]),
              help="Log lines as text or one JSON object each [text] (env ISOBOX_LOG_FORMAT).")
def supervisor_main(config_file: str | None, log_level: str | None, log_format: str | None,
                    **given: Any) -> None:
    """The IsoBox daemon: one pool of sandbox workers shared by many client processes, which
    connect with IsoBox(address="unix:///path") or IsoBox(address="tcp://host:port",
    token=...). SIGTERM or SIGINT drain in-flight runs and exit 0; SIGHUP reloads the config."""
    explicit = {k: v for k, v in given.items() if v is not None}
    try:
        values = _from_sources(explicit, config_file)
        _setup_logging(log_level or str(values.get("log_level", "info")),
                       log_format or str(values.get("log_format", "text")))
        config = _config(_coerce(values))
    except (OSError, ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None

    def reload() -> Any:
        return _config(_coerce(_from_sources(explicit, config_file)))

    from isobox.supervisor.daemon import Daemon  # noqa: PLC0415 - keep --help light

    try:
        code = asyncio.run(Daemon(config, reload).serve(
            ready=lambda address: click.echo(f"isobox-supervisor listening on {address}",
                                             err=True)))
    except DaemonError as exc:
        click.echo(f"isobox-supervisor: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Environment values are strings: give each field the type of its option."""
    kinds = {name.replace("-", "_"): kind for name, kind, _ in _OPTIONS}
    out = dict(values)
    for key, value in values.items():
        kind = kinds.get(key)
        if isinstance(value, str) and kind in (int, float):
            out[key] = kind(value)
    return out
