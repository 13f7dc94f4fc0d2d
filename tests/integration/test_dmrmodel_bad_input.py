"""Bad DMRModels: every one is rejected at admission with the field named, or marked InvalidSpec
with the reason in its status, and none of them makes the operator call a runner."""

from __future__ import annotations

from typing import Any

import kubernetes

from dmr_operator.testing import cluster
from dmr_operator.testing.waiting import wait_for

PLURAL = "dmrmodels"
OK = {"model": "ai/smollm2"}

# (name, spec, where it must fail: "admission" or "status", a fragment the message must contain)
CASES: list[tuple[str, Any, str, str]] = [
    ("no-model", {"contextSize": 1}, "admission", "spec.model"),
    ("model-space", {"model": "ai/qwen 3"}, "admission", "spec.model"),
    ("model-empty", {"model": ""}, "admission", "spec.model"),
    ("model-huge", {"model": "ai/" + "x" * 600}, "admission", "spec.model"),
    ("model-dotdot", {"model": "../../etc/passwd"}, "admission", "spec.model"),
    ("model-leading-dash", {"model": "-rf"}, "admission", "spec.model"),
    ("backend-unknown", {**OK, "backend": "tensorrt"}, "admission", "spec.backend"),
    ("mode-unknown", {**OK, "mode": "chat"}, "admission", "spec.mode"),
    ("ctx-string", {**OK, "contextSize": "big"}, "admission", "spec.contextSize"),
    ("ctx-negative", {**OK, "contextSize": -5}, "admission", "spec.contextSize"),
    ("ctx-overflow", {**OK, "contextSize": 2**31}, "admission", "spec.contextSize"),
    ("keepalive-number", {**OK, "keepAlive": 5}, "admission", "spec.keepAlive"),
    ("keepalive-days", {**OK, "keepAlive": "1d"}, "admission", "spec.keepAlive"),
    ("keepalive-word", {**OK, "keepAlive": "forever"}, "admission", "spec.keepAlive"),
    ("flag-path", {**OK, "runtimeFlags": ["--model=/etc/passwd"]}, "admission", "runtimeFlags"),
    ("flag-backslash", {**OK, "runtimeFlags": ["--grammar", "a\\b"]}, "admission", "runtimeFlags"),
    ("flags-string", {**OK, "runtimeFlags": "--temp 1"}, "admission", "spec.runtimeFlags"),
    ("flags-too-many", {**OK, "runtimeFlags": ["--temp"] * 65}, "admission", "spec.runtimeFlags"),
    (
        "raw-path",
        {**OK, "rawRuntimeFlags": "--chat-template-file /x"},
        "admission",
        "rawRuntimeFlags",
    ),
    ("draft-missing", {**OK, "speculative": {"numTokens": 4}}, "admission", "draftModel"),
    (
        "draft-tokens-0",
        {**OK, "speculative": {"draftModel": "ai/qwen3:0.6B", "numTokens": 0}},
        "admission",
        "numTokens",
    ),
    (
        "draft-rate",
        {**OK, "speculative": {"draftModel": "ai/qwen3:0.6B", "minAcceptanceRate": 1.5}},
        "admission",
        "minAcceptanceRate",
    ),
    (
        "gpu-util-high",
        {**OK, "vllm": {"gpuMemoryUtilization": 1.2}},
        "admission",
        "gpuMemoryUtilization",
    ),
    (
        "gpu-util-negative",
        {**OK, "vllm": {"gpuMemoryUtilization": -0.1}},
        "admission",
        "gpuMemoryUtilization",
    ),
    ("pull-policy", {**OK, "pullPolicy": "Sometimes"}, "admission", "spec.pullPolicy"),
    ("deletion-policy", {**OK, "deletionPolicy": "Forget"}, "admission", "spec.deletionPolicy"),
    ("busy-policy", {**OK, "busyPolicy": "Wait"}, "admission", "spec.busyPolicy"),
    ("url-file", {**OK, "runners": {"url": "file:///etc/passwd"}}, "admission", "runners.url"),
    ("url-space", {**OK, "runners": {"url": "http://a b/"}}, "admission", "runners.url"),
    (
        "selector-operator",
        {
            **OK,
            "runners": {"poolSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}},
        },
        "admission",
        "operator",
    ),
    ("budget-list", {**OK, "thinkingBudget": [1]}, "admission", "thinkingBudget"),
    ("spec-string", "everything", "admission", "spec"),
    # What a schema cannot say: checked in code before any HTTP call.
    # Rules across fields: the CRD's CEL rules refuse them at admission (the code checks them
    # too, for clusters and objects the apiserver did not check).
    (
        "flags-both",
        {**OK, "runtimeFlags": ["--temp", "1"], "rawRuntimeFlags": "--temp 1"},
        "admission",
        "runtimeFlags and rawRuntimeFlags are exclusive; pick one",
    ),
    (
        "speculative-on-vllm",
        {**OK, "backend": "vllm", "speculative": {"draftModel": "ai/qwen3:0.6B"}},
        "admission",
        "speculative decoding is a llama.cpp feature",
    ),
    (
        "placement-on-url",
        {**OK, "runners": {"url": "http://gpu-box:12434"}, "placement": {"replicas": 2}},
        "admission",
        "placement.replicas chooses pods of a pool",
    ),
    ("placement-zero", {**OK, "placement": {"replicas": 0}}, "admission", "placement.replicas"),
    (
        "diffusers-completion",
        {**OK, "backend": "diffusers", "mode": "completion"},
        "admission",
        "backend diffusers serves only mode image-generation",
    ),
    (
        "flag-not-allowed",
        {**OK, "backend": "llama.cpp", "runtimeFlags": ["--lora", "x"]},
        "status",
        'runtime flag "--lora" is not allowed for backend "llama.cpp"',
    ),
    (
        "flag-vllm-list",
        {**OK, "backend": "vllm", "runtimeFlags": ["--temp", "0.7"]},
        "status",
        '"--temp" is not allowed for backend "vllm"',
    ),
    (
        "flag-sglang",
        {**OK, "backend": "sglang", "runtimeFlags": ["--max-tokens", "1"]},
        "status",
        'not allowed for backend "sglang"',
    ),
    (
        "flag-negative-element",
        {**OK, "backend": "llama.cpp", "runtimeFlags": ["--seed", "-1"]},
        "status",
        'runtime flag "-1" is not allowed',
    ),
    (
        "flag-dash-value",
        {**OK, "backend": "llama.cpp", "runtimeFlags": ["--temp=-x"]},
        "status",
        "value cannot start with '-'",
    ),
    (
        "flag-injection",
        {**OK, "backend": "llama.cpp", "rawRuntimeFlags": "--temp 1 --host 0.0.0.0"},
        "status",
        '"--host" is not allowed',
    ),
    ("raw-unterminated", {**OK, "rawRuntimeFlags": "--temp 'x"}, "status", "rawRuntimeFlags"),
    (
        "hf-dotted-key",
        {**OK, "vllm": {"hfOverrides": {"a.b": 1}}},
        "status",
        'invalid hf_overrides key "a.b"',
    ),
    ("hf-dunder", {**OK, "vllm": {"hfOverrides": {"__import__": "os"}}}, "status", "__import__"),
    (
        "hf-nested-dunder",
        {**OK, "vllm": {"hfOverrides": {"rope": {"__class__": 1}}}},
        "status",
        "__class__",
    ),
    (
        "hf-nested-bad",
        {**OK, "vllm": {"hfOverrides": {"rope": {"type-x": 1}}}},
        "status",
        "nested key",
    ),
    ("ctx-zero", {**OK, "contextSize": 0}, "admission", "spec.contextSize: Invalid value"),
    ("budget-word", {**OK, "thinkingBudget": "extreme"}, "status", "spec.thinkingBudget"),
    (
        "vllm-on-llama",
        {**OK, "backend": "llama.cpp", "vllm": {"gpuMemoryUtilization": 0.5}},
        "admission",
        "vllm options need backend vllm",
    ),
    (
        "url-metadata",
        {**OK, "runners": {"url": "http://169.254.169.254/latest/meta-data"}},
        "status",
        "metadata",
    ),
    (
        "url-gce-metadata",
        {**OK, "runners": {"url": "http://metadata.google.internal/"}},
        "status",
        "metadata",
    ),
    (
        "url-link-local",
        {**OK, "runners": {"url": "http://169.254.10.10:12434"}},
        "status",
        "link-local",
    ),
    (
        "url-not-allowed",
        {**OK, "runners": {"url": "http://10.1.2.3:12434"}},
        "status",
        "not on the operator's allowed",
    ),
    (
        "url-credentials",
        {**OK, "runners": {"url": "http://admin:pw@gpu-box:12434"}},
        "status",
        "credentials",
    ),
    (
        "url-and-selector",
        {**OK, "runners": {"url": "http://gpu-box:1", "poolSelector": {}}},
        "admission",
        "url and poolSelector are exclusive; pick one",
    ),
    ("keepalive-overflow", {**OK, "keepAlive": "99999999999999h"}, "status", "spec.keepAlive"),
]


def test_bad_dmrmodels_are_refused_with_a_clear_message(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: Any,
) -> None:
    assert len(CASES) >= 50
    node_simulator.add_node(f"{namespace}-gpu-0", gpus=1)
    cluster.create_runner_pool(api_client, namespace=namespace, replicas=1, gpus=1)
    (pod,) = cluster.wait_for_runner_pods(api_client, namespace, "default", 1)
    objects = cluster.CustomObjects(api_client, namespace)
    expected_in_status = []
    for name, spec, where, fragment in CASES:
        try:
            objects.create(PLURAL, {**cluster.dmrmodel(name, {}), "spec": spec})
        except kubernetes.client.ApiException as error:
            assert where == "admission", (
                f"{name}: rejected at admission, expected {where}: {error.body}"
            )
            assert error.status == 422, name
            assert fragment in error.body, f"{name}: {fragment!r} not in {error.body}"
            continue
        assert where == "status", f"{name}: admitted, but the schema should have refused it"
        expected_in_status.append((name, fragment))

    for name, fragment in expected_in_status:

        def invalid(name: str = name) -> dict[str, Any] | None:
            status = objects.status(PLURAL, name)
            return status if status.get("phase") == "Failed" else None

        status = wait_for(invalid, timeout=15, message=f"{name} marked Failed")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "InvalidSpec", (name, ready)
        assert fragment in ready["message"], (name, fragment, ready["message"])

    # Nothing invalid reached the runner: it was never asked to pull or configure anything.
    emulator = emulators.of(namespace, pod)
    assert not [r for r in emulator.requests if r.method != "GET"]
    assert operator.process.poll() is None, "the operator crashed"
    assert "Traceback" not in operator.log()
