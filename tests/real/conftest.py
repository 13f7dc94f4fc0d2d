"""Fixtures for the real tier without a cluster: one real model-runner server started as a plain
process the way a runner pod runs it (``model_runner_binary`` and ``real_peers`` come from
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dmr_operator.testing import controlplane, realpeers


@pytest.fixture
def model_runner(
    model_runner_binary: Path, tmp_path: Path
) -> Iterator[realpeers.ModelRunnerProcess]:
    runner = realpeers.ModelRunnerProcess(
        binary=model_runner_binary, port=controlplane.free_port(), work_dir=tmp_path / "runner"
    )
    with runner:
        yield runner


@pytest.fixture
def serving_runner(
    real_peers: realpeers.RealPeers, tmp_path: Path
) -> Iterator[realpeers.ModelRunnerProcess]:
    """A real runner with llama-server and the loopback registry: it pulls and serves models."""
    runner = realpeers.ModelRunnerProcess(
        binary=real_peers.model_runner,
        port=controlplane.free_port(),
        work_dir=tmp_path / "runner",
        env=real_peers.runner_environment(),
    )
    with runner:
        yield runner
