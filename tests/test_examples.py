"""The examples in examples/ run as documented (each in a copy, so the tree stays clean)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ next to a link to the venv, as the scripts expect."""
    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", copy)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run([sys.executable, "make_orders.py", "500"], cwd=copy, check=True,
                   capture_output=True)
    return copy


def test_cli_example_and_its_resume(examples: Path) -> None:
    """transform_cli.sh writes one record per order; run again it resumes (nothing redone)."""
    first = subprocess.run([BASH, "transform_cli.sh"], cwd=examples, capture_output=True,
                           text=True, check=True)
    lines = (examples / "totals.jsonl").read_text().splitlines()
    assert len(lines) == 500 and '"ok": true' in first.stdout
    again = subprocess.run([BASH, "transform_cli.sh"], cwd=examples, capture_output=True,
                           text=True, check=True)
    assert "0 ok, 0 failed, 500 already done" in again.stderr
    assert len((examples / "totals.jsonl").read_text().splitlines()) == 500


def test_python_example(examples: Path) -> None:
    """transform_python.py classifies every order."""
    out = subprocess.run([sys.executable, "transform_python.py"], cwd=examples,
                         capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().replace("'", '"'))
    assert sum(counts.values()) == 500 and set(counts) <= {"big", "small"}


def test_dask_example(examples: Path) -> None:
    """transform_dask.py runs on a LocalCluster of 2 worker processes."""
    out = subprocess.run([sys.executable, "transform_dask.py"], cwd=examples,
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("500 records transformed on Dask")
