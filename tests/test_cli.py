"""The isobox command line, driven through click's CliRunner and as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from isobox.cli import main


def test_run_expression_prints_json() -> None:
    """isobox run -e CODE prints the completion value as JSON and exits 0."""
    result = CliRunner().invoke(main, ["run", "-e", "[1, 2].map(x => x * 3)", "--inprocess"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [3, 6]


def test_run_file_with_sandbox(tmp_path: Path) -> None:
    """isobox run FILE --sandbox JSON exposes the sandbox as globals."""
    script = tmp_path / "s.js"
    script.write_text("data.reduce((a, b) => a + b, 0)")
    result = CliRunner().invoke(main, ["run", str(script), "--sandbox", '{"data": [1, 2, 3]}'])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "6"


def test_script_error_exits_1_with_one_line() -> None:
    """A thrown error prints one line to stderr and exits 1."""
    result = CliRunner().invoke(main, ["run", "-e", "throw new TypeError('bad')", "--inprocess"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "isobox: ScriptError: TypeError: bad"


def test_timeout_exits_3() -> None:
    """A timeout exits 3."""
    result = CliRunner().invoke(main, ["run", "-e", "for(;;){}", "--timeout", "0.2"])
    assert result.exit_code == 3
    assert "TimeoutError" in result.stderr


def test_memory_limit_exits_4() -> None:
    """A memory-limit hit exits 4."""
    code = "let a = []; for (;;) a.push('x'.repeat(1000) + a.length)"
    result = CliRunner().invoke(main, ["run", "-e", code, "--memory", str(8 * 2**20)])
    assert result.exit_code == 4, result.output


def test_usage_errors_exit_2() -> None:
    """Bad arguments are usage errors (exit 2), not tracebacks."""
    runner = CliRunner()
    assert runner.invoke(main, ["run"]).exit_code == 2
    assert runner.invoke(main, ["run", "-e", "1", "--sandbox", "[1]"]).exit_code == 2
    assert runner.invoke(main, ["run", "-e", "1", "--sandbox", "{bad"]).exit_code == 2
    assert runner.invoke(main, ["run", "-e", "1", "--timeout", "-1"]).exit_code == 2


def test_console_output_is_printed() -> None:
    """console.log goes to stdout before the result."""
    result = CliRunner().invoke(main, ["run", "-e", "console.log('hi'); 5", "--inprocess"])
    assert result.output.splitlines() == ["hi", "5"]


def test_console_script_is_installed() -> None:
    """The isobox entry point runs as a real process."""
    exe = Path(sys.executable).with_name("isobox")
    out = subprocess.run([str(exe), "run", "-e", "6 * 7"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "42"


def test_run_typescript_file(tmp_path: Path) -> None:
    """isobox run FILE.ts transpiles by the file name; --ts does it for -e."""
    script = tmp_path / "calc.ts"
    script.write_text("const n: number = 41;\nn + 1")
    result = CliRunner().invoke(main, ["run", str(script), "--inprocess"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "42"
    result = CliRunner().invoke(main, ["run", "-e", "let x: = 1", "--ts", "--inprocess"])
    assert result.exit_code == 1
    assert "CompileError" in result.stderr and "TS1110" in result.stderr


def test_run_project_folder(tmp_path: Path) -> None:
    """isobox run DIR --entry PATH runs a project on disk (node_modules and hidden folders are
    not read); a folder without --entry is a usage error."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "math.ts").write_text("export const add = (a: number, b: number) => a + b;")
    (tmp_path / "index.ts").write_text("import { add } from './lib/math';\nexport default add(2, 3);")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.js").write_text("syntax error here (")
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--entry", "index.ts", "--inprocess"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "5"
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--inprocess"])
    assert result.exit_code == 2
    assert "--entry" in result.output
