"""MemFS: $fs and require('fs') over an in-memory filesystem with a quota, read-only prefixes
and paths clamped to the virtual root; contents come back in ExecutionResult.files."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import alive, wait_until

import isobox
from isobox import IsoBox

FS = {"quota": 1000, "files": {"/data/in.txt": "hello", "/raw.bin": b"\x00\xff"},
      "read_only": ["/data"]}


@pytest.fixture(scope="module", params=["process", "inprocess"])
def box(request: pytest.FixtureRequest) -> Iterator[IsoBox]:
    with IsoBox(mode=request.param, timeout=5.0, pool={"min": 1, "max": 1}, filesystem=FS) as b:
        yield b


@pytest.fixture
def events(box: IsoBox) -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    box.on("security:violation", seen.append)
    yield seen
    box.off("security:violation", seen.append)


def test_fs_api_and_result_files(box: IsoBox) -> None:
    """$fs reads, writes, lists and stats; the final content comes back as bytes."""
    code = ("$fs.write('/out/a.txt', $fs.read('/data/in.txt').toUpperCase());"
            " $fs.append('/out/a.txt', '!'); $fs.mkdir('/empty');"
            " [$fs.list('/'), $fs.exists('/out/a.txt'), $fs.stat('/out/a.txt').size,"
            "  $fs.stat('/out').isDirectory]")
    result = box.execute(code)
    assert result.value == [["data", "empty", "out", "raw.bin"], True, 6, True]
    assert result.files == {"/data/in.txt": b"hello", "/raw.bin": b"\x00\xff",
                            "/out/a.txt": b"HELLO!"}


def test_each_run_starts_from_the_configured_files(box: IsoBox) -> None:
    """A plain run's writes do not leak into the next run."""
    box.run("$fs.write('/tmp.txt', 'x')")
    assert box.run("$fs.exists('/tmp.txt')") is False


def test_node_fs_functions_and_error_codes(box: IsoBox) -> None:
    """require('fs') has the common sync functions with Node's error codes."""
    code = """
    const fs = require('fs'), codes = [];
    const code = (f) => { try { f(); return 'ok' } catch (e) { return e.code } };
    fs.mkdirSync('/a/b', { recursive: true });
    fs.writeFileSync('/a/b/f.txt', 'one');
    fs.appendFileSync('/a/b/f.txt', 'two');
    codes.push(code(() => fs.readFileSync('/missing')));          // ENOENT
    codes.push(code(() => fs.mkdirSync('/a')));                    // EEXIST
    codes.push(code(() => fs.readFileSync('/a')));                 // EISDIR
    codes.push(code(() => fs.writeFileSync('/data/x', '1')));      // EACCES
    codes.push(code(() => fs.writeFileSync('/no/dir/f', '1')));    // ENOENT (no parent)
    codes.push(code(() => fs.rmSync('/a')));                       // ENOTEMPTY
    fs.renameSync('/a/b/f.txt', '/a/g.txt');
    const st = fs.statSync('/a/g.txt');
    const list = fs.readdirSync('/a');
    fs.unlinkSync('/a/g.txt');
    fs.rmSync('/a', { recursive: true });
    [codes, st.isFile(), st.size, list, fs.existsSync('/a'), fs.readFileSync('/raw.bin').length]
    """
    assert box.run(code) == [["ENOENT", "EEXIST", "EISDIR", "EACCES", "ENOENT", "ENOTEMPTY"],
                             True, 6, ["b", "g.txt"], False, 2]


def test_text_and_binary(box: IsoBox) -> None:
    """Text is UTF-8 on the way out; binary data stays binary; either reads either way."""
    code = ("$fs.write('/t.txt', 'h\u00e9\u20ac\U0001f600'); $fs.write('/b.bin', new Uint8Array([104, 105]));"
            " [$fs.read('/t.txt', null).length, $fs.read('/b.bin'), $fs.stat('/t.txt').size]")
    result = box.execute(code)
    assert result.value == [10, "hi", 10]
    assert result.files["/t.txt"] == "h\u00e9\u20ac\U0001f600".encode()
    assert result.files["/b.bin"] == b"hi"


def test_quota_at_the_boundary(box: IsoBox, events: list[dict[str, Any]]) -> None:
    """Writes up to the quota succeed; one byte over fails with ENOSPC, changes nothing, and
    is a security violation."""
    used = len(b"hello") + 2
    code = (f"$fs.write('/fill', 'x'.repeat({1000 - used}));"
            " let c; try { $fs.append('/fill', 'y') } catch (e) { c = e.code }"
            " [c, $fs.stat('/fill').size]")
    assert box.run(code) == ["ENOSPC", 1000 - used]
    assert [e["type"] for e in events] == ["quota_exceeded"]


@pytest.mark.parametrize("path", ["../../etc/passwd", "/../../etc/passwd", "/a/../../../etc/passwd"])
def test_traversal_is_clamped_and_reported(box: IsoBox, events: list[dict[str, Any]],
                                           path: str) -> None:
    """A path climbing above the root is clamped to it (and reported); the host is never
    reached."""
    assert box.run(f"try {{ $fs.read({path!r}) }} catch (e) {{ e.message }}") == (
        "ENOENT: no such file or directory, open '/etc/passwd'")
    assert events and events[0]["type"] == "path_traversal"


@pytest.mark.parametrize("path", ["/proc/self/environ", "//etc//passwd", "%2e%2e/etc/passwd",
                                  "/etc/./passwd"])
def test_host_paths_do_not_exist(box: IsoBox, path: str) -> None:
    """Host-looking, doubled-slash and encoded paths are just virtual names."""
    assert box.run(f"try {{ $fs.read({path!r}) }} catch (e) {{ e.code }}") == "ENOENT"


def test_read_only_prefixes(box: IsoBox, events: list[dict[str, Any]]) -> None:
    """Writes, removes and renames under a read-only prefix fail with EACCES."""
    code = ("const r = []; for (const f of [() => $fs.write('/data/in.txt', 'x'),"
            " () => $fs.remove('/data/in.txt'), () => $fs.rename('/data/in.txt', '/x')])"
            " { try { f(); r.push('ok') } catch (e) { r.push(e.code) } } r")
    assert box.run(code) == ["EACCES"] * 3
    assert {e["type"] for e in events} == {"read_only_write"}


def test_sessions_keep_files_and_recover_them() -> None:
    """A session keeps its files between runs, and gets them back after its worker dies."""
    with (IsoBox(timeout=5.0, pool={"min": 1, "max": 1}, filesystem={"quota": 10_000}) as b,
          b.create_session("fs") as s):
        s.run("$fs.write('/notes.txt', 'one')")
        s.run("$fs.append('/notes.txt', ' two')")
        pid = s.info().worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not alive(pid))
        assert s.run("$fs.read('/notes.txt')") == "one two"
        assert s.info().worker_pid != pid


def test_filesystem_off_by_default() -> None:
    """Without the option there is no $fs, and fs is a denied built-in."""
    with IsoBox(mode="inprocess") as b:
        assert b.run("typeof $fs") == "undefined"
        with pytest.raises(isobox.SecurityError):
            b.run("require('fs')", require={})


def test_bad_filesystem_options() -> None:
    """Bad options raise at once."""
    for option in ({"quota": -1}, {"files": {"/a": 5}}, {"read_only": "/x"}, {"size": 1}):
        with pytest.raises((ValueError, TypeError)):
            IsoBox(mode="inprocess", filesystem=option)
