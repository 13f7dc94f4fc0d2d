"""The real tier on the cluster: every runner pod of these tests is served by a real
model-runner (with llama.cpp's llama-server and the real Gemma model from the loopback registry)
instead of the emulator. Cluster fixtures come from tests/integration/conftest.py, the real
peers from tests/conftest.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmr_operator.testing import realpeers


@pytest.fixture
def real_runners(real_peers: realpeers.RealPeers) -> Iterator[realpeers.RealRunnerFactory]:
    # A short root: the runners' unix sockets live below it (paths of at most 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="dmr-pods-"))
    yield realpeers.RealRunnerFactory(real_peers, root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pod_process_factory(real_runners: realpeers.RealRunnerFactory) -> realpeers.RealRunnerFactory:
    return real_runners
