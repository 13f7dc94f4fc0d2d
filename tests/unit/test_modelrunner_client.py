"""ModelRunnerClient against the emulator over real HTTP: error mapping, pulls, restarts."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmr_operator.clients import modelrunner
from dmr_operator.dmr import validation, wire
from dmr_operator.testing.emulator import ModelRunnerEmulator, PullFailure


@pytest.fixture
async def client(emulator: ModelRunnerEmulator) -> AsyncIterator[modelrunner.ModelRunnerClient]:
    async with httpx.AsyncClient() as http:
        yield modelrunner.ModelRunnerClient(http, emulator.url + "/")


async def test_pull_reports_progress_and_caching(
    client: modelrunner.ModelRunnerClient, emulator: ModelRunnerEmulator
) -> None:
    seen: list[wire.PullProgress] = []
    tracker = wire.PullProgressTracker()
    result = await client.pull("ai/qwen3:14B", on_progress=seen.append)
    assert result == modelrunner.PullResult(message="Model pulled successfully", cached=False)
    assert [p.type for p in seen] == ["progress"] * 6 + ["success"]
    percents = [tracker.update(p) for p in seen]
    assert percents[2] == 50.0 and percents[-1] == 100.0
    (call,) = emulator.calls("POST", "/models/create")
    assert call.headers["Accept"] == "application/json"
    assert call.headers["User-Agent"] == modelrunner.USER_AGENT
    assert "Origin" not in call.headers
    cached = await client.pull("qwen3:14B")
    assert cached.cached and cached.message == "Using cached model: 512.00 MiB"


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            PullFailure(message="disk full", error_line=True, trailing_text=False),
            "Error: disk full",
        ),
        (
            PullFailure(message="disk full", error_line=False, trailing_text=True),
            "error while pulling model: disk full",
        ),
        (PullFailure(message="disk full", after_lines=0), "Error: disk full"),
    ],
)
async def test_pull_failing_after_the_200(
    client: modelrunner.ModelRunnerClient,
    emulator: ModelRunnerEmulator,
    failure: PullFailure,
    message: str,
) -> None:
    emulator.fail_pull("ai/smollm2", failure)
    with pytest.raises(modelrunner.PullFailed) as caught:
        await client.pull("ai/smollm2")
    assert (caught.value.status_code, caught.value.message) == (None, message)
    assert await client.get_model("ai/smollm2") is None


async def test_pull_errors_before_streaming(client: modelrunner.ModelRunnerClient) -> None:
    with pytest.raises(modelrunner.PullFailed) as caught:
        await client.pull("ai/unknown")
    assert (caught.value.status_code, caught.value.message) == (404, "Model not found")
    with pytest.raises(modelrunner.PullFailed) as caught:
        await client.pull("hf.co/nobody/nothing")
    assert (caught.value.status_code, caught.value.message) == (None, "Model not found")


async def test_configure_status_mapping(
    client: modelrunner.ModelRunnerClient, emulator: ModelRunnerEmulator
) -> None:
    await client.pull("ai/qwen3")
    request = wire.ConfigureRequest(model="ai/qwen3", context_size=4096)
    await client.configure("llama.cpp", request)
    emulator.hold_runner("ai/qwen3", seconds=30)
    with pytest.raises(modelrunner.RunnerBusy) as busy:
        await client.configure("llama.cpp", request.model_copy(update={"context_size": 8192}))
    assert (busy.value.status_code, busy.value.message) == (409, "runner already active")
    emulator.configure_failure = "injected"
    with pytest.raises(modelrunner.ConfigRejected) as rejected:
        await client.configure(None, request)
    assert (rejected.value.status_code, rejected.value.message) == (500, "injected")
    with pytest.raises(modelrunner.ConfigRejected) as local:
        await client.configure("mlx", wire.ConfigureRequest(model="ai/qwen3", runtime_flags=["-t"]))
    assert local.value.status_code is None
    assert emulator.calls("POST", "/engines/mlx/_configure") == []


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, modelrunner.BadRequest),
        (404, modelrunner.NotFound),
        (409, modelrunner.RunnerBusy),
        (500, modelrunner.RunnerServerError),
        (503, modelrunner.RunnerServerError),
        (412, modelrunner.RunnerError),
    ],
)
def test_error_mapping(status: int, error_type: type[modelrunner.RunnerError]) -> None:
    error = modelrunner._error_from_response(httpx.Response(status, text="why\n"))
    assert type(error) is error_type
    assert (error.status_code, error.message, str(error)) == (status, "why", f"{status}: why")


async def test_read_back_ps_unload_and_delete(
    client: modelrunner.ModelRunnerClient, emulator: ModelRunnerEmulator
) -> None:
    await client.pull("ai/qwen3")
    await client.pull("ai/qwen3:8B-Q4_K_M")
    request = wire.ConfigureRequest(model="ai/qwen3", keep_alive="10m", mode="completion")
    await client.configure("llama.cpp", request)
    (entry,) = await client.read_configs("ai/qwen3")
    assert (entry.backend, entry.model, entry.config.keep_alive) == (
        "llama.cpp",
        "docker.io/ai/qwen3:latest",
        "10m0s",
    )
    await client.preload("ai/qwen3")
    (status,) = await client.ps()
    assert (status.backend_name, status.model_name, status.keep_alive) == (
        "llama.cpp",
        "ai/qwen3",
        "10m0s",
    )
    assert await client.unload(backend=None, models=["ai/qwen3"]) == 1
    assert len(await client.read_configs()) == 1
    assert await client.unload(backend="llama.cpp", models=["ai/qwen3"]) == 0
    assert await client.read_configs() == []
    assert await client.unload_agent_style("ai/qwen3") is False
    with pytest.raises(modelrunner.DeleteConflict):
        await client.delete_model(entry.model_id)
    actions = await client.delete_model(entry.model_id, force=True)
    assert actions[-1].deleted == entry.model_id
    assert await client.list_models() == []
    assert (await client.df()).models_disk_usage == 0


async def test_restart_drops_configs_keeps_models(
    client: modelrunner.ModelRunnerClient, emulator: ModelRunnerEmulator
) -> None:
    await client.pull("ai/smollm2")
    await client.configure(None, wire.ConfigureRequest(model="ai/smollm2", context_size=2048))
    port = emulator.port
    assert port is not None
    await emulator.stop()
    with pytest.raises(modelrunner.RunnerUnreachable):
        await client.read_configs()
    await emulator.start("127.0.0.1", port)
    assert await client.read_configs() == []
    assert [m.tags for m in await client.list_models()] == [["docker.io/ai/smollm2:latest"]]


async def test_unreachable_runner_fails_fast(emulator: ModelRunnerEmulator) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    async with httpx.AsyncClient() as http:
        client = modelrunner.ModelRunnerClient(http, f"http://127.0.0.1:{free_port}")
        started = time.monotonic()
        with pytest.raises(modelrunner.RunnerUnreachable):
            await client.status()
        assert time.monotonic() - started < 1.0
        # A runner that stops listening keeps its state for when it comes back.
        live = modelrunner.ModelRunnerClient(http, emulator.url)
        await live.pull("ai/smollm2")
        await emulator.stop_listening()
        with pytest.raises(modelrunner.RunnerUnreachable):
            await live.list_models()
        await emulator.start_listening()
        assert len(await live.list_models()) == 1


async def test_latency_knob(
    client: modelrunner.ModelRunnerClient, emulator: ModelRunnerEmulator
) -> None:
    emulator.latency = 0.2
    started = time.monotonic()
    await client.version()
    assert time.monotonic() - started >= 0.2


# --- property: request -> wire JSON -> emulator -> read-back -> no differences -----------------


@pytest.fixture(scope="module")
def threaded_emulator() -> Iterator[ModelRunnerEmulator]:
    """One emulator on its own loop in a thread, so sync hypothesis tests can use it."""
    emulator = ModelRunnerEmulator()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(emulator.start("127.0.0.1", 0))
        emulator.preload_store("ai/qwen3", "ai/qwen3:0.6B", "ai/qwen3-vllm")
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield emulator
    asyncio.run_coroutine_threadsafe(emulator.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


flag_values = st.sampled_from(["1", "8", "0.5", "-1", "auto", "on"])
llama_flags = st.lists(
    st.sampled_from(sorted(validation.LLAMACPP_ALLOWED_FLAGS)).flatmap(
        lambda flag: st.one_of(
            st.just([flag]), flag_values.map(lambda v: [flag, v] if v != "-1" else [f"{flag}=-1"])
        )
    ),
    max_size=3,
).map(lambda groups: [element for group in groups for element in group])
keep_alives = st.one_of(
    st.none(),
    st.sampled_from(["0", "-1", "-5m", "30s", "1.5h", "2h30m", "250ms", "1h0m0s"]),
)
hf_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=5)),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,4}", fullmatch=True), inner, max_size=2)
    ),
    max_leaves=4,
)
requests = st.builds(
    wire.ConfigureRequest,
    model=st.sampled_from(["ai/qwen3", "qwen3", "ai/qwen3:latest"]),
    mode=st.one_of(st.none(), st.sampled_from(validation.MODES)),
    context_size=st.one_of(st.none(), st.integers(-1, 2**31 - 1)),
    runtime_flags=st.one_of(st.none(), llama_flags),
    keep_alive=keep_alives,
    speculative=st.one_of(
        st.none(),
        st.builds(
            wire.SpeculativeConfig,
            draft_model=st.one_of(st.none(), st.just("ai/qwen3:0.6B")),
            num_tokens=st.one_of(st.none(), st.integers(0, 16)),
            min_acceptance_rate=st.one_of(st.none(), st.floats(0, 1)),
        ),
    ),
    vllm=st.one_of(
        st.none(),
        st.builds(
            wire.VLLMConfig,
            gpu_memory_utilization=st.one_of(st.none(), st.floats(0, 1)),
            hf_overrides=st.one_of(
                st.none(),
                st.dictionaries(
                    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,6}", fullmatch=True),
                    hf_values,
                    max_size=3,
                ),
            ),
        ),
    ),
    llamacpp=st.one_of(
        st.none(),
        st.builds(
            wire.LlamaCppConfig, reasoning_budget=st.one_of(st.none(), st.integers(-1, 2**15))
        ),
    ),
)


async def _round_trip(url: str, request: wire.ConfigureRequest) -> list[str]:
    async with httpx.AsyncClient() as http:
        client = modelrunner.ModelRunnerClient(http, url)
        await client.unload(backend=None, models=[], unload_all=True)
        await client.configure("llama.cpp", request)
        (entry,) = await client.read_configs(request.model)
        return wire.config_differences(request, entry, backend="llama.cpp")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
def test_configure_round_trip_property(
    threaded_emulator: ModelRunnerEmulator, request: wire.ConfigureRequest
) -> None:
    assert asyncio.run(_round_trip(threaded_emulator.url, request)) == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(b"null", []), (b"", []), (b"[]", [])],
    ids=["go-nil-slice", "empty-body", "empty-list"],
)
async def test_an_empty_config_listing_in_any_form_is_no_configs(
    answer: bytes, expected: list[wire.ModelConfigEntry]
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=answer))
    async with httpx.AsyncClient(transport=transport) as http:
        client = modelrunner.ModelRunnerClient(http, "http://runner")
        assert await client.read_configs() == expected


@pytest.mark.parametrize(
    "answer",
    [b"<html>proxy error</html>", b'[{"Backend": "llama.cpp"}]', b'{"Backend": 1}'],
    ids=["not-json", "missing-fields", "not-a-list"],
)
async def test_a_malformed_config_listing_is_a_runner_error_not_a_crash(answer: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=answer))
    async with httpx.AsyncClient(transport=transport) as http:
        client = modelrunner.ModelRunnerClient(http, "http://runner")
        with pytest.raises(modelrunner.RunnerServerError, match="unexpected GET"):
            await client.read_configs()


async def test_a_runner_busy_with_pulls_never_starves_another_of_connections() -> None:
    # One pool for every runner let a few runners' pull streams take all connections, and the
    # others' requests failed with PoolTimeout ("unreachable") at 1,500 runner pods.
    slow, quick = ModelRunnerEmulator(), ModelRunnerEmulator()
    slow.pull_line_delay = 0.2
    await slow.start("127.0.0.1", 0)
    await quick.start("127.0.0.1", 0)
    transport = modelrunner.PerRunnerTransport(limits_per_runner=2)
    http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=None))
    try:
        busy = modelrunner.ModelRunnerClient(http, slow.url)
        pulls = [asyncio.create_task(busy.pull(ref)) for ref in ("ai/qwen3:14B", "ai/smollm2")]
        await asyncio.sleep(0.1)  # both of the slow runner's connections now stream a pull
        started = time.monotonic()
        configs = await modelrunner.ModelRunnerClient(http, quick.url).read_configs()
        assert configs == [] and time.monotonic() - started < 1.0
        assert not any(pull.done() for pull in pulls)
        # A third request to the busy runner waits for its own connection, without timing out.
        assert await busy.read_configs() == []
        assert all(result.message for result in await asyncio.gather(*pulls))
    finally:
        await http.aclose()
        await slow.stop()
        await quick.stop()
