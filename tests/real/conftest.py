"""Fixtures for the real tier: the real model-runner server, built from its Go module on first use
(``dmr-operator peers build``), started as a plain process the way a runner pod runs it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from dmr_operator.testing import controlplane, gobuild, realpeers


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


@pytest.fixture
def model_runner(
    model_runner_binary: Path, tmp_path: Path
) -> Iterator[realpeers.ModelRunnerProcess]:
    runner = realpeers.ModelRunnerProcess(
        binary=model_runner_binary, port=controlplane.free_port(), work_dir=tmp_path / "runner"
    )
    with runner:
        yield runner
