"""The project's own quality gates as tests, so the one test command also enforces them:
ruff (lint and format) on the package, tests and bench, and ``mypy --strict`` on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(
    "argv",
    [
        ("ruff", "check", "operator", "tests", "bench"),
        ("ruff", "format", "--check", "operator", "tests", "bench"),
    ],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff(argv: tuple[str, ...]) -> None:
    paths = [p for p in argv[2:] if (ROOT / p).exists() or p.startswith("-")]
    result = run(str(BIN / argv[0]), argv[1], *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr
