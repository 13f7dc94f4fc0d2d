"""Targets for the model-runner contract tests: the emulator, and the real model-runner (built
here from its Go module, with llama.cpp's llama-server and the real Gemma model pulled from the
loopback registry; see dmr_operator.testing.realpeers).

Every test body runs against both and must get the same answers, so the emulator cannot drift
from model-runner unnoticed. ``DMR_URL`` (e.g. ``http://127.0.0.1:12434``, Docker Desktop's TCP
port) points the real target at a runner of your own instead; it then pulls ``DMR_TEST_MODEL``
(default ``ai/smollm2``) and changes its configuration: use a runner you do not mind disturbing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dmr_operator.clients import modelrunner
from dmr_operator.dmr import references
from dmr_operator.testing import controlplane, realpeers
from dmr_operator.testing.emulator import ModelRunnerEmulator

DMR_URL = os.environ.get("DMR_URL", "")
EMULATED_REGISTRY = "127.0.0.1:5000"
RUNNER_SLOTS = min(os.cpu_count() or 1, 8)


@dataclasses.dataclass
class Target:
    url: str
    client: modelrunner.ModelRunnerClient
    http: httpx.AsyncClient
    model: str
    emulator: ModelRunnerEmulator | None
    runner: realpeers.ModelRunnerProcess | None = None
    # The runner's DEFAULT_REGISTRY: the host its store tags carry for names without one.
    default_registry: str = references.DEFAULT_DOMAIN

    def tag(self, reference: str) -> str:
        return references.qualified_tag(reference, default_registry=self.default_registry)


@pytest.fixture(params=["emulator", pytest.param("real", marks=pytest.mark.real)])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    emulator: ModelRunnerEmulator | None = None
    runner: realpeers.ModelRunnerProcess | None = None
    model = realpeers.GEMMA
    default_registry = references.DEFAULT_DOMAIN
    if request.param == "emulator":
        emulator = ModelRunnerEmulator()
        # As the real target's runner: names without a registry resolve to one on loopback.
        default_registry = emulator.store.default_registry = EMULATED_REGISTRY
        # model-runner has min(NumCPU, 8) runner slots: the same machine, the same number.
        emulator.runner_slots = RUNNER_SLOTS
        await emulator.start("127.0.0.1", 0)
        url = emulator.url
    elif DMR_URL:
        url = DMR_URL.rstrip("/")
        model = os.environ.get("DMR_TEST_MODEL", "ai/smollm2")
    else:
        peers: realpeers.RealPeers = request.getfixturevalue("real_peers")
        runner = realpeers.ModelRunnerProcess(
            binary=peers.model_runner,
            port=controlplane.free_port(),
            work_dir=tmp_path / "runner",
            env=peers.runner_environment(),
        ).start()
        url = runner.url
        default_registry = peers.registry.address
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)) as http:
            yield Target(
                url=url,
                client=modelrunner.ModelRunnerClient(http, url),
                http=http,
                model=model,
                emulator=emulator,
                runner=runner,
                default_registry=default_registry,
            )
    finally:
        if emulator is not None:
            await emulator.stop()
        if runner is not None:
            runner.stop()
