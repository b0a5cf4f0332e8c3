"""Options: validation, defaults, per-run overrides, and the wire form of one run request.

Everything here is IO-free and shared by :class:`~isobox.IsoBox` and
:class:`~isobox.AsyncIsoBox`. Bad options raise ``ValueError``/``TypeError`` at once, naming the
option, before anything reaches a worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from isobox import values
from isobox.errors import SerializationError
from isobox.supervisor.health import HealthConfig
from isobox.supervisor.pool import PoolConfig

__all__ = ["BoxOptions", "RunRequest", "pool_config"]

MIB = 2**20
MAX_VALUE = 32 * MIB  # caps count characters; what overflows the 96 MiB frame as UTF-8 is refused
MIN_MEMORY = 1 * MIB  # a QuickJS context needs about 130 KiB before any user code
MAX_STACK = 4 * MIB  # workers run JS on the main thread, whose C stack is 8 MiB
MIN_STACK = 32 * 2**10
CONSOLE_MODES = ("redirect", "inherit", "off")
OutputHandler = Callable[[str, str], Any]


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _size(name: str, value: int, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound} bytes, got {value}")
    return value


def _mapping(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict with str keys, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r}")
    return dict(value)


@dataclass(frozen=True, slots=True)
class BoxOptions:
    """The limits and defaults of one box; :meth:`with_overrides` gives a run's own copy."""

    timeout: float = 30.0
    cpu_timeout: float | None = None
    memory_limit: int = 128 * MIB
    stack_limit: int = 1 * MIB
    sandbox: Mapping[str, Any] | None = None
    env: Mapping[str, str] | None = None
    console: str = "redirect"
    on_output: OutputHandler | None = None
    max_input_size: int = 32 * MIB
    max_result_size: int = 32 * MIB
    max_console_size: int = 1 * MIB
    max_error_size: int = 64 * 2**10
    max_timers: int = 1000
    max_host_calls: int = 100_000
    priority: int = 0  # remote mode: the daemon's queue serves higher priorities first

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        _positive("cpu_timeout", self.cpu_timeout, allow_none=True)
        _size("memory_limit", self.memory_limit, MIN_MEMORY)
        _size("stack_limit", self.stack_limit, MIN_STACK, MAX_STACK)
        _mapping("sandbox", self.sandbox)
        for key, val in _mapping("env", self.env).items():
            if not isinstance(val, str):
                raise TypeError(f"env values must be str; env[{key!r}] is {type(val).__name__}")
        if type(self.priority) is not int:
            raise TypeError(f"priority must be int, not {type(self.priority).__name__}")
        if self.console not in CONSOLE_MODES:
            raise ValueError(f"console must be one of {CONSOLE_MODES}, got {self.console!r}")
        if self.on_output is not None and not callable(self.on_output):
            raise TypeError("on_output must be callable(kind, message)")
        for name in ("max_input_size", "max_result_size"):
            _size(name, getattr(self, name), 64, MAX_VALUE)
        for name in ("max_console_size", "max_error_size"):
            _size(name, getattr(self, name), 64, MAX_VALUE)
        for name in ("max_timers", "max_host_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def effective_cpu_timeout(self) -> float:
        """CPU budget: ``cpu_timeout`` if set, else the wall ``timeout``."""
        return self.cpu_timeout if self.cpu_timeout is not None else self.timeout

    def with_overrides(self, overrides: Mapping[str, Any]) -> BoxOptions:
        """A copy with per-run options applied (and validated)."""
        if not overrides:
            return self
        if "sandbox" in overrides:
            # A run's sandbox is merged over the box's; None means the run brings none.
            merged = {**_mapping("sandbox", self.sandbox),
                      **_mapping("sandbox", overrides["sandbox"])}
            overrides = {**overrides, "sandbox": merged or None}
        return replace(self, **overrides)


RUN_OVERRIDES = frozenset({
    "sandbox", "timeout", "cpu_timeout", "memory_limit", "stack_limit", "on_output", "console",
    "max_timers", "max_host_calls", "priority",
})


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run, ready for the wire: the RUN frame body plus what the caller side needs."""

    body: dict[str, Any]
    options: BoxOptions
    filename: str | None
    cache_key: str | None = None  # a TypeScript snippet's key in the box's transpile cache


def build_request(code: str, options: BoxOptions, filename: str | None = None,
                  language: str | None = None, *, validate: bool = False) -> RunRequest:
    """Validate ``code`` and encode the run for a worker (or the in-process engine)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, not {type(code).__name__}")
    is_ts = bool(filename and filename.endswith((".ts", ".tsx", ".mts", ".cts")))
    lang = language or ("typescript" if is_ts else "javascript")
    if lang not in ("javascript", "typescript"):
        raise ValueError(f"language must be 'javascript' or 'typescript', got {lang!r}")
    if len(code) > options.max_input_size:
        raise SerializationError(
            f"source of {len(code)} characters exceeds the cap of {options.max_input_size}",
            path="code")
    body: dict[str, Any] = {
        "code": code,
        "cpu_timeout": options.effective_cpu_timeout,
        "memory_limit": options.memory_limit,
        "stack_limit": options.stack_limit,
        "console": options.console,
        "max_result": options.max_result_size,
        "max_console": options.max_console_size,
        "max_error": options.max_error_size,
        "wall_timeout": options.timeout,
    }
    if options.max_timers != 1000:
        body["max_timers"] = options.max_timers
    if options.max_host_calls != 100_000:
        body["max_host_calls"] = options.max_host_calls
    if validate:
        body["validate"] = True
    if lang == "typescript":
        body["typescript"] = True
        body["filename"] = filename or "input.ts"
    if options.sandbox:
        text, tagged = values.encode(dict(options.sandbox), what="sandbox",
                                     limit=options.max_input_size)
        body["globals_json"] = text
        body["tagged"] = tagged
    if options.env is not None:
        body["env_json"] = json.dumps(dict(options.env), ensure_ascii=True)
    return RunRequest(body, options, filename)


# Pool options of the leak and health policy -> HealthConfig fields (supervisor/health.py).
_HEALTH = {"max_rss": "max_rss", "max_rss_growth": "max_growth",
           "health_interval": "interval", "heartbeat_timeout": "heartbeat_timeout"}


def pool_config(pool: Mapping[str, Any] | None) -> PoolConfig:
    """Validate the ``pool`` option (keys: min, max, idle_timeout, max_runs, max_queue)."""
    given = _mapping("pool", pool)
    allowed = {"min", "max", "idle_timeout", "max_runs", "max_queue", "start_timeout", *_HEALTH}
    unknown = set(given) - allowed
    if unknown:
        raise ValueError(f"unknown pool option(s) {sorted(unknown)}; known: {sorted(allowed)}")
    health = HealthConfig(**{_HEALTH[k]: given.pop(k) for k in list(given) if k in _HEALTH})
    config = PoolConfig(**given, health=health)
    if not isinstance(config.min, int) or not isinstance(config.max, int):
        raise TypeError("pool min and max must be int")
    if config.min < 0 or config.max < 1 or config.min > config.max:
        raise ValueError(f"pool needs 0 <= min <= max and max >= 1, got {config.min}/{config.max}")
    if config.max_runs is not None and config.max_runs < 1:
        raise ValueError("pool max_runs must be >= 1 or None")
    _positive("pool idle_timeout", config.idle_timeout)
    return config
