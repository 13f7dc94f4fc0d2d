"""The package's layers as tests: the import-linter contracts in ``pyproject.toml`` hold, and
each kind of contract there catches the import it forbids.

The contracts: ``main -> handlers -> controllers -> reconcile | clients | metrics -> api -> dmr ->
constants``; the test bed (``testing``) imported only by the sandbox; ``reconcile``, ``api`` and
``dmr`` without httpx, kubernetes, kopf (nor aiohttp, prometheus_client); ``api`` importing of
the operator only constants (and, listed as exceptions, two of ``dmr``'s patterns).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """The contracts of ``cwd/pyproject.toml`` on the ``dmr_operator`` importable from ``cwd``
    (lint-imports reads the configuration it finds there and puts ``cwd`` first on the path).
    The file is found rather than named: ``--config`` is deprecated since import-linter 2.17, and
    2.16 takes no file argument."""
    argv = [str(BIN / "lint-imports"), "--no-cache", "--no-logo"]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def broken_contracts(report: str) -> list[str]:
    return re.findall(r"^(.+) BROKEN\b", report, flags=re.MULTILINE)


def test_the_package_keeps_its_contracts() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        (
            "controllers/leadership.py",
            "from dmr_operator.handlers import runners",
            "Layers of the package",
        ),
        (
            "clients/kube.py",
            "from dmr_operator.reconcile import selectors",
            "Layers of the package",
        ),
        (
            "controllers/agents.py",
            "from dmr_operator.testing import waiting",
            "The test bed (testing) is for the sandbox only",
        ),
        (
            "reconcile/selectors.py",
            "import httpx",
            "Pure logic (reconcile, api, dmr) does no I/O, knows no kopf",
        ),
        (
            "api/crdgen.py",
            "from dmr_operator.dmr import wire",
            "api (CRD schemas) imports only itself and constants",
        ),
    ],
    ids=["upward", "between-siblings", "testing", "io-in-pure-logic", "api-imports-dmr"],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, bad_import: str, contract: str
) -> None:
    package = tmp_path / "dmr_operator"
    shutil.copytree(
        ROOT / "operator" / "dmr_operator",
        package,
        ignore=shutil.ignore_patterns("__pycache__", "gobuild"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (package / module).open("a") as source:
        source.write(f"\n{bad_import}  # the deliberate violation\n")
    result = lint_imports(tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert broken_contracts(report) == [contract], report
