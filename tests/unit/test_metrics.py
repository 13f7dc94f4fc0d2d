"""Operator metrics: bounded route labels, models by phase read at scrape time, runner calls."""

from __future__ import annotations

import httpx
import prometheus_client

from dmr_operator import metrics


def test_routes_do_not_carry_model_names() -> None:
    assert metrics.route_of("/engines/llama.cpp/_configure") == "/engines/{backend}/_configure"
    assert metrics.route_of("/models/ai/qwen3:14B") == "/models/{ref}"
    assert metrics.route_of("/models/create") == "/models/create"
    assert metrics.route_of("/engines/_configure") == "/engines/_configure"


def test_models_by_phase_come_from_the_controller_at_scrape_time() -> None:
    metrics.MODELS.source = lambda: {"Ready": 3, "Failed": 1}
    try:
        text = prometheus_client.generate_latest().decode()
    finally:
        metrics.MODELS.source = None
    assert 'dmr_operator_models{phase="Ready"} 3.0' in text
    assert 'dmr_operator_models{phase="Failed"} 1.0' in text


async def test_runner_responses_are_counted_by_route_and_code() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202 if request.method == "POST" else 200, request=request)

    counter = metrics.RUNNER_REQUESTS.labels(
        method="POST", route="/engines/{backend}/_configure", code="202"
    )
    before = counter._value.get()
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer),
        event_hooks={"response": [metrics.record_runner_response]},
    ) as client:
        await client.post("http://runner/engines/vllm/_configure", json={})
    assert counter._value.get() == before + 1
