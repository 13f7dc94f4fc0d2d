"""Fixtures several unit modules share: the model-runner emulator, in process, on a free port.

The emulator's own agreement with the real model-runner is checked by the contract suite
(tests/contract); unit tests use it as the runner a client or worker talks to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dmr_operator.testing.emulator import ModelRunnerEmulator


@pytest.fixture
async def emulator() -> AsyncIterator[ModelRunnerEmulator]:
    emulator = ModelRunnerEmulator()
    await emulator.start("127.0.0.1", 0)
    try:
        yield emulator
    finally:
        await emulator.stop()
