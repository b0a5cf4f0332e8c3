"""The ``isobox`` command line: a thin layer over the public API.

Exit codes: 0 success; 1 the script threw (ScriptError, CompileError, SecurityError); 2 usage;
3 timeout; 4 memory limit; 5 serialization; 6 worker crashed; 7 other IsoBox errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
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

__all__ = ["main"]

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


_PROJECT_EXTS = (".js", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".cts", ".json")


def _project_files(root: Path) -> dict[str, str]:
    """A project folder's script and JSON files as ``{virtual path: source}`` (no
    ``node_modules``, no hidden folders, links not followed)."""
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "node_modules" and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.endswith(_PROJECT_EXTS) and not path.is_symlink():
                files["/" + path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    return files


def _read_source(target: str | None, code: str | None, entry: str | None
                 ) -> tuple[str | None, dict[str, str] | None, str | None]:
    """What to run: (source, project files, file name or entrypoint)."""
    if (target is None) == (code is None):
        raise click.UsageError("give exactly one of FILE, DIR --entry PATH or -e CODE")
    if code is not None:
        return code, None, None
    if target == "-":
        return sys.stdin.read(), None, None
    path = Path(str(target))
    if path.is_dir():
        if entry is None:
            raise click.UsageError("a project folder needs --entry PATH (relative to it)")
        return None, _project_files(path), "/" + entry.lstrip("/")
    if entry is not None:
        raise click.UsageError("--entry goes with a project folder, not a file")
    try:
        return path.read_text(encoding="utf-8"), None, path.name
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from None


@main.command("run")
@click.argument("target", metavar="FILE|DIR", required=False)
@click.option("-e", "--eval", "code", help="Code to run instead of FILE ('-' as FILE reads stdin).")
@click.option("--entry", default=None, help="With a project folder: the entrypoint, e.g. index.ts.")
@click.option("--ts", "typescript", is_flag=True,
              help="The code is TypeScript (implied by a .ts/.tsx FILE).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Wall-clock seconds for the run (the CPU budget is the same).")
@click.option("--memory", type=int, default=128 * 2**20, show_default=True,
              help="JS heap limit in bytes.")
@click.option("--sandbox", "sandbox_json", default=None,
              help="JSON object whose keys become globals, e.g. '{\"n\": 1}'.")
@click.option("--inprocess", is_flag=True, help="Run in this process (no isolation; faster).")
def run_command(  # noqa: PLR0917 - click passes one argument per option
        target: str | None, code: str | None, entry: str | None, typescript: bool,
        timeout: float, memory: int, sandbox_json: str | None, inprocess: bool) -> None:
    """Run FILE, a project folder DIR from --entry, or -e CODE, and print the completion
    value as JSON."""
    source, files, name = _read_source(target, code, entry)
    sandbox = None
    if sandbox_json is not None:
        try:
            sandbox = json.loads(sandbox_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--sandbox") from None
        if not isinstance(sandbox, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--sandbox")
    from isobox.api import IsoBox  # noqa: PLC0415 - keep `isobox --help` light

    options: dict[str, Any] = {"sandbox": sandbox}
    if typescript:
        options["language"] = "typescript"
    try:
        # One run per process: the compiler loads in the worker only if the code needs it.
        box = IsoBox(timeout=timeout, memory_limit=memory, console="inherit",
                     mode="inprocess" if inprocess else "process", pool={"min": 1, "max": 1},
                     typescript="lazy")
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        if files is not None:
            value = box.run_project(files, name or "/", **options)
        else:
            value = box.run(source or "", filename=name, **options)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except IsoBoxError as exc:
        click.echo(f"isobox: {type(exc).__name__}: {exc}", err=True)
        sys.exit(_exit_code(exc))
    finally:
        box.shutdown()
    click.echo(_to_json(value))


def _register() -> None:
    from isobox.batch_cli import batch_command  # noqa: PLC0415 - light until the group loads

    main.add_command(batch_command)


_register()


@main.command("status")
@click.option("--address", envvar="ISOBOX_ADDRESS", default=None,
              help="The daemon: unix:///path or tcp://host:port (default: the default socket; "
              "env ISOBOX_ADDRESS).")
@click.option("--token-file", envvar="ISOBOX_TOKEN_FILE", default=None,
              help="File holding the token (TCP; env ISOBOX_TOKEN_FILE).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def status_command(address: str | None, token_file: str | None, as_json: bool) -> None:
    """Print pool and worker figures from a running isobox-supervisor."""
    from isobox.remote import RemoteClient  # noqa: PLC0415 - keep `isobox --help` light
    from isobox.supervisor.daemon import default_socket_path  # noqa: PLC0415

    token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
    try:
        client = RemoteClient(address or f"unix://{default_socket_path()}", token)
        try:
            stats = client.stats()
        finally:
            client.close()
    except (IsoBoxError, ValueError) as exc:
        click.echo(f"isobox: {exc}", err=True)
        sys.exit(7)
    if as_json:
        click.echo(json.dumps(stats))
        return
    click.echo(f"daemon {stats.get('pid')} at {stats.get('address')}: up "
               f"{float(stats.get('uptime', 0)):.0f}s, {stats.get('runs')} runs, "
               f"{stats.get('clients')} clients, {stats.get('queued')} queued, "
               f"{stats.get('restarts')} restarts")
    for row in stats.get("workers", []):
        click.echo(f"  worker {row.get('pid')}: {row.get('state')}, {row.get('runs')} runs, "
                   f"rss {int(row.get('rss', 0)) / 2**20:.1f} MiB, "
                   f"uss {int(row.get('uss', 0)) / 2**20:.1f} MiB, "
                   f"cpu {float(row.get('cpu_percent', 0)):.0f}%")
    if stats.get("confinement_error"):
        click.echo(f"  workers refuse to start: {stats['confinement_error']}")
