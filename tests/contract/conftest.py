"""Targets for the model-runner contract tests: the emulator always, a real runner when
``DMR_URL`` is set (e.g. ``DMR_URL=http://127.0.0.1:12434`` with Docker Desktop's TCP port).

Every test body here runs against both, so the emulator cannot drift from model-runner
unnoticed. Against a real runner the tests pull ``DMR_TEST_MODEL`` (default ``ai/smollm2``, a
few hundred MB) and change its configuration: use a runner you do not mind disturbing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator

import httpx
import pytest

from dmr_operator.clients import modelrunner
from dmr_operator.testing.emulator import ModelRunnerEmulator

DMR_URL = os.environ.get("DMR_URL", "")


@dataclasses.dataclass
class Target:
    url: str
    client: modelrunner.ModelRunnerClient
    http: httpx.AsyncClient
    model: str
    emulator: ModelRunnerEmulator | None


@pytest.fixture(
    params=[
        "emulator",
        pytest.param(
            "real",
            marks=pytest.mark.skipif(
                not DMR_URL, reason="set DMR_URL to run the contract tests against a real runner"
            ),
        ),
    ]
)
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    emulator: ModelRunnerEmulator | None = None
    if request.param == "emulator":
        emulator = ModelRunnerEmulator()
        await emulator.start("127.0.0.1", 0)
        url = emulator.url
    else:
        url = DMR_URL.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)) as http:
            yield Target(
                url=url,
                client=modelrunner.ModelRunnerClient(http, url),
                http=http,
                model=os.environ.get("DMR_TEST_MODEL", "ai/smollm2"),
                emulator=emulator,
            )
    finally:
        if emulator is not None:
            await emulator.stop()
