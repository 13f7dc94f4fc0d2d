"""Test-suite options and markers shared by every tier (unit, integration, e2e).

Tests under tests/integration/ are marked ``integration`` (they need the local control plane,
see tests/integration/conftest.py), tests under tests/real/ ``real`` (they run the real
model-runner built from its Go module, see dmr_operator.testing.realpeers) and tests under
tests/e2e/ ``e2e`` (they need a kind cluster and run only with ``--e2e``). Select tiers with
``-m``, e.g. ``pytest -m "not integration and not real"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

TESTS_ROOT = Path(__file__).parent
TIER_MARKERS = {
    "integration": TESTS_ROOT / "integration",
    "real": TESTS_ROOT / "real",
    "e2e": TESTS_ROOT / "e2e",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--e2e",
        action="store_true",
        default=False,
        help="also run the end-to-end tests (need a kind cluster and Docker)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_e2e = pytest.mark.skip(reason="end-to-end test: run with --e2e (needs a kind cluster)")
    for item in items:
        for marker, directory in TIER_MARKERS.items():
            if item.path.is_relative_to(directory):
                item.add_marker(marker)
        if "e2e" in item.keywords and not config.getoption("--e2e"):
            item.add_marker(skip_e2e)


@pytest.fixture(scope="session")
def live_progress(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Print build progress live, past pytest's capture: a first run builds for minutes."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def show(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(message, flush=True)

    return show


@pytest.fixture(scope="session")
def piece_unavailable() -> Callable[[str], NoReturn]:
    """Skip with the reason when a piece of a tier cannot be had; fail with it when ``CI=true``
    (CI must never pass by skipping a whole tier)."""

    def report(reason: str) -> NoReturn:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    return report
