"""Test-suite options and markers shared by every tier (unit, integration, e2e).

Tests under tests/integration/ are marked ``integration`` (they need the local control plane,
see tests/integration/conftest.py), tests under tests/real/ and tests/integration/real/ ``real``
(they run the real model-runner built from its Go module, llama.cpp's llama-server and a real
model, see dmr_operator.testing.realpeers; the fixtures are here because both directories use
them) and tests under tests/e2e/ ``e2e`` (they need a kind cluster and run only with ``--e2e``).
Select tiers with ``-m``, e.g. ``pytest -m "not integration and not real"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from dmr_operator.testing import gobuild, llamacpp, realpeers

TESTS_ROOT = Path(__file__).parent
# (marker, directory): a test gets every marker whose directory holds it.
TIER_DIRECTORIES = (
    ("integration", TESTS_ROOT / "integration"),
    ("real", TESTS_ROOT / "real"),
    ("real", TESTS_ROOT / "integration" / "real"),
    ("e2e", TESTS_ROOT / "e2e"),
)


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
        for marker, directory in TIER_DIRECTORIES:
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


@pytest.fixture(scope="session")
def model_runner_binary(
    live_progress: Callable[[str], None], piece_unavailable: Callable[[str], NoReturn]
) -> Path:
    try:
        return realpeers.ensure_model_runner(
            progress=lambda message: live_progress(f"[model-runner] {message}")
        )
    except gobuild.BuildUnavailable as error:
        piece_unavailable(f"real model-runner unavailable: {error}")


@pytest.fixture(scope="session")
def real_peers(
    model_runner_binary: Path,
    live_progress: Callable[[str], None],
    piece_unavailable: Callable[[str], NoReturn],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[realpeers.RealPeers]:
    """The real runner's parts: model-runner, llama-server and a loopback registry holding the
    real Gemma model under every name in ``realpeers.REAL_MODELS``."""
    try:
        registry_binary = realpeers.ensure_model_registry()
        llama_server_dir = llamacpp.ensure_llama_server(
            progress=lambda message: live_progress(f"[llama-server] {message}")
        )
        gguf = realpeers.gemma_gguf()
    except gobuild.BuildUnavailable as error:
        piece_unavailable(f"real peers unavailable: {error}")
    registry = realpeers.ModelRegistryProcess(
        binary=registry_binary,
        models=dict.fromkeys(realpeers.REAL_MODELS, gguf),
        log_path=tmp_path_factory.mktemp("registry") / "model-registry.log",
    )
    with registry:
        yield realpeers.RealPeers(
            model_runner=model_runner_binary, llama_server_dir=llama_server_dir, registry=registry
        )
