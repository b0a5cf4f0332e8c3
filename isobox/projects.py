"""Projects and the ``require`` policy, on the caller's side (IO-free but for node_modules).

``run_project(files, entrypoint)`` sends the files as a virtual map; the worker's module
system (``workers/modules.js``) resolves ``require`` over it. The ``require`` option is
validated here. Packages from a host ``node_modules`` directory are read here, by the
supervisor, for whitelisted names only, and travel as virtual files under ``/node_modules``:
the worker never opens a host file.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isobox.errors import SerializationError

__all__ = ["RequirePolicy", "files_from_wire", "filesystem_option", "normalize_files",
           "virtual_path"]

_PACKAGE_EXTS = (".js", ".json", ".cjs", ".mjs")
_MAX_PACKAGE_FILES = 2000


def virtual_path(path: object) -> str:
    """A project path as the sandbox sees it: absolute, normalized, clamped to the root."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"a project path must be a non-empty str without NUL, got {path!r}")
    return posixpath.normpath("/" + path.replace("\\", "/")).replace("//", "/")


def normalize_files(files: object) -> dict[str, str]:
    """``[{"path", "code"}, ...]`` or ``{path: code}`` as ``{virtual path: code}``."""
    items: list[tuple[object, object]]
    if isinstance(files, Mapping):
        items = list(files.items())
    elif isinstance(files, list | tuple):
        items = []
        for entry in files:
            if not isinstance(entry, Mapping) or "path" not in entry or "code" not in entry:
                raise TypeError("each project file must be a dict with 'path' and 'code'")
            language = entry.get("language", "javascript")
            if language not in ("javascript", None):
                raise ValueError(f"language {language!r} is not supported yet in projects")
            items.append((entry["path"], entry["code"]))
    else:
        raise TypeError("files must be a list of {'path', 'code'} dicts or a {path: code} dict")
    out: dict[str, str] = {}
    for path, code in items:
        if not isinstance(code, str):
            raise TypeError(f"the code of {path!r} must be str, not {type(code).__name__}")
        key = virtual_path(path)
        if key in out:
            raise ValueError(f"project path {key!r} is given twice")
        out[key] = code
    return out


@dataclass(frozen=True, slots=True)
class RequirePolicy:
    """The ``require`` option: who may be required, and from where."""

    whitelist: tuple[str, ...] = ()
    modules: Mapping[str, str] = field(default_factory=dict)
    mocks: Mapping[str, Any] = field(default_factory=dict)
    node_modules: str | None = None

    @classmethod
    def from_option(cls, option: Mapping[str, Any] | None) -> RequirePolicy | None:
        """Validate ``require={"whitelist", "modules", "node_modules", "mocks"}``."""
        if option is None:
            return None
        if not isinstance(option, Mapping):
            raise TypeError("require must be a dict")
        unknown = set(option) - {"whitelist", "modules", "node_modules", "mocks"}
        if unknown:
            raise ValueError(f"unknown require option(s) {sorted(unknown)}")
        whitelist = option.get("whitelist") or ()
        if isinstance(whitelist, str) or not all(isinstance(w, str) and w for w in whitelist):
            raise TypeError("require whitelist must be a list of module names or '@scope/*'")
        modules = dict(option.get("modules") or {})
        for name, source in modules.items():
            if not isinstance(name, str) or not isinstance(source, str):
                raise TypeError("require modules must map a module name to its JS source")
        mocks = dict(option.get("mocks") or {})
        for name in mocks:
            if not isinstance(name, str) or not name:
                raise TypeError("require mocks must be keyed by module name")
        node_modules = option.get("node_modules")
        if node_modules is not None and not Path(node_modules).is_dir():
            raise ValueError(f"require node_modules {node_modules!r} is not a directory")
        return cls(tuple(whitelist), modules, mocks,
                   None if node_modules is None else os.fspath(node_modules))

    def wire(self) -> dict[str, Any]:
        """What the worker's module system gets: a str mock is JS source, anything else is
        the value of ``module.exports`` (it must cross by the value table's JSON part)."""
        mocks: dict[str, Any] = {}
        for name, mock in self.mocks.items():
            if isinstance(mock, str):
                mocks[name] = {"source": mock}
            else:
                try:
                    json.dumps(mock, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise SerializationError(f"require mock {name!r} is not JSON-able: {exc}",
                                             path=f"require.mocks.{name}") from None
                mocks[name] = {"value": mock}
        return {"whitelist": list(self.whitelist), "modules": dict(self.modules), "mocks": mocks}

    def package_files(self, cache: dict[str, dict[str, str]]) -> dict[str, str]:
        """Whitelisted packages from ``node_modules`` as virtual files (read once per box)."""
        if self.node_modules is None:
            return {}
        root = Path(self.node_modules).resolve()
        out: dict[str, str] = {}
        for name in self._package_names(root):
            if name not in cache:
                cache[name] = _read_package(root, name)
            out.update(cache[name])
        return out

    def _package_names(self, root: Path) -> list[str]:
        names = []
        for pattern in self.whitelist:
            if pattern.endswith("/*") and pattern.startswith("@"):
                scope = root / pattern[:-2]
                if scope.is_dir():
                    names += [f"{pattern[:-2]}/{p.name}" for p in sorted(scope.iterdir())
                              if p.is_dir()]
            elif (root / pattern).is_dir():
                names.append(pattern)
        return names


def _read_package(root: Path, name: str) -> dict[str, str]:
    """One package's script and JSON files, never following links out of ``root``."""
    base = (root / name).resolve()
    if root not in base.parents:
        return {}
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "node_modules")
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            real = path.resolve()
            if not filename.endswith(_PACKAGE_EXTS) or root not in real.parents:
                continue
            if len(out) >= _MAX_PACKAGE_FILES:
                return out
            try:
                text = real.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            out["/node_modules/" + name + "/" + path.relative_to(base).as_posix()] = text
    return out


_DEFAULT_QUOTA = 10 * 2**20


def filesystem_option(option: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``filesystem={"enabled", "quota", "files", "read_only"}``; the wire form, or
    None when it is off. File contents are str (text) or bytes (binary)."""
    if option is None:
        return None
    if not isinstance(option, Mapping):
        raise TypeError("filesystem must be a dict")
    unknown = set(option) - {"enabled", "quota", "files", "read_only"}
    if unknown:
        raise ValueError(f"unknown filesystem option(s) {sorted(unknown)}")
    if not option.get("enabled", True):
        return None
    quota = option.get("quota", _DEFAULT_QUOTA)
    if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
        raise ValueError(f"filesystem quota must be a non-negative int of bytes, got {quota!r}")
    files: dict[str, list[str]] = {}
    for path, content in dict(option.get("files") or {}).items():
        key = virtual_path(path)
        if isinstance(content, str):
            files[key] = ["t", content]
        elif isinstance(content, bytes | bytearray | memoryview):
            files[key] = ["b", base64.b64encode(bytes(content)).decode("ascii")]
        else:
            raise TypeError(f"filesystem file {path!r} must be str or bytes")
    read_only = option.get("read_only") or []
    if isinstance(read_only, str) or not all(isinstance(p, str) for p in read_only):
        raise TypeError("filesystem read_only must be a list of path prefixes")
    return {"quota": quota, "files": files, "readOnly": [virtual_path(p) for p in read_only]}


def files_from_wire(files: object) -> dict[str, bytes]:
    """MemFS content as the worker reports it: ``{path: bytes}`` (text as UTF-8)."""
    out: dict[str, bytes] = {}
    if not isinstance(files, Mapping):
        return out
    for path, entry in files.items():
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], str)):
            continue
        kind, data = entry
        try:
            out[str(path)] = (base64.b64decode(data) if kind == "b"
                              else data.encode("utf-8", "surrogatepass"))
        except ValueError:  # not base64: a worker that speaks garbage loses the file
            continue
    return out
