"""Test-suite options and markers shared by every tier (unit, integration, e2e).

Tests under tests/integration/ are marked ``integration`` (they need the local control plane,
see tests/integration/conftest.py) and tests under tests/e2e/ ``e2e`` (they need a kind cluster and
run only with ``--e2e``). Select tiers with ``-m``, e.g. ``pytest -m "not integration"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS_ROOT = Path(__file__).parent
TIER_MARKERS = {"integration": TESTS_ROOT / "integration", "e2e": TESTS_ROOT / "e2e"}


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
