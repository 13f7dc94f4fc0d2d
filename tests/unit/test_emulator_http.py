"""The model-runner emulator over real HTTP, checked against reference/model-runner-api.md."""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from dmr_operator.testing.emulator import ModelRunnerEmulator

TEXT_PLAIN = "text/plain; charset=utf-8"
QWEN3_ID_PREFIX = "sha256:"


@pytest.fixture
async def http(emulator: ModelRunnerEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


async def pull(http: httpx.AsyncClient, reference: str) -> list[dict[str, object]]:
    response = await http.post(
        "/models/create", json={"from": reference}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines()]


def assert_text_error(response: httpx.Response, status: int, message: str) -> None:
    assert (response.status_code, response.text) == (status, message + "\n")
    assert response.headers["content-type"] == TEXT_PLAIN


async def test_root_version_metrics(http: httpx.AsyncClient) -> None:
    assert (await http.get("/")).text == "Docker Model Runner is running"
    assert (await http.get("/version")).json() == {"version": "v0.0.0-emulator"}
    metrics = await http.get("/metrics")
    assert metrics.text == "# No active runners\n"
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert (await http.post("/metrics")).status_code == 405


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/engines/unload", 404, "not found"),  # wrong method is 404, not 405
        ("POST", "/engines/v1/chat/completions/", 404, "not found"),  # trailing slash
        ("POST", "/models/create/", 404, 'unknown action ""'),
        ("GET", "/models/", 404, "model not found"),
        ("GET", "/health", 404, "404 page not found"),
        ("GET", "/engines/llama.cpp/_configure", 404, "not found"),
        ("POST", "/v1/rerank", 404, "backend not found"),  # "v1" read as a backend
        ("POST", "/engines/llamacpp/_configure", 404, "backend not found"),
        ("POST", "/engines/unload", 400, "invalid request"),  # body required
        ("POST", "/models/create", 400, "invalid request body"),
    ],
)
async def test_routing_traps(
    http: httpx.AsyncClient, method: str, path: str, status: int, message: str
) -> None:
    assert_text_error(await http.request(method, path), status, message)


async def test_pull_lines_are_html_escaped_without_accept_json(http: httpx.AsyncClient) -> None:
    response = await http.post("/models/create", json={"from": "ai/smollm2"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    lines = response.text.splitlines()
    assert all("&#34;type&#34;" in line for line in lines)
    with pytest.raises(ValueError):
        json.loads(lines[0])
    decoded = [json.loads(html.unescape(line)) for line in lines]
    assert [line["type"] for line in decoded] == ["progress"] * 3 + ["success"]
    assert decoded[0]["layer"]["id"].startswith("sha256:") and decoded[0]["mode"] == "pull"
    assert decoded[-1]["message"] == "Model pulled successfully"


async def test_pull_with_accept_json_then_cached(http: httpx.AsyncClient) -> None:
    first = await pull(http, "ai/qwen3")
    assert first[-1]["type"] == "success"
    assert first[0]["total"] == 256 * 2**20
    cached = await pull(http, "ai/qwen3:8B-Q4_K_M")  # same digest as ai/qwen3:latest
    assert cached == [
        {
            "type": "success",
            "message": "Using cached model: 256.00 MiB",
            "total": 0,
            "layer": {"size": 0, "current": 0},
            "mode": "pull",
        }
    ]
    models = (await http.get("/models")).json()
    assert models[0]["tags"] == ["docker.io/ai/qwen3:latest", "docker.io/ai/qwen3:8B-Q4_K_M"]


async def test_pull_unknown_is_404_before_streaming(http: httpx.AsyncClient) -> None:
    assert_text_error(
        await http.post("/models/create", json={"from": "ai/nope"}), 404, "Model not found"
    )
    assert_text_error(
        await http.post("/models/create", json={"from": "a b"}), 400, "Invalid model reference"
    )


async def test_hugging_face_not_found_arrives_after_the_200(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/models/create",
        json={"from": "hf.co/nobody/nothing"},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200
    first, last = response.text.splitlines()
    assert json.loads(first)["message"] == "Fetching file list..."
    assert last == "Model not found"


async def test_pull_failure_after_the_200(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    emulator.fail_pull("ai/smollm2")
    response = await http.post(
        "/models/create", json={"from": "smollm2"}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert json.loads(lines[1])["type"] == "error"
    assert lines[2] == "error while pulling model: writing image to store: connection reset by peer"
    assert (await http.get("/models")).json() == []


async def test_get_model_and_partial_name_fallback(http: httpx.AsyncClient) -> None:
    await pull(http, "ai/smollm2")
    by_short = (await http.get("/models/smollm2")).json()
    assert by_short["tags"] == ["docker.io/ai/smollm2:latest"]
    assert by_short["config"]["format"] == "gguf"
    by_id = (await http.get(f"/models/{by_short['id']}")).json()
    assert by_id == by_short
    assert (await http.get(f"/models/{by_short['id'][7:19]}")).json() == by_short
    assert_text_error(await http.get("/models/ai/nope"), 404, "model not found")
    # The OpenAI route has no partial fallback.
    openai = await http.get("/engines/v1/models/ai/smollm2")
    assert openai.json()["id"] == "docker.io/ai/smollm2:latest"
    assert_text_error(
        await http.get("/engines/v1/models/nope"),
        404,
        "error while getting model: get model '\"nope\"': model not found",
    )
    listing = (await http.get("/v1/models")).json()
    assert listing["object"] == "list" and listing["data"][0]["owned_by"] == "docker"


async def test_delete_untags_then_needs_force(http: httpx.AsyncClient) -> None:
    await pull(http, "ai/qwen3")
    await pull(http, "ai/qwen3:8B-Q4_K_M")
    model_id = (await http.get("/models/ai/qwen3")).json()["id"]
    assert_text_error(
        await http.delete(f"/models/{model_id}"),
        409,
        f'error while deleting model: unable to delete "{model_id}" (must be forced) due to '
        "multiple tag references: resource conflict",
    )
    untag = await http.delete("/models/ai/qwen3:8B-Q4_K_M")
    assert untag.json() == [{"Untagged": "docker.io/ai/qwen3:8B-Q4_K_M"}]
    await pull(http, "ai/qwen3:8B-Q4_K_M")
    forced = await http.delete(f"/models/{model_id}?force")
    assert forced.json() == [
        {"Untagged": "docker.io/ai/qwen3:latest"},
        {"Untagged": "docker.io/ai/qwen3:8B-Q4_K_M"},
        {"Deleted": model_id},
    ]
    assert_text_error(
        await http.delete("/models/ai/qwen3"), 404, "error while deleting model: model not found"
    )


async def test_configure_answers(http: httpx.AsyncClient) -> None:
    await pull(http, "ai/qwen3")
    ok = await http.post("/engines/llama.cpp/_configure", json={"model": "ai/qwen3"})
    assert (ok.status_code, ok.text) == (202, "")
    bad = [
        {"model": "ai/qwen3", "mode": "chat"},
        {"model": "ai/qwen3", "keep_alive": 300},
        {"model": "ai/qwen3", "keep_alive": "1d"},
        {"model": "ai/qwen3", "context-size": 8192.5},
        {"model": "ai/qwen3", "runtime-flags": "--threads 8"},
        {"model": 7},
    ]
    for body in bad:
        assert_text_error(await http.post("/engines/_configure", json=body), 400, "invalid request")
    assert_text_error(
        await http.post(
            "/engines/_configure",
            json={"model": "ai/qwen3", "runtime-flags": ["--max-model-len", "8"]},
        ),
        500,
        'runtime flag "--max-model-len" is not allowed for backend "llama.cpp"',
    )
    assert_text_error(
        await http.post(
            "/engines/llama.cpp/_configure",
            json={"model": "ai/qwen3", "raw-runtime-flags": "--x 'open"},
        ),
        500,
        "invalid runtime flags: invalid command line string",
    )
    assert_text_error(
        await http.post(
            "/engines/vllm/_configure",
            json={"model": "ai/qwen3", "vllm": {"hf-overrides": {"a": {"b-c": 1}}}},
        ),
        500,
        'invalid hf_overrides nested key "b-c" in "a": must contain only alphanumeric characters '
        "and underscores, and start with a letter or underscore",
    )


async def test_configure_echo_shape(http: httpx.AsyncClient) -> None:
    await pull(http, "ai/qwen3")
    body = {
        "model": "qwen3",
        "context_size": 1234,  # misspelt: silently ignored, like model-runner
        "context-size": 8192,
        "raw-runtime-flags": "--temp 0.7",
        "keep_alive": "-5m",
        "speculative": {"draft_model": "ai/qwen3:0.6B"},
        "llamacpp": {"reasoning-budget": 0},
    }
    assert (await http.post("/engines/_configure", json=body)).status_code == 202
    (entry,) = (await http.get("/engines/_configure")).json()
    assert entry["Backend"] == "llama.cpp"
    assert entry["Model"] == "docker.io/ai/qwen3:latest"
    assert entry["ModelID"].startswith(QWEN3_ID_PREFIX) and entry["Mode"] == "completion"
    assert entry["Config"] == {
        "context-size": 8192,
        "runtime-flags": ["--temp", "0.7"],
        "speculative": {"draft_model": "ai/qwen3:0.6B"},
        "keep_alive": "-1",
        "llamacpp": {"reasoning-budget": 0},
    }
    assert (await http.get("/engines/_configure?model=ai/qwen3:latest")).json() == [entry]
    assert (await http.get("/engines/_configure?model=ai/smollm2")).json() == []


async def test_configs_keyed_replaced_and_auto_selected(http: httpx.AsyncClient) -> None:
    await pull(http, "ai/qwen3")
    await pull(http, "ai/qwen3-vllm")
    for keep_alive in ("5m", "10m"):
        body = {"model": "ai/qwen3", "keep_alive": keep_alive, "context-size": 4096}
        assert (await http.post("/engines/_configure", json=body)).status_code == 202
    # Replaced, not merged.
    body = {"model": "ai/qwen3", "keep_alive": "1h"}
    assert (await http.post("/engines/_configure", json=body)).status_code == 202
    body = {"model": "ai/qwen3", "mode": "embedding"}
    assert (await http.post("/engines/_configure", json=body)).status_code == 202
    safetensors = {"model": "ai/qwen3-vllm", "runtime-flags": ["--threads", "4"]}
    assert (await http.post("/engines/_configure", json=safetensors)).status_code == 202
    entries = (await http.get("/engines/_configure")).json()
    summary = sorted(
        (e["Backend"], e["Model"], e["Mode"], json.dumps(e["Config"])) for e in entries
    )
    assert summary == [
        ("llama.cpp", "docker.io/ai/qwen3:latest", "completion", '{"keep_alive": "1h0m0s"}'),
        ("llama.cpp", "docker.io/ai/qwen3:latest", "embedding", "{}"),
        (
            "vllm",
            "docker.io/ai/qwen3-vllm:latest",
            "completion",
            '{"runtime-flags": ["--threads", "4"]}',
        ),
    ]


async def test_config_for_a_model_not_pulled_never_applies(http: httpx.AsyncClient) -> None:
    body = {"model": "ai/smollm2", "context-size": 2048}
    assert (await http.post("/engines/_configure", json=body)).status_code == 202
    assert (await http.get("/engines/_configure")).json() == []
    await pull(http, "ai/smollm2")
    # Stored under the raw string, it now shows up but is not the model's (digest) config.
    (entry,) = (await http.get("/engines/_configure")).json()
    assert entry["ModelID"] == "ai/smollm2"
    assert (await http.get("/engines/_configure?model=ai/smollm2")).json() == []


async def test_busy_runner_refuses_a_different_config(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    await pull(http, "ai/qwen3")
    first = {"model": "ai/qwen3", "context-size": 4096}
    assert (await http.post("/engines/_configure", json=first)).status_code == 202
    emulator.hold_runner("ai/qwen3", seconds=30)
    assert (await http.post("/engines/_configure", json=first)).status_code == 202  # no-op
    second = {"model": "ai/qwen3", "context-size": 8192}
    assert_text_error(
        await http.post("/engines/_configure", json=second), 409, "runner already active"
    )
    (entry,) = (await http.get("/engines/_configure")).json()
    assert entry["Config"] == {"context-size": 4096}
    (status,) = (await http.get("/engines/ps")).json()
    assert status["in_use"] is True and status["last_used"] == "0001-01-01T00:00:00Z"


async def test_forced_configure_failure(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    emulator.configure_failure = "boom"
    assert_text_error(
        await http.post("/engines/_configure", json={"model": "ai/qwen3"}), 500, "boom"
    )


async def test_preload_after_configure_then_idle_expiry(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    emulator.time_scale = 0.001  # 5m -> 0.3 s
    await pull(http, "ai/qwen3")
    await pull(http, "ai/smollm2")
    for model, keep_alive in (("ai/qwen3", "5m"), ("ai/smollm2", "-1")):
        body = {"model": model, "keep_alive": keep_alive}
        assert (await http.post("/engines/_configure", json=body)).status_code == 202

    async def names() -> set[str]:
        return {entry["model_name"] for entry in (await http.get("/engines/ps")).json()}

    async def both_loaded() -> bool:
        return await names() == {"ai/qwen3", "ai/smollm2"}

    await eventually(both_loaded)
    ps = {e["model_name"]: e for e in (await http.get("/engines/ps")).json()}
    assert ps["ai/qwen3"]["keep_alive"] == "5m0s" and ps["ai/smollm2"]["keep_alive"] == "-1"
    assert "in_use" not in ps["ai/qwen3"] and ps["ai/qwen3"]["backend_name"] == "llama.cpp"

    async def qwen3_expired() -> bool:
        return await names() == {"ai/smollm2"}

    await eventually(qwen3_expired)


async def test_unload_rules(emulator: ModelRunnerEmulator, http: httpx.AsyncClient) -> None:
    await pull(http, "ai/qwen3")
    body = {"model": "ai/qwen3", "context-size": 4096}
    assert (await http.post("/engines/_configure", json=body)).status_code == 202
    preload = await http.post(
        "/engines/v1/chat/completions",
        json={"model": "ai/qwen3"},
        headers={"X-Preload-Only": "true"},
    )
    assert (preload.status_code, preload.text) == (200, "")
    # No backend: runners stop, the config stays.
    unload = await http.post("/engines/unload", json={"models": ["ai/qwen3"]})
    assert unload.json() == {"unloaded_runners": 1}
    assert len((await http.get("/engines/_configure")).json()) == 1
    # With the backend: the config goes too; unknown models are not an error.
    unload = await http.post(
        "/engines/unload", json={"backend": "llama.cpp", "models": ["ai/qwen3", "ai/nope"]}
    )
    assert unload.json() == {"unloaded_runners": 0}
    assert (await http.get("/engines/_configure")).json() == []
    # A busy runner is never unloaded.
    emulator.hold_runner("ai/qwen3", seconds=30)
    unload = await http.post("/engines/unload", json={"all": True})
    assert unload.json() == {"unloaded_runners": 0}


async def test_inference(http: httpx.AsyncClient) -> None:
    assert_text_error(
        await http.post("/engines/v1/chat/completions", json={"model": "ai/qwen3"}),
        404,
        "error while getting model: get model '\"ai/qwen3\"': model not found",
    )
    assert_text_error(
        await http.post("/v1/chat/completions", json={"messages": []}), 400, "model is required"
    )
    await pull(http, "ai/qwen3")
    chat = await http.post(
        "/v1/chat/completions", json={"model": "ai/qwen3", "messages": [{"role": "user"}]}
    )
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    stream = await http.post(
        "/engines/llama.cpp/v1/chat/completions", json={"model": "ai/qwen3", "stream": True}
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    await pull(http, "ai/embeddinggemma")
    embeddings = await http.post(
        "/engines/v1/embeddings", json={"model": "ai/embeddinggemma", "input": ["a", "b"]}
    )
    assert [item["index"] for item in embeddings.json()["data"]] == [0, 1]
    await pull(http, "ai/qwen3-reranker")
    rerank = await http.post(
        "/rerank", json={"model": "ai/qwen3-reranker", "query": "q", "documents": ["x", "y"]}
    )
    assert sorted(item["index"] for item in rerank.json()["results"]) == [0, 1]
    modes = {(e["model_name"], e["mode"]) for e in (await http.get("/engines/ps")).json()}
    assert modes == {
        ("ai/qwen3", "completion"),
        ("ai/embeddinggemma", "embedding"),
        ("ai/qwen3-reranker", "reranking"),
    }


async def test_restart_drops_configs_and_runners_keeps_the_store(
    emulator: ModelRunnerEmulator,
) -> None:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as http:
        await pull(http, "ai/qwen3")
        body = {"model": "ai/qwen3", "context-size": 4096}
        assert (await http.post("/engines/_configure", json=body)).status_code == 202
    port = emulator.port
    assert port is not None
    await emulator.stop()
    await emulator.start("127.0.0.1", port)
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5) as http:
        assert (await http.get("/engines/_configure")).json() == []
        assert (await http.get("/engines/ps")).json() == []
        assert [m["tags"] for m in (await http.get("/models")).json()] == [
            ["docker.io/ai/qwen3:latest"]
        ]
    assert emulator.starts == 2


async def test_request_log(emulator: ModelRunnerEmulator, http: httpx.AsyncClient) -> None:
    await http.post("/engines/llama.cpp/_configure", json={"model": "m"}, headers={"X-A": "1"})
    (call,) = emulator.calls("POST", "/engines/llama.cpp/_configure")
    assert call.body == {"model": "m"} and call.status == 202 and call.headers["X-A"] == "1"


async def test_backends_say_not_installed_until_their_install_check_ran(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    await emulator.stop()
    emulator.install_delay = 0.3  # the real server: about 0.2 s after start
    await emulator.start(emulator.host or "127.0.0.1", emulator.port or 0)
    early = (await http.get("/engines/status")).json()
    assert set(early.values()) == {"Not Installed"}
    await eventually(
        lambda: _llama_running(http),
        within=2,
    )


async def _llama_running(http: httpx.AsyncClient) -> bool:
    status = (await http.get("/engines/status")).json()
    return str(status["llama.cpp"]).startswith("Running")


async def test_a_background_preload_past_its_limit_is_given_up(
    emulator: ModelRunnerEmulator, http: httpx.AsyncClient
) -> None:
    await pull(http, "ai/smollm2")
    emulator.load_delay, emulator.preload_timeout = 0.5, 0.1
    configured = await http.post("/engines/_configure", json={"model": "ai/smollm2"})
    assert configured.status_code == 202
    await asyncio.sleep(0.3)
    assert (await http.get("/engines/ps")).json() == []  # terminated, not loaded
    emulator.preload_timeout = 60.0
    assert (await http.post("/engines/_configure", json={"model": "ai/smollm2"})).status_code == 202
    await eventually(lambda: _listed(http, "ai/smollm2"), within=3)


async def _listed(http: httpx.AsyncClient, model: str) -> bool:
    running = (await http.get("/engines/ps")).json()
    return any(r["model_name"] == model and not r.get("loading") for r in running)
