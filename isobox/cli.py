"""The ``isobox`` command line: a thin layer over the public API.

Exit codes: 0 success; 1 the script threw (ScriptError, CompileError, SecurityError); 2 usage;
3 timeout; 4 memory limit; 5 serialization; 6 worker crashed; 7 other IsoBox errors.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from isobox.errors import (
    IsoBoxError,
    MemoryLimitError,
    ScriptError,
    SerializationError,
    TimeoutError,
    WorkerCrashedError,
)

__all__ = ["main", "supervisor_main"]

EXIT_CODES: tuple[tuple[type[IsoBoxError], int], ...] = (
    (ScriptError, 1),
    (TimeoutError, 3),
    (MemoryLimitError, 4),
    (SerializationError, 5),
    (WorkerCrashedError, 6),
    (IsoBoxError, 7),
)


def _exit_code(error: IsoBoxError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def _to_json(value: Any) -> str:
    def fallback(obj: object) -> Any:
        if isinstance(obj, bytes):
            return obj.hex()
        if hasattr(obj, "isoformat"):
            return obj.isoformat()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    return json.dumps(value, default=fallback, ensure_ascii=False)


@click.group()
@click.version_option(package_name="isobox")
def main() -> None:
    """Run untrusted JavaScript in supervised QuickJS sandboxes."""


@main.command("run")
@click.argument("file", required=False, type=click.File("r", encoding="utf-8"))
@click.option("-e", "--eval", "code", help="Code to run instead of FILE ('-' as FILE reads stdin).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Wall-clock seconds for the run (the CPU budget is the same).")
@click.option("--memory", type=int, default=128 * 2**20, show_default=True,
              help="JS heap limit in bytes.")
@click.option("--sandbox", "sandbox_json", default=None,
              help="JSON object whose keys become globals, e.g. '{\"n\": 1}'.")
@click.option("--inprocess", is_flag=True, help="Run in this process (no isolation; faster).")
def run_command(  # noqa: PLR0917 - click passes one argument per option
file: Any, code: str | None, timeout: float, memory: int,
                sandbox_json: str | None, inprocess: bool) -> None:
    """Run FILE (or -e CODE) and print its completion value as JSON."""
    if (file is None) == (code is None):
        raise click.UsageError("give exactly one of FILE or -e CODE")
    source = code if code is not None else file.read()
    sandbox = None
    if sandbox_json is not None:
        try:
            sandbox = json.loads(sandbox_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--sandbox") from None
        if not isinstance(sandbox, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--sandbox")
    from isobox.api import IsoBox  # noqa: PLC0415 - keep `isobox --help` light

    try:
        box = IsoBox(timeout=timeout, memory_limit=memory, console="inherit",
                     mode="inprocess" if inprocess else "process", pool={"min": 1, "max": 1})
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        value = box.run(source, sandbox=sandbox)
    except IsoBoxError as exc:
        click.echo(f"isobox: {type(exc).__name__}: {exc}", err=True)
        sys.exit(_exit_code(exc))
    finally:
        box.shutdown()
    click.echo(_to_json(value))


@click.command()
def supervisor_main() -> None:
    """The isobox-supervisor daemon (remote mode). Not available in this release."""
    click.echo("isobox-supervisor: the daemon is not available in this release; "
               "use IsoBox() in embedded mode", err=True)
    sys.exit(2)
