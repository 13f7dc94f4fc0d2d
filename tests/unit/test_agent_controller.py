"""The pure half of the Agent controller: inputs from watched objects, the plan of one reconcile,
what is (not) written when, Events on transitions, and the work queue's timing rules."""

from __future__ import annotations

import asyncio
import copy
import itertools
from typing import Any

import pytest

from dmr_operator import constants
from dmr_operator.clients import kube as kube_client
from dmr_operator.controllers import agents
from dmr_operator.reconcile import agent_status, agent_workload
from dmr_operator.testing.waiting import wait_for_async

NOW = "2026-01-01T00:00:00Z"
ENDPOINT = "http://pool-default.team.svc:80/v1"


def dmrmodel(name: str, *, phase: str = "Ready", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "creationTimestamp": NOW},
        "spec": {"model": "ai/qwen3:0.6B", **spec},
        "status": {"phase": phase, "normalizedModel": "ai/qwen3:0.6B", "endpoint": ENDPOINT},
    }


def agent(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.AGENT_KIND,
        "metadata": {"name": "helper", "namespace": "team", "uid": "u-1", "generation": 3},
        "spec": {
            "config": {
                "agents": {"root": {"model": "main"}},
                "models": {"main": {"dmrModel": "qwen"}},
            },
            **spec,
        },
    }


def plan(body: dict[str, Any], *models: dict[str, Any], **kwargs: Any) -> agents.AgentPlan:
    return agents.plan_agent(
        agent=body,
        served=[agents.served_model(m) for m in models],
        pods=kwargs.get("pods", []),
        workloads=kwargs.get("workloads", {}),
        other_agents_endpoints=kwargs.get("others", {}),
        now=NOW,
    )


def test_served_model_takes_the_request_from_spec_and_readiness_from_status() -> None:
    served = agents.served_model(
        dmrmodel("qwen", contextSize=8192, thinkingBudget="low", runtimeFlags=["--embeddings"])
    )
    assert (served.name, served.model, served.endpoint) == ("qwen", "ai/qwen3:0.6B", ENDPOINT)
    assert (served.context_size, served.thinking_budget, served.mode) == (8192, 2048, "embedding")
    assert served.ready
    assert not agents.served_model(dmrmodel("qwen", phase="Configuring")).ready
    fresh = {"metadata": {"name": "new"}, "spec": {"model": "qwen3", "thinkingBudget": "huge"}}
    unobserved = agents.served_model(fresh)
    assert (unobserved.model, unobserved.thinking_budget, unobserved.mode) == (
        "ai/qwen3:latest",
        None,
        "completion",
    )


def test_pod_facts_carry_the_schedulers_reason() -> None:
    pending = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    }
    facts = agents.pod_facts(pending)
    assert facts == agent_status.PodFacts(
        name="p",
        phase="Pending",
        ready=False,
        unschedulable_message="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
    )
    running = {
        "metadata": {"name": "r"},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    }
    assert agents.pod_facts(running) == agent_status.PodFacts("r", "Running", True, None)


def test_pool_agent_waits_at_zero_replicas_then_scales() -> None:
    waiting = plan(agent(replicas=2), dmrmodel("qwen", phase="Pulling"))
    ready = plan(agent(replicas=2), dmrmodel("qwen"))
    assert (waiting.desired_replicas, ready.desired_replicas) == (0, 2)
    assert waiting.status["phase"] == "Pending"
    assert [c["kind"] for c in ready.children] == ["ConfigMap", "Deployment", "Service"]
    assert ready.sidecar_models == ()
    assert ready.endpoints == frozenset({ENDPOINT})
    assert ready.status["observedGeneration"] == 3
    # A DMRModel change is a new config hash on the pod template (and a new child hash).
    changed = plan(agent(replicas=2), dmrmodel("qwen", contextSize=4096))
    assert changed.status["configHash"] != ready.status["configHash"]
    assert changed.hashes[1] != ready.hashes[1] and changed.hashes[2] == ready.hashes[2]


def test_serving_pool_agent_stays_up_while_its_model_reconfigures() -> None:
    serving = {"Deployment": {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}}
    reconfiguring = plan(
        agent(replicas=2), dmrmodel("qwen", phase="Configuring"), workloads=serving
    )
    assert reconfiguring.desired_replicas == 2
    models_ready = next(c for c in reconfiguring.status["conditions"] if c["type"] == "ModelsReady")
    assert models_ready["status"] == "False"


def test_children_are_owned_labelled_and_hashed() -> None:
    result = plan(agent(), dmrmodel("qwen"))
    for child, digest in zip(result.children, result.hashes, strict=True):
        metadata = child["metadata"]
        assert metadata["ownerReferences"] == [
            {
                "apiVersion": constants.API_VERSION,
                "kind": constants.AGENT_KIND,
                "name": "helper",
                "uid": "u-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert metadata["labels"][constants.AGENT_LABEL] == "helper"
        assert agents.live_hash(child) == digest
    # Same inputs, same hashes: nothing to apply on the next pass.
    assert plan(agent(), dmrmodel("qwen")).hashes == result.hashes
    # A re-created Agent (new uid) owns new children: they are applied again.
    recreated = agent()
    recreated["metadata"]["uid"] = "u-2"
    assert set(plan(recreated, dmrmodel("qwen")).hashes).isdisjoint(result.hashes)


def test_live_child_without_our_hash_is_not_in_sync() -> None:
    assert agents.live_hash(None) is None
    assert agents.live_hash({"metadata": {"annotations": {"other": "x"}}}) is None


def test_sidecar_agent_names_its_models_and_applies_gpu_quantities_as_strings() -> None:
    body = agent(runner={"mode": "Sidecar", "gpus": {"count": 2}, "storage": {"size": "10Gi"}})
    result = plan(body, dmrmodel("qwen", phase="Pending"))
    assert result.sidecar_models == ("qwen",)
    assert result.sidecar_pool == agent_workload.sidecar_pool_name("helper")
    assert result.workload_kind == "StatefulSet"
    assert result.endpoints == frozenset()
    workload = result.children[1]
    (runner,) = workload["spec"]["template"]["spec"]["initContainers"]
    assert runner["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert runner["resources"]["requests"]["nvidia.com/gpu"] == "2"


def test_ready_replicas_come_from_the_workload_of_the_wanted_kind() -> None:
    deployment = {"status": {"readyReplicas": 1}}
    result = plan(agent(), dmrmodel("qwen"), workloads={"Deployment": deployment})
    assert (result.status["readyReplicas"], result.status["phase"]) == (1, "Ready")
    other_kind = plan(agent(), dmrmodel("qwen"), workloads={"StatefulSet": deployment})
    assert other_kind.status["readyReplicas"] == 0


def test_unload_hook_warning_names_the_agents_sharing_the_pool() -> None:
    body = agent()
    body["spec"]["config"]["agents"]["root"]["hooks"] = {
        "on_agent_switch": [{"type": "builtin", "command": "unload"}]
    }
    alone = plan(body, dmrmodel("qwen"), others={"elsewhere": frozenset({"http://x/v1"})})
    shared = plan(body, dmrmodel("qwen"), others={"writer": frozenset({ENDPOINT})})
    assert alone.status["warnings"] == []
    assert "Agent writer" in shared.status["warnings"][0]


def test_only_agents_with_an_unload_hook_depend_on_other_agents() -> None:
    # Only those are looked at again when another Agent's endpoints change (else N^2 plans).
    body = agent()
    assert not agent_status.depends_on_other_agents(body)
    body["spec"]["config"]["agents"]["root"]["hooks"] = {
        "on_agent_switch": [{"type": "builtin", "command": "unload"}]
    }
    assert agent_status.depends_on_other_agents(body)
    assert not agent_status.depends_on_other_agents({"spec": {"config": "not a mapping"}})


def test_invalid_spec_fails_without_children() -> None:
    body = agent(replicas=-1)
    result = plan(body, dmrmodel("qwen"))
    assert result.children == ()
    assert result.status["phase"] == "Failed"
    assert "spec.replicas" in result.status["conditions"][0]["message"]


def test_status_is_patched_only_when_it_changed() -> None:
    first = plan(agent(), dmrmodel("qwen")).status
    body = agent()
    body["status"] = first
    again = plan(body, dmrmodel("qwen")).status
    assert agents.status_patch(first, again) is None
    patch = agents.status_patch({**first, "obsolete": 1}, again)
    assert patch is not None and patch["obsolete"] is None


def test_events_on_transitions_only() -> None:
    waiting = plan(agent(), dmrmodel("qwen", phase="Pulling")).status
    body = agent()
    body["status"] = waiting
    ready = plan(body, dmrmodel("qwen"), workloads={"Deployment": {"status": {"readyReplicas": 1}}})
    reasons = [reason for _, reason, _ in agents.transition_events(waiting, ready.status)]
    assert reasons == ["ModelsReady", "Ready"]
    assert agents.transition_events(ready.status, ready.status) == []
    missing = plan(agent(), dmrmodel("other")).status
    events = agents.transition_events({}, missing)
    assert ("Warning", "DMRModelNotFound") in [(t, r) for t, r, _ in events]
    secret = agent(env=[{"name": "API_KEY", "value": "x"}])
    assert ("Warning", "SecretInline") in [
        (t, r) for t, r, _ in agents.transition_events({}, plan(secret, dmrmodel("qwen")).status)
    ]
    rolled = copy.deepcopy(ready.status)
    rolled["configHash"] = "another"
    assert [r for _, r, _ in agents.transition_events(ready.status, rolled)] == ["RollingOut"]


async def test_queue_coalesces_a_burst_into_one_run() -> None:
    seen: list[str] = []

    async def process(key: str) -> None:
        seen.append(key)

    queue = agents.WorkQueue(process, coalesce=0.05, backoff=(1.0, 5.0), parallel=2)
    queue.start()
    try:
        for _ in range(20):
            queue.add("team/a")
        queue.add("team/b")
        await wait_for_async(lambda: not queue.pending(), timeout=5, message="an idle queue")
        assert sorted(seen) == ["team/a", "team/b"]
    finally:
        await queue.stop()


async def test_queue_backs_off_on_api_errors_and_never_spins() -> None:
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def failing(key: str) -> None:
        attempts.append(loop.time())
        raise kube_client.KubeError(500, "apiserver says no")

    queue = agents.WorkQueue(failing, coalesce=0.0, backoff=(0.1, 0.2), parallel=1)
    queue.start()
    try:
        queue.add("team/a")

        def retried_with_events_meanwhile() -> bool:
            queue.add("team/a")  # events during the backoff do not cut it short
            return len(attempts) >= 4

        await wait_for_async(retried_with_events_meanwhile, timeout=5, interval=0.01)
    finally:
        await queue.stop()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.09 and all(gap >= 0.19 for gap in gaps[1:]), gaps


async def test_a_key_never_runs_twice_at_once() -> None:
    running = 0
    overlap = False
    runs = 0
    release = asyncio.Event()

    async def slow(key: str) -> None:
        nonlocal running, overlap, runs
        running += 1
        runs += 1
        overlap = overlap or running > 1
        await release.wait()
        running -= 1

    queue = agents.WorkQueue(slow, coalesce=0.0, backoff=(1.0, 1.0), parallel=4)
    queue.start()
    try:
        queue.add("team/a")
        await wait_for_async(lambda: runs == 1, timeout=5, message="the first run")
        queue.add("team/a")  # arrives while it runs: one more run afterwards
        await asyncio.sleep(0.05)
        assert runs == 1
        release.set()
        await wait_for_async(lambda: not queue.pending(), timeout=5, message="an idle queue")
        assert (runs, overlap) == (2, False)
    finally:
        await queue.stop()


@pytest.mark.parametrize("deleted", [False, True])
def test_foreign_edit_or_deletion_of_the_workload_forgets_what_was_applied(deleted: bool) -> None:
    controller = agents.AgentController(kube=None, dmrmodels=None)  # type: ignore[arg-type]
    controller.agents["team/helper"] = agents._AgentState(body=agent())
    state = controller.agents["team/helper"]
    state.applied[("Deployment", "helper")] = "h1"
    state.workload_generation = 2
    workload = {
        "kind": "Deployment",
        "metadata": {
            "name": "helper",
            "namespace": "team",
            "generation": 2,
            "labels": {constants.AGENT_LABEL: "helper"},
        },
    }
    controller.workload_changed(workload)  # our own apply's echo: still in sync
    assert state.applied[("Deployment", "helper")] == "h1"
    workload["metadata"]["generation"] = 3  # kubectl scale, or deletion
    controller.workload_changed(workload, deleted=deleted)
    assert ("Deployment", "helper") not in state.applied


def test_gpu_claim_template_comes_first_and_a_refusal_fails_config_valid() -> None:
    body = agent(
        runner={
            "mode": "Sidecar",
            "gpus": {"deviceClassName": "gpu.nvidia.com", "selectors": ["x"]},
        }
    )
    first = plan(body)
    assert [c["kind"] for c in first.children] == [
        "ResourceClaimTemplate",
        "ConfigMap",
        "Deployment",
        "Service",
    ]
    words = "selectors[0].cel.expression: Invalid value: 'x': compilation failed"
    refused = {first.hashes[0]: words}
    second = agents.plan_agent(
        agent=body,
        served=[],
        pods=[],
        workloads={},
        other_agents_endpoints={},
        now=NOW,
        refused=refused,
    )
    assert second.children == ()  # nothing rolled out from a request the apiserver refused
    valid = next(c for c in second.status["conditions"] if c["type"] == "ConfigValid")
    assert valid["status"] == "False"
    assert "spec.runner.gpus: the apiserver refused the GPU claim template" in valid["message"]
    assert "compilation failed" in valid["message"]
