"""DMRModel pure logic: parsing, validation, the exact _configure wire body, status, conflicts."""

from __future__ import annotations

from typing import Any

import pytest

from dmr_operator.reconcile import dmrmodel, runners
from dmr_operator.reconcile.dmrmodel import Placement, Reason


def body(
    spec: dict[str, Any], *, name: str = "m", created: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    return {
        "apiVersion": "dmr.dev/v1alpha1",
        "kind": "DMRModel",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 3,
            "creationTimestamp": created,
        },
        "spec": spec,
    }


def runner(name: str = "pool-0") -> runners.Runner:
    return runners.Runner(
        key=f"ns/{name}",
        namespace="ns",
        name=name,
        base_url="http://127.0.1.1:12434",
        ready=True,
        incarnation=("u", "127.0.1.1", "0"),
        node="gpu-1",
    )


EVERY_OPTION = {
    "model": "qwen3:14B",
    "mode": "completion",
    "contextSize": 32768,
    "keepAlive": "-1",
    "runtimeFlags": ["--temp", "0.7", "--seed=-1"],
    "thinkingBudget": "medium",
    "speculative": {"draftModel": "ai/qwen3:0.6B", "numTokens": 8, "minAcceptanceRate": 0.8},
}


def test_llamacpp_request_has_every_option_in_wire_spelling() -> None:
    target = dmrmodel.target_from_object(body(EVERY_OPTION))
    assert target.valid, target.problems
    assert dmrmodel.configure_request(target, "llama.cpp") == {
        "model": "ai/qwen3:14B",
        "mode": "completion",
        "context-size": 32768,
        "runtime-flags": ["--temp", "0.7", "--seed=-1"],
        "keep_alive": "-1",
        "speculative": {
            "draft_model": "ai/qwen3:0.6B",
            "num_tokens": 8,
            "min_acceptance_rate": 0.8,
        },
        "llamacpp": {"reasoning-budget": 8192},
    }


def test_vllm_request_carries_vllm_options_and_no_reasoning_budget() -> None:
    spec = {
        "model": "ai/qwen3-vllm",
        "backend": "vllm",
        "thinkingBudget": 1024,
        "vllm": {"gpuMemoryUtilization": 0.85, "hfOverrides": {"rope_scaling": {"type": "yarn"}}},
    }
    target = dmrmodel.target_from_object(body(spec))
    assert target.valid, target.problems
    assert dmrmodel.configure_request(target, "vllm") == {
        "model": "ai/qwen3-vllm:latest",
        "vllm": {
            "gpu-memory-utilization": 0.85,
            "hf-overrides": {"rope_scaling": {"type": "yarn"}},
        },
    }


def test_raw_flags_are_sent_as_one_string() -> None:
    target = dmrmodel.target_from_object(
        body({"model": "ai/smollm2", "rawRuntimeFlags": "--temp 0.5"})
    )
    assert dmrmodel.configure_request(target, "llama.cpp")["raw-runtime-flags"] == "--temp 0.5"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"model": "m", "runtimeFlags": ["--temp", "1"], "rawRuntimeFlags": "--temp 1"},
            "exclusive",
        ),
        (
            {"model": "m", "backend": "llama.cpp", "runtimeFlags": ["--model-draft", "x"]},
            "not allowed",
        ),
        (
            {"model": "m", "backend": "sglang", "runtimeFlags": ["--temp", "1"]},
            "not allowed for backend",
        ),
        (
            {"model": "m", "backend": "llama.cpp", "runtimeFlags": ["--seed", "-1"]},
            '"-1" is not allowed',
        ),
        (
            {"model": "m", "backend": "llama.cpp", "runtimeFlags": ["--temp=-x"]},
            "value cannot start",
        ),
        ({"model": "m", "rawRuntimeFlags": "--temp 'unterminated"}, "invalid"),
        ({"model": "m", "keepAlive": "1d"}, "keepAlive"),
        ({"model": "m", "thinkingBudget": "extreme"}, "thinkingBudget"),
        ({"model": "m", "contextSize": 0}, "spec.contextSize: 0"),
        (
            {"model": "m", "backend": "llama.cpp", "vllm": {"gpuMemoryUtilization": 0.5}},
            "need backend vllm",
        ),
        ({"model": "m", "vllm": {"hfOverrides": {"a.b": 1}}}, 'invalid hf_overrides key "a.b"'),
        ({"model": "m", "vllm": {"hfOverrides": {"ok": {"__x-y": 1}}}}, "nested key"),
        ({"model": "m", "runners": {"url": "http://169.254.169.254/"}}, "metadata address"),
        (
            {"model": "m", "runners": {"url": "http://10.0.0.5:12434"}},
            "not on the operator's allowed",
        ),
        ({"model": "m", "runners": {"url": "http://a:1", "poolSelector": {}}}, "exclusive"),
        ({"model": "bad model"}, "spec.model"),
        ({"model": "m", "speculative": {"numTokens": 3}}, "spec.speculative.draftModel"),
    ],
)
def test_invalid_specs_are_reported_not_raised(spec: dict[str, Any], problem: str) -> None:
    target = dmrmodel.target_from_object(body(spec))
    assert not target.valid
    assert any(problem in p for p in target.problems), target.problems


def test_allowed_external_runner_is_valid() -> None:
    target = dmrmodel.target_from_object(
        body({"model": "m", "runners": {"url": "http://gpu-box:12434"}}),
        allowed_runner_hosts=["gpu-box"],
    )
    assert target.valid, target.problems
    assert target.url == "http://gpu-box:12434"


def test_backend_defaults_follow_the_model_format() -> None:
    spec = dmrmodel.target_from_object(body({"model": "m"})).spec
    assert spec is not None
    assert dmrmodel.resolve_backend(spec, "gguf") == "llama.cpp"
    assert dmrmodel.resolve_backend(spec, "safetensors") == "vllm"
    assert dmrmodel.resolve_backend(spec, None) == "llama.cpp"


def test_status_ready_when_every_runner_configured() -> None:
    target = dmrmodel.target_from_object(body({"model": "ai/smollm2"}))
    placement = Placement(
        runner=runner(),
        state="Configured",
        reason=Reason.CONFIGURED,
        pulled=True,
        pulled_percent=100,
        configured_at="t0",
        digest="sha256:abc",
        backend="llama.cpp",
        config_hash="h",
        effective={"context-size": 4096},
    )
    status = dmrmodel.model_status(
        target,
        [placement],
        previous=None,
        endpoint="http://svc.ns.svc:80/v1",
        conflict_with=None,
        now="t1",
    )
    assert status["phase"] == "Ready"
    assert status["runnersSummary"] == "1/1"
    assert status["observedGeneration"] == 3
    assert status["effective"] == {"context-size": 4096}
    assert [c["status"] for c in status["conditions"]] == ["True", "True", "True"]
    assert status["runners"][0] == {
        "pod": "pool-0",
        "node": "gpu-1",
        "address": "127.0.1.1:12434",
        "state": "Configured",
        "pulledPercent": 100,
        "configuredAt": "t0",
        # No keepAlive in the spec: the runner's own default (no cloud environment, no GPU).
        "keepAlive": "5m0s",
    }
    # Recomputing later with nothing changed gives identical status: no write is needed.
    again = dmrmodel.model_status(
        target,
        [placement],
        previous=status,
        endpoint="http://svc.ns.svc:80/v1",
        conflict_with=None,
        now="t2",
    )
    assert again == status


def test_status_degraded_names_the_failing_runner() -> None:
    target = dmrmodel.target_from_object(body({"model": "ai/smollm2"}))
    good = Placement(runner=runner("a"), state="Configured", reason=Reason.CONFIGURED, pulled=True)
    bad = Placement(
        runner=runner("b"), state="Failed", reason=Reason.CONFIG_REJECTED, message="500: bad flag"
    )
    status = dmrmodel.model_status(
        target, [good, bad], previous=None, endpoint=None, conflict_with=None, now="t"
    )
    assert status["phase"] == "Degraded"
    ready = status["conditions"][2]
    assert (ready["status"], ready["reason"]) == ("False", "ConfigRejected")
    assert "b: 500: bad flag" in ready["message"]


def test_status_without_runners_is_pending_no_runners() -> None:
    target = dmrmodel.target_from_object(body({"model": "ai/smollm2"}))
    status = dmrmodel.model_status(
        target, [], previous=None, endpoint=None, conflict_with=None, now="t"
    )
    assert status["phase"] == "Pending"
    assert status["conditions"][2]["reason"] == "NoRunners"
    assert "dmr.dev/pool=default" in status["conditions"][2]["message"]


def test_pool_pods_the_scheduler_cannot_place_are_named() -> None:
    target = dmrmodel.target_from_object(body({"model": "ai/smollm2"}))
    words = "0/2 nodes are available: 2 cannot allocate all claims."
    waiting = [f"pod pool-{i} cannot be scheduled: {words}" for i in range(5)]
    status = dmrmodel.model_status(
        target, [], previous=None, endpoint=None, conflict_with=None, now="t", unschedulable=waiting
    )
    message = status["conditions"][2]["message"]
    assert message.startswith("no Ready model-runner pod")
    assert f"pod pool-0 cannot be scheduled: {words}" in message
    assert "pool-3" not in message and message.endswith("(and 2 more)")
    good = Placement(runner=runner("a"), state="Configured", reason=Reason.CONFIGURED, pulled=True)
    ready = dmrmodel.model_status(
        target,
        [good],
        previous=None,
        endpoint=None,
        conflict_with=None,
        now="t",
        unschedulable=waiting[:1],
    )
    assert ready["phase"] == "Ready"
    assert ready["conditions"][2]["message"] == f"configured on 1 runner(s); {waiting[0]}"


def test_invalid_spec_status() -> None:
    target = dmrmodel.target_from_object(body({"model": "m", "keepAlive": "1d"}))
    status = dmrmodel.model_status(
        target, [], previous=None, endpoint=None, conflict_with=None, now="t"
    )
    assert status["phase"] == "Failed"
    assert {c["reason"] for c in status["conditions"]} == {"InvalidSpec"}


def test_conflict_goes_to_the_newer_object() -> None:
    old = dmrmodel.target_from_object(
        body({"model": "qwen3"}, name="old", created="2026-01-01T00:00:00Z")
    )
    new = dmrmodel.target_from_object(
        body({"model": "ai/qwen3:latest"}, name="new", created="2026-01-02T00:00:00Z")
    )
    other_mode = dmrmodel.target_from_object(
        body({"model": "qwen3", "mode": "embedding"}, name="emb", created="2026-01-03T00:00:00Z")
    )
    elsewhere = dmrmodel.target_from_object(
        body({"model": "qwen3"}, name="far", created="2026-01-04T00:00:00Z")
    )
    claims = {
        t.key: (t, frozenset(r))
        for t, r in [(new, {"p0"}), (old, {"p0", "p1"}), (other_mode, {"p0"}), (elsewhere, {"p9"})]
    }
    assert dmrmodel.find_conflicts(claims) == {"ns/new": "old"}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"model": "ai/x", "backend": "vllm", "speculative": {"draftModel": "ai/y"}},
            "spec.speculative: speculative decoding is a llama.cpp feature, not vllm",
        ),
        (
            {"model": "ai/x", "backend": "diffusers", "mode": "completion"},
            "spec.mode: backend diffusers serves only mode image-generation",
        ),
    ],
)
def test_cross_field_rules_are_checked_in_code_too(spec: dict[str, Any], problem: str) -> None:
    # The CRD refuses these at admission; the code says the same for what it did not check.
    from dmr_operator.api.v1alpha1.dmrmodel import DMRModelSpec

    assert problem in dmrmodel.validate_spec(DMRModelSpec.model_validate(spec))
