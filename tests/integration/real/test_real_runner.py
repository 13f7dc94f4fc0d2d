"""DMRModels on real model-runner pods: the operator against upstream's server, llama.cpp's
llama-server and the real Gemma 3 270M model, pulled from a registry on loopback.

What only the real server can show: the configuration the operator applies is the one
llama-server runs with (its own ``/props``), a chat completion through the pool Service returns
generated tokens, a runner that loses its process (and with it its in-memory configuration) is
configured again before the next completion, and an embedding model answers with a vector.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from dmr_operator.testing import cluster, realpeers
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

PLURAL = "dmrmodels"
CONTEXT_SIZE = 2048
CHAT_SPEC = {
    "model": realpeers.GEMMA,
    "contextSize": CONTEXT_SIZE,
    "keepAlive": "10m",
    "runtimeFlags": ["--temp", "0.2", "--top-k", "20"],
    "thinkingBudget": 256,
    "speculative": {"draftModel": realpeers.GEMMA_DRAFT, "numTokens": 4},
}
# A model and a CPU-only llama.cpp: the first completion loads it (about 2 s here).
COMPLETION_TIMEOUT = httpx.Timeout(120, connect=5)


def single_runner_pool(api_client: Any, node_simulator: Any, namespace: str) -> str:
    node_simulator.add_node(f"{namespace}-cpu-0")
    cluster.create_runner_pool(api_client, namespace=namespace, replicas=1)
    return cluster.wait_for_runner_pods(api_client, namespace, "default", 1)[0]


def chat(base_url: str, model: str) -> dict[str, Any]:
    with httpx.Client(base_url=base_url, timeout=COMPLETION_TIMEOUT) as http:
        answer = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
            },
        )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_configured_model_is_what_llama_server_runs_and_it_answers(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pod = single_runner_pool(api_client, node_simulator, namespace)
    objects.create(PLURAL, cluster.dmrmodel("gemma", CHAT_SPEC))
    status = objects.wait_phase(PLURAL, "gemma", "Ready", timeout=120)["status"]

    # The read-back, in the real server's own spelling.
    assert status["effective"] == {
        "context-size": CONTEXT_SIZE,
        "runtime-flags": ["--temp", "0.2", "--top-k", "20"],
        "speculative": {"draft_model": realpeers.GEMMA_DRAFT, "num_tokens": 4},
        "keep_alive": "10m0s",
        "llamacpp": {"reasoning-budget": 256},
    }
    # The idle timeout the runner applies, in its own spelling.
    assert status["runners"][0]["keepAlive"] == "10m0s"
    runner = real_runners.of(namespace, pod).runner
    with runner.http(timeout=10) as http:
        configs = http.get("/engines/_configure", params={"model": realpeers.GEMMA}).json()
    assert len(configs) == 1, configs

    # A completion through the pool Service (the endpoint status names, resolved as kube-proxy
    # would), on the runner the operator configured.
    assert status["endpoint"] == f"http://pool-default.{namespace}.svc:80/v1"
    answer = chat(cluster.service_backend_url(api_client, namespace, "pool-default"), "gemma3:270m")
    assert answer["choices"][0]["message"]["content"] or answer["usage"]["completion_tokens"] > 0
    assert answer["usage"]["completion_tokens"] > 0

    # llama-server itself, asked over its own socket: the context the operator configured, the
    # draft model loaded, the flags on its command line.
    (server,) = runner.llama_servers()
    assert server.props()["default_generation_settings"]["n_ctx"] == CONTEXT_SIZE
    assert server.argument("--ctx-size") == str(CONTEXT_SIZE)
    assert server.argument("--reasoning-budget") == "256"
    assert server.argument("--spec-draft-n-max") == "4"
    assert server.argument("--model-draft") is not None
    assert server.argument("--temp") == "0.2"


def test_a_restarted_runner_is_configured_again_before_it_serves(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pod = single_runner_pool(api_client, node_simulator, namespace)
    spec = {"model": realpeers.GEMMA, "contextSize": CONTEXT_SIZE, "keepAlive": "10m"}
    objects.create(PLURAL, cluster.dmrmodel("gemma", spec))
    objects.wait_phase(PLURAL, "gemma", "Ready", timeout=120)
    pod_process = real_runners.of(namespace, pod)
    runner = pod_process.runner
    with runner.http(timeout=10) as http:
        assert len(http.get("/engines/_configure").json()) == 1

    # Killed, as the OOM killer would: model-runner's configuration lived only in its memory.
    pod_process.kill_on_stop = True
    node_simulator.crash(namespace, pod)
    with runner.http(timeout=10) as http:
        wait_for(
            lambda: len(http.get("/engines/_configure").json()) == 1,
            timeout=30,
            message="the operator to configure the restarted runner again",
        )
    backend = cluster.service_backend_url(api_client, namespace, "pool-default")
    assert chat(backend, realpeers.GEMMA)["usage"]["completion_tokens"] > 0
    (server,) = runner.llama_servers()
    assert server.props()["default_generation_settings"]["n_ctx"] == CONTEXT_SIZE
    reasons = [e.reason for e in cluster.events_for(api_client, namespace, "gemma")]
    assert "Reconfigured" in reasons


def test_an_embedding_model_returns_a_vector(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    single_runner_pool(api_client, node_simulator, namespace)
    spec = {
        "model": realpeers.GEMMA_EMBEDDING,
        "mode": "embedding",
        "contextSize": 512,
        # Gemma 3 270M is a chat model: its GGUF names no pooling type, which llama-server's
        # OpenAI route refuses ("Pooling type 'none' is not OAI compatible"). Embedding models
        # declare one; here the runtime flag gives it, through the operator's configuration.
        "runtimeFlags": ["--pooling", "mean"],
    }
    objects.create(PLURAL, cluster.dmrmodel("embed", spec))
    objects.wait_phase(PLURAL, "embed", "Ready", timeout=120)
    backend = cluster.service_backend_url(api_client, namespace, "pool-default")
    with httpx.Client(base_url=backend, timeout=COMPLETION_TIMEOUT) as http:
        answer = http.post(
            "/v1/embeddings", json={"model": realpeers.GEMMA_EMBEDDING, "input": "hello"}
        )
    assert answer.status_code == 200, answer.text
    vector = answer.json()["data"][0]["embedding"]
    assert len(vector) == 640  # gemma3.embedding_length in the model's GGUF metadata
    assert any(value != 0 for value in vector)


def test_an_ollama_clients_configuration_is_noticed_and_undone(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pod = single_runner_pool(api_client, node_simulator, namespace)
    spec = {
        "model": realpeers.GEMMA,
        "contextSize": CONTEXT_SIZE,
        "keepAlive": "10m",
        "runtimeFlags": ["--temp", "0.2"],
    }
    objects.create(PLURAL, cluster.dmrmodel("gemma", spec))
    objects.wait_phase(PLURAL, "gemma", "Ready", timeout=120)
    runner = real_runners.of(namespace, pod).runner

    # Open WebUI and friends talk Ollama to the pool: num_ctx replaces the stored configuration.
    backend = cluster.service_backend_url(api_client, namespace, "pool-default")
    with httpx.Client(base_url=backend, timeout=COMPLETION_TIMEOUT) as http:
        answer = http.post(
            "/api/chat",
            json={
                "model": realpeers.GEMMA,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": {"num_ctx": 768, "num_predict": 2},
            },
        )
    assert answer.status_code == 200, answer.text
    overwritten = time.monotonic()

    def stored() -> dict[str, Any]:
        with runner.http(timeout=10) as http:
            (entry,) = http.get("/engines/_configure").json()
        config: dict[str, Any] = entry["Config"]
        return config

    # The operator reads back every 2 s here (60 s by default) and restores what it applied.
    wait_for(
        lambda: stored().get("context-size") == CONTEXT_SIZE,
        timeout=30,
        message="the operator to restore its configuration",
    )
    print(
        f"FAULT Ollama client overwriting the configuration (real server, --verify-interval 2):"
        f" restored {time.monotonic() - overwritten:.1f} s after the /api/chat answered"
    )
    assert stored()["runtime-flags"] == ["--temp", "0.2"]

    def overwritten() -> list[Any]:
        found = cluster.events_for(api_client, namespace, "gemma")
        return [e for e in found if e.reason == "ConfigOverwritten"]

    events = wait_for(overwritten, timeout=10, message="a ConfigOverwritten event")
    assert len(events) == 1
    assert "context-size" in events[0].message and "runtime-flags" in events[0].message
    assert chat(backend, realpeers.GEMMA)["usage"]["completion_tokens"] > 0


def test_a_backend_the_real_image_lacks_is_refused_before_configuring(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pod = single_runner_pool(api_client, node_simulator, namespace)
    objects.create(
        PLURAL, cluster.dmrmodel("gemma-vllm", {"model": realpeers.GEMMA, "backend": "vllm"})
    )
    status = objects.wait_phase(PLURAL, "gemma-vllm", "Failed", timeout=60)["status"]
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["reason"] == "BackendUnavailable"
    # What the real server says about an image without vLLM, quoted in the condition.
    assert "it reports 'Not Installed: binary not found'" in ready["message"]
    with real_runners.of(namespace, pod).runner.http(timeout=10) as http:
        assert http.get("/engines/_configure").json() == []


def test_warmup_makes_ready_mean_loaded(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pod = single_runner_pool(api_client, node_simulator, namespace)
    runner = real_runners.of(namespace, pod).runner
    objects.create(PLURAL, cluster.dmrmodel("gemma", {**WARM_CHAT}))
    (chat,) = objects.wait_phase(PLURAL, "gemma", "Ready", timeout=120)["status"]["runners"]
    assert chat["loaded"] is True
    # Ready came after the load, which the real server lists, with the configured context.
    with runner.http(timeout=10) as http:
        running = {(e["model_name"], e["mode"]) for e in http.get("/engines/ps").json()}
    assert ("ai/gemma3:270m", "completion") in running
    assert [s.argument("--ctx-size") for s in runner.llama_servers()] == ["1024"]

    # An embedding model is warmed on its own route, so it loads as embedding. (The runner may
    # evict it again soon: its _configure also starts a completion-mode preload, and with this
    # machine's min(cores, 8) = 2 slots a third runner evicts every idle one; M6.)
    objects.create(PLURAL, cluster.dmrmodel("embed", {**WARM_EMBEDDING}))
    (embed,) = objects.wait_phase(PLURAL, "embed", "Ready", timeout=120)["status"]["runners"]
    assert embed["loaded"] is True
    started = [line for line in runner.log_path.read_text().splitlines() if "backend args" in line]
    assert any("--embeddings" in line and "--ctx-size 512" in line for line in started), started


WARM_CHAT = {"model": realpeers.GEMMA, "contextSize": 1024, "warmup": True}
WARM_EMBEDDING = {
    "model": realpeers.GEMMA_EMBEDDING,
    "mode": "embedding",
    "contextSize": 512,
    "runtimeFlags": ["--pooling", "mean"],
    "warmup": True,
}


def test_an_engine_that_cannot_start_is_reported_with_the_runners_log(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    real_runners: realpeers.RealRunnerFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    single_runner_pool(api_client, node_simulator, namespace)
    # model-runner's allow-list takes --pooling; llama-server refuses the value when it starts.
    spec = {**WARM_CHAT, "runtimeFlags": ["--pooling", "bogus"]}
    applied = time.monotonic()
    objects.create(PLURAL, cluster.dmrmodel("broken", spec))
    failed = objects.wait_phase(PLURAL, "broken", "Failed", timeout=120)["status"]
    ready = {c["type"]: c for c in failed["conditions"]}["Ready"]
    assert ready["reason"] == "LoadFailed"
    assert "invalid value" in ready["message"]  # llama-server's own words, via model-runner
    assert (
        "runner log: " in ready["message"]
        and "Backend runner initialization failed" in (ready["message"])
    )
    print(
        f"FAULT engine that fails to start (real llama-server, warmup): LoadFailed with the "
        f"runner's log line {time.monotonic() - applied:.1f} s after apply"
    )
