"""GitOps health, judged by the tools' own code on the real control plane: Flux's kstatus
(built from sigs.k8s.io/cli-utils) and the chart's Argo CD health check (Lua 5.1), over a
DMRModel and an Agent through their lives: reported, progressing, Ready, spec changed and not
yet seen, failed for a reason a person must fix, deleted."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

from dmr_operator import constants
from dmr_operator.testing import cluster, gitops, gobuild
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

DMRMODELS = constants.DMRMODEL_PLURAL
AGENTS = constants.AGENT_PLURAL


@pytest.fixture(scope="session")
def kstatus_binary(
    live_progress: Callable[[str], None], piece_unavailable: Callable[[str], NoReturn]
) -> Path:
    try:
        return gitops.ensure_kstatus(progress=lambda m: live_progress(f"[kstatus] {m}"))
    except gobuild.BuildUnavailable as error:
        piece_unavailable(f"kstatus unavailable: {error}")


def verdicts(binary: Path, obj: Mapping[str, Any]) -> tuple[str, str]:
    """(Flux, Argo CD) on the object as the API server returned it."""
    return gitops.kstatus(binary, obj), gitops.argo_health(obj)["status"]


def reported(objects: cluster.CustomObjects, plural: str, name: str) -> dict[str, Any]:
    def observed() -> dict[str, Any] | None:
        found = objects.get(plural, name)
        return found if found and (found.get("status") or {}).get("observedGeneration") else None

    found = wait_for(observed, timeout=30, message=f"{plural}/{name} reported by the operator")
    assert found is not None
    return found


def test_a_dmrmodel_through_its_life(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    kstatus_binary: Path,
) -> None:
    (pod,) = cluster.gpu_runner_pool(api_client, node_simulator, namespace, 1)
    runner = emulators.of(namespace, pod)
    runner.pull_line_delay = 0.5  # a pull of about 2 s: long enough to be seen progressing

    objects.create(DMRMODELS, cluster.dmrmodel("qwen", {"model": "ai/qwen3:0.6B"}))
    pulling = reported(objects, DMRMODELS, "qwen")
    assert pulling["status"]["phase"] != "Ready"
    assert verdicts(kstatus_binary, pulling) == ("InProgress", "Progressing")

    ready = objects.wait_phase(DMRMODELS, "qwen", "Ready")
    assert verdicts(kstatus_binary, ready) == ("Current", "Healthy")

    # The object right after a spec change: generation 2, still observed 1.
    changed = objects.patch_spec(DMRMODELS, "qwen", {"contextSize": 4096})
    assert changed["metadata"]["generation"] == 2
    assert changed["status"]["observedGeneration"] == 1
    assert verdicts(kstatus_binary, changed) == ("InProgress", "Progressing")
    again = wait_for(
        lambda: (
            (o := objects.get(DMRMODELS, "qwen"))
            and o["status"].get("observedGeneration") == 2
            and o["status"].get("phase") == "Ready"
            and o
        ),
        timeout=30,
        message="generation 2 Ready",
    )
    assert verdicts(kstatus_binary, again) == ("Current", "Healthy")

    # The runner refuses the next configuration: no retry helps, a person must act.
    runner.configure_failure = "unsupported configuration"
    objects.patch_spec(DMRMODELS, "qwen", {"contextSize": 8192})
    failed = objects.wait_phase(DMRMODELS, "qwen", "Failed")
    assert verdicts(kstatus_binary, failed) == ("Failed", "Degraded")

    # A spec the code refuses (the CRD schema cannot tell a thinkingBudget word is unknown).
    objects.create(
        DMRMODELS, cluster.dmrmodel("bad", {"model": "ai/smollm2", "thinkingBudget": "x"})
    )
    invalid = objects.wait_phase(DMRMODELS, "bad", "Failed")
    assert verdicts(kstatus_binary, invalid) == ("Failed", "Degraded")

    # Deleted: the finalizer holds it while the operator unloads (a slow runner here).
    runner.configure_failure = None
    runner.latency = 1.0
    objects.delete(DMRMODELS, "qwen")
    terminating = wait_for(
        lambda: (
            (o := objects.get(DMRMODELS, "qwen")) and o["metadata"].get("deletionTimestamp") and o
        ),
        timeout=10,
        message="qwen terminating",
    )
    assert gitops.kstatus(kstatus_binary, terminating) == "Terminating"


def test_an_agent_through_its_life(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    kstatus_binary: Path,
) -> None:
    cluster.gpu_runner_pool(api_client, node_simulator, namespace, 1)
    node_simulator.add_node(f"{namespace}-cpu-0")
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    config = {
        "agents": {"root": {"model": "main", "instruction": "You help."}},
        "models": {"main": {"dmrModel": "small"}},
    }
    agent = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.AGENT_KIND,
        "metadata": {"name": "helper"},
        "spec": {"config": config},
    }
    objects.create(AGENTS, agent)
    ready = objects.wait_phase(AGENTS, "helper", "Ready", timeout=60)
    assert verdicts(kstatus_binary, ready) == ("Current", "Healthy")

    broken = {**config, "agents": {"root": {**config["agents"]["root"], "x-custom": 1}}}
    objects.patch_spec(AGENTS, "helper", {"config": broken})
    failed = wait_for(
        lambda: (
            (o := objects.get(AGENTS, "helper"))
            and o["status"].get("observedGeneration") == 2
            and any(c["type"] == "Stalled" for c in o["status"].get("conditions") or [])
            and o
        ),
        timeout=30,
        message="the broken config reported",
    )
    assert verdicts(kstatus_binary, failed) == ("Failed", "Degraded")
