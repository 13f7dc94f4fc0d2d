"""docker-agent's own ``_configure`` cannot clobber the operator's configuration (emulator).

docker-agent POSTs a partial ``_configure`` for each model whenever it builds a client (every
session of ``serve api``), and model-runner replaces configurations instead of merging them.
This replays that request exactly as docker-agent derives it (reference/docker-agent-dmr.md §2:
URL = base_url minus one trailing ``/`` and one ``/v1``, plus ``/_configure``; body from
provider_opts; ``Content-Type: application/json`` only) from the operator-rendered file, against
a runner that already holds the operator's full configuration, and reads the configuration back.
A control replay with docker-agent's default ``/engines/v1`` base URL shows the trap is real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import yaml

from dmr_operator.reconcile import agent as agent_models
from dmr_operator.reconcile import agent_config
from dmr_operator.testing.emulator import ModelRunnerEmulator

MODEL = "ai/qwen3:14B"
OPERATOR_CONFIG = {
    "model": MODEL,
    "context-size": 16384,
    "runtime-flags": ["--threads", "4"],
    "keep_alive": "30m",
    "llamacpp": {"reasoning-budget": 1024},
}


def docker_agent_configure_url(base_url: str) -> str:
    """``buildConfigureURL``: strip one trailing '/', then one trailing '/v1', add '/_configure'."""
    parts = urlsplit(base_url)
    path = parts.path.removesuffix("/").removesuffix("/v1") + "/_configure"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def docker_agent_configure_body(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The body docker-agent builds from a rendered dmr model (§2); engine "" (base_url set)."""
    options = entry.get("provider_opts") or {}
    body: dict[str, Any] = {"model": entry["model"]}
    if isinstance(options.get("context_size"), int) and options["context_size"] >= 0:
        body["context-size"] = min(options["context_size"], 2**31 - 1)
    for key, wire_key in (("keep_alive", "keep_alive"), ("mode", "mode")):
        if isinstance(options.get(key), str):
            body[wire_key] = options[key].strip()
    if "thinking_budget" in entry:
        body["llamacpp"] = {"reasoning-budget": entry["thinking_budget"]}
    return body


@pytest.fixture
async def runner() -> AsyncIterator[ModelRunnerEmulator]:
    emulator = ModelRunnerEmulator()
    await emulator.start("127.0.0.1", 0)
    emulator.preload_store(MODEL)
    try:
        yield emulator
    finally:
        await emulator.stop()


async def read_back(client: httpx.AsyncClient, runner: ModelRunnerEmulator) -> Any:
    response = await client.get(f"{runner.url}/engines/_configure", params={"model": MODEL})
    assert response.status_code == 200
    return response.json()


def rendered_entry(endpoint: str) -> dict[str, Any]:
    served = agent_models.ServedModel(
        name="qwen",
        model=MODEL,
        backend="llama.cpp",
        mode="completion",
        context_size=16384,
        thinking_budget=1024,
        ready=True,
        endpoint=endpoint,
        created="2026-01-01T00:00:00Z",
    )
    config = {"agents": {"root": {"model": f"dmr/{MODEL}"}}}
    resolution = agent_models.resolve_models(config, [served], default_model=None)
    rendered = yaml.safe_load(agent_config.render_agent_config(config, resolution))
    entry: dict[str, Any] = rendered["models"][rendered["agents"]["root"]["model"]]
    return entry


async def replay(client: httpx.AsyncClient, entry: Mapping[str, Any]) -> httpx.Response:
    return await client.post(
        docker_agent_configure_url(entry["base_url"]),
        json=docker_agent_configure_body(entry),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


async def test_rendered_base_url_keeps_operator_configuration(runner: ModelRunnerEmulator) -> None:
    async with httpx.AsyncClient() as client:
        applied = await client.post(
            f"{runner.url}/engines/llama.cpp/_configure", json=OPERATOR_CONFIG
        )
        assert applied.status_code == 202
        before = await read_back(client, runner)
        assert before and before[0]["Config"]["runtime-flags"] == ["--threads", "4"]

        entry = rendered_entry(f"{runner.url}/v1")
        assert docker_agent_configure_url(entry["base_url"]) == f"{runner.url}/_configure"
        response = await replay(client, entry)
        # Not routed: docker-agent logs it at DEBUG and carries on.
        assert response.status_code == 404
        assert await read_back(client, runner) == before

        # The same base URL still serves inference through model-runner's /v1 alias.
        chat = await client.post(
            f"{entry['base_url']}/chat/completions",
            json={"model": entry["model"], "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200


async def test_control_default_engines_base_url_would_clobber(runner: ModelRunnerEmulator) -> None:
    async with httpx.AsyncClient() as client:
        applied = await client.post(
            f"{runner.url}/engines/llama.cpp/_configure", json=OPERATOR_CONFIG
        )
        assert applied.status_code == 202
        before = await read_back(client, runner)

        entry = {**rendered_entry(f"{runner.url}/v1"), "base_url": f"{runner.url}/engines/v1"}
        response = await replay(client, entry)
        assert response.status_code == 202
        after = await read_back(client, runner)
        assert after != before
        assert "runtime-flags" not in after[0]["Config"]
