"""End to end on a kind cluster, for people with Docker (opt-in: ``pytest --e2e``).

Builds the operator image from the Dockerfile, creates a kind cluster from kind-config.yaml (or
reuses one named by ``DMR_E2E_CLUSTER``), loads the image, installs the chart rendered by Helm's
own code with a CPU runner pool that tolerates the GPU-like worker's taint, applies a small
DMRModel and waits for it to be Ready on real model-runner pods (pulls ai/smollm2 from Docker
Hub: needs internet). Nothing here can run on a machine without Docker; it skips there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("DMR_E2E_CLUSTER", "dmr-e2e")
IMAGE = "dmr-operator:e2e"
NAMESPACE = "dmr-system"

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker") and shutil.which("kind") and shutil.which("kubectl")),
    reason="needs docker, kind and kubectl",
)


def run(*argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[str]:
    existing = run("kind", "get", "clusters").split()
    created = CLUSTER not in existing
    if created:
        run(
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            str(ROOT / "kind-config.yaml"),
        )
    run("docker", "build", "-t", IMAGE, str(ROOT))
    run("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)
    yield f"kind-{CLUSTER}"
    if created and not os.environ.get("DMR_E2E_KEEP"):
        run("kind", "delete", "cluster", "--name", CLUSTER)


def test_chart_install_and_a_model_ready_on_real_model_runner(kind_cluster: str) -> None:
    from dmr_operator.testing import helm

    values = {
        "image": {"repository": "dmr-operator", "tag": "e2e", "pullPolicy": "Never"},
        "runnerPools": [
            {
                "name": "default",
                "accelerator": "cpu",
                "replicas": 1,
                "storage": {"size": "5Gi"},
                "tolerations": [
                    {
                        "key": "nvidia.com/gpu",
                        "operator": "Equal",
                        "value": "present",
                        "effect": "NoSchedule",
                    }
                ],
            }
        ],
    }
    objects = helm.sort_for_install(
        helm.render_chart(
            ROOT / "charts/dmr-operator", values=values, namespace=NAMESPACE, include_crds=True
        )
    )
    kubectl = ("kubectl", "--context", kind_cluster)
    run(*kubectl, "create", "namespace", NAMESPACE)
    manifest = yaml.safe_dump_all(objects)
    run(*kubectl, "apply", "--server-side", "-n", NAMESPACE, "-f", "-", stdin=manifest)
    model = {
        "apiVersion": "dmr.dev/v1alpha1",
        "kind": "DMRModel",
        "metadata": {"name": "smol", "namespace": NAMESPACE},
        "spec": {"model": "ai/smollm2", "contextSize": 2048, "keepAlive": "5m"},
    }
    run(*kubectl, "apply", "-f", "-", stdin=json.dumps(model))
    deadline = time.monotonic() + 900
    phase = None
    while time.monotonic() < deadline:
        found = json.loads(run(*kubectl, "get", "dmrm", "smol", "-n", NAMESPACE, "-o", "json"))
        phase = (found.get("status") or {}).get("phase")
        if phase == "Ready":
            assert found["status"]["effective"]["context-size"] == 2048
            return
        time.sleep(5)  # real pulls take minutes; polling every 5 s until the deadline
    pytest.fail(f"DMRModel not Ready in 15 minutes (phase {phase})")
