"""Client behaviour that must hold against model-runner itself and against the emulator."""

from __future__ import annotations

import pytest

from dmr_operator.clients import modelrunner
from dmr_operator.dmr import wire
from dmr_operator.testing import realpeers
from dmr_operator.testing.waiting import wait_for_async

from .conftest import RUNNER_SLOTS, Target


async def test_liveness_and_status(target: Target) -> None:
    assert (await target.http.get(target.url + "/")).text.startswith("Docker Model Runner")
    assert isinstance(await target.client.version(), str)

    # Right after start every backend says a bare "Not Installed" until its install check ran
    # (the real server: about 0.2 s), then llama.cpp says Running.
    async def llama_cpp_running() -> dict[str, str] | None:
        status = await target.client.status()
        return status if status["llama.cpp"].startswith("Running") else None

    await wait_for_async(llama_cpp_running, timeout=10, message="llama.cpp Running")
    assert isinstance((await target.client.df()).models_disk_usage, int)


async def test_pull_then_find(target: Target) -> None:
    progress: list[wire.PullProgress] = []
    result = await target.client.pull(target.model, on_progress=progress.append)
    assert progress[-1].type == wire.PULL_SUCCESS
    again = await target.client.pull(target.model)
    assert again.cached and again.message.startswith("Using cached model: ")
    model = await target.client.get_model(target.model)
    assert model is not None
    assert model.has_reference(target.model, default_registry=target.default_registry)
    assert target.tag(target.model) in model.tags
    assert model.id.startswith("sha256:") and len(model.id) == 71
    assert any(m.id == model.id for m in await target.client.list_models())
    assert result.message


async def test_unknown_things(target: Target) -> None:
    assert await target.client.get_model("ai/no-such-model-xyz") is None
    with pytest.raises(modelrunner.NotFound):
        await target.client.delete_model("ai/no-such-model-xyz")
    response = await target.http.post(
        target.url + "/engines/no-such-backend/_configure", json={"model": target.model}
    )
    assert (response.status_code, response.text) == (404, "backend not found\n")


async def test_configure_round_trip(target: Target) -> None:
    await target.client.pull(target.model)
    request = wire.ConfigureRequest(
        model=target.model,
        context_size=2048,
        raw_runtime_flags="--temp 0.5 --top-k 20",
        keep_alive="90s",
        llamacpp=wire.LlamaCppConfig(reasoning_budget=0),
    )
    await target.client.configure("llama.cpp", request)
    entries = await target.client.read_configs(target.model)
    ours = [e for e in entries if e.mode == request.effective_mode()]
    assert len(ours) == 1
    assert ours[0].config.keep_alive == "1m30s"
    assert ours[0].config.runtime_flags == ["--temp", "0.5", "--top-k", "20"]
    assert wire.config_differences(request, ours[0], backend="llama.cpp") == []
    await target.client.configure("llama.cpp", request)  # identical: a no-op, still 202
    unloaded = await target.client.unload(backend="llama.cpp", models=[target.model])
    assert unloaded >= 0
    assert [
        e for e in await target.client.read_configs(target.model) if e.mode == "completion"
    ] == []


async def test_server_side_validation_codes(target: Target) -> None:
    url = target.url + "/engines/_configure"
    flags = await target.http.post(
        url, json={"model": target.model, "runtime-flags": ["--model", "x"]}
    )
    assert (flags.status_code, flags.text) == (
        500,
        'runtime flag "--model" is not allowed for backend "llama.cpp"\n',
    )
    mode = await target.http.post(url, json={"model": target.model, "mode": "chat"})
    assert (mode.status_code, mode.text) == (400, "invalid request\n")
    keep_alive = await target.http.post(url, json={"model": target.model, "keep_alive": 60})
    assert (keep_alive.status_code, keep_alive.text) == (400, "invalid request\n")


async def test_client_refuses_invalid_config_before_sending(target: Target) -> None:
    request = wire.ConfigureRequest(model=target.model, runtime_flags=["--log-file", "x"])
    with pytest.raises(modelrunner.ConfigRejected) as caught:
        await target.client.configure("llama.cpp", request)
    assert caught.value.status_code is None
    assert (
        caught.value.message == 'runtime flag "--log-file" is not allowed for backend "llama.cpp"'
    )
    if target.emulator is not None:
        assert target.emulator.calls("POST", "/engines/llama.cpp/_configure") == []


async def test_go_mux_details(target: Target) -> None:
    engines = await target.http.get(target.url + "/engines")
    assert (engines.status_code, engines.headers["location"]) == (307, "/engines/")
    assert engines.text == '<a href="/engines/">Temporary Redirect</a>.\n\n'
    # HEAD answers every GET route with its headers and no body.
    for path in ("/models", "/engines/status", "/engines/_configure"):
        get, head = (
            await target.http.get(target.url + path),
            await target.http.head(target.url + path),
        )
        assert head.status_code == get.status_code == 200
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
        assert head.content == b""
    preflight = await target.http.options(
        target.url + "/models",
        headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET"},
    )
    assert (preflight.status_code, preflight.text) == (403, "Origin not allowed\n")


async def test_an_ollama_client_replaces_the_stored_configuration(target: Target) -> None:
    await target.client.pull(target.model)
    request = wire.ConfigureRequest(
        model=target.model,
        context_size=1024,
        keep_alive="10m",
        runtime_flags=["--temp", "0.5"],
    )
    await target.client.configure("llama.cpp", request)
    answer = await target.http.post(
        target.url + "/api/chat",
        json={
            "model": target.model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_ctx": 768, "num_predict": 2},
            "keep_alive": "5m",
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    (entry,) = await target.client.read_configs(target.model)
    # Everything the operator had set is gone, not merged: only what the Ollama call named.
    assert entry.config.context_size == 768
    assert entry.config.keep_alive == "5m0s"
    assert entry.config.runtime_flags is None


async def test_past_its_runner_slots_every_idle_model_is_evicted(
    target: Target,
) -> None:
    # min(NumCPU, 8) slots; the registry serves three names of the same model (two modes).
    loads = [
        (realpeers.GEMMA, "completion"),
        (realpeers.GEMMA_DRAFT, "completion"),
        (realpeers.GEMMA_EMBEDDING, "embedding"),
    ]
    if len(loads) <= RUNNER_SLOTS or (target.emulator is None and target.runner is None):
        pytest.skip(f"{RUNNER_SLOTS} runner slots here: three models cannot overflow them")
    for model, _ in loads:
        await target.client.pull(model)
    for model, mode in loads[: RUNNER_SLOTS + 1]:
        await target.client.preload(model, mode=mode)
    running = {(r.model_name, r.mode) for r in await target.client.ps()}
    # keep_alive does not matter: a slot is needed, so every idle runner goes, not just one.
    assert running == {loads[RUNNER_SLOTS]}
