"""The runner pod specs the project ships, run with the real model-runner exactly as they say.

The chart's runner pool, the plain example pool and the operator's Sidecar-mode runner container
are rendered, and their model-runner container is started by ``testing.podsandbox`` as a kubelet
would start it: as the spec's UID (not the image's own user), in the spec's working directory,
with a read-only root where the spec asks, and the pod's volumes where the spec mounts them. The
real server must then pull the real model, load it into llama-server and answer a completion:
the runner sockets, logs, temporary files and the model store all land on volumes that UID can
write.

The control: the chart's previous pool spec (the image's /app as working directory, a UID
other than the image's user) fails to load the model in the same sandbox.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import agent_workload
from dmr_operator.testing import cluster, controlplane, helm, podsandbox, realpeers
from dmr_operator.testing.waiting import wait_for

CHART = Path(__file__).parents[2] / "charts" / "dmr-operator"
EXAMPLE_POOL = Path(__file__).parents[2] / "examples" / "00-pool.yaml"
TIMEOUT = httpx.Timeout(120, connect=5)


def chart_pool_pod_spec() -> dict[str, Any]:
    rendered = helm.render_chart(CHART, values={"runnerPools": [{"name": "default"}]})
    (pool,) = [o for o in rendered if o["kind"] == "StatefulSet"]
    spec: dict[str, Any] = pool["spec"]["template"]["spec"]
    return spec


def example_pool_pod_spec() -> dict[str, Any]:
    (pool,) = [o for o in cluster.load_manifests(EXAMPLE_POOL) if o["kind"] == "StatefulSet"]
    spec: dict[str, Any] = pool["spec"]["template"]["spec"]
    return spec


def sidecar_pod_spec() -> dict[str, Any]:
    spec = agent_api.AgentSpec.model_validate(
        {
            "config": {"agents": {"root": {"model": "dmr/ai/gemma3:270m"}}},
            "runner": {"mode": "Sidecar"},
        }
    )
    workload = agent_workload.render_workload(
        agent="helper", namespace="team", spec=spec, config_hash="0" * 16, models_ready=True
    )
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def previous_chart_pool_pod_spec() -> dict[str, Any]:
    """The pool spec before it was fixed: no workingDir (the image's /app), /tmp an emptyDir."""
    spec = chart_pool_pod_spec()
    (runner,) = spec["containers"]
    del runner["workingDir"]
    runner["securityContext"]["readOnlyRootFilesystem"] = False
    runner["volumeMounts"] = [
        {"name": "models", "mountPath": "/models"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    spec["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    return spec


@dataclasses.dataclass(frozen=True)
class RunningSpec:
    sandbox: podsandbox.ContainerSandbox
    url: str


@pytest.fixture
def sandboxed_runner(
    real_peers: realpeers.RealPeers,
    tmp_path: Path,
    piece_unavailable: Callable[[str], NoReturn],
) -> Iterator[Callable[..., RunningSpec]]:
    reason = podsandbox.unavailable()
    if reason:
        piece_unavailable(f"cannot run pod specs here: {reason}")
    started: list[podsandbox.ContainerSandbox] = []

    def start(pod_spec: dict[str, Any], *, registry_env: bool = True) -> RunningSpec:
        port = controlplane.free_port()
        registry = real_peers.registry.runner_environment() if registry_env else {}
        sandbox = podsandbox.ContainerSandbox(
            pod_spec=pod_spec,
            container="model-runner",
            image=realpeers.model_runner_image(real_peers),
            root=tmp_path / f"pod-{len(started)}",
            # The host's network is shared: the one change to the spec is its port.
            env_overrides={"MODEL_RUNNER_PORT": str(port), **registry},
        ).start()
        started.append(sandbox)
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: not sandbox.running() or _answers(url),
            timeout=60,
            message=f"model-runner in the sandbox on {url}",
        )
        assert sandbox.running(), sandbox.log_tail()
        return RunningSpec(sandbox, url)

    yield start
    for sandbox in started:
        sandbox.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/models", timeout=2).is_success
    except httpx.HTTPError:
        return False


def load_and_complete(url: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        pulled = http.post("/models/create", json={"from": realpeers.GEMMA})
        assert pulled.status_code == 200 and "success" in pulled.text, pulled.text
        configured = http.post(
            "/engines/llama.cpp/_configure",
            json={"model": realpeers.GEMMA, "context-size": 1024},
        )
        assert configured.status_code == 202, configured.text
        return http.post(
            "/engines/v1/chat/completions",
            json={
                "model": realpeers.GEMMA,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
        )


@pytest.mark.parametrize(
    "render",
    [chart_pool_pod_spec, example_pool_pod_spec, sidecar_pod_spec],
    ids=["chart-pool", "example-pool", "sidecar"],
)
def test_the_shipped_runner_spec_loads_and_serves_a_model(
    sandboxed_runner: Callable[..., RunningSpec],
    render: Callable[[], dict[str, Any]],
) -> None:
    running = sandboxed_runner(render())
    sandbox = running.sandbox
    assert sandbox.uid != realpeers.IMAGE_USER  # the point: not the image's own user

    answer = load_and_complete(running.url)

    assert answer.status_code == 200, f"{answer.text}\n{sandbox.log_tail()}"
    assert answer.json()["usage"]["completion_tokens"] > 0
    # What it wrote is on the pod's volumes, owned by the pod's user.
    store = sandbox.volume_dir("models")
    assert any(store.rglob("*")), "the model store volume is empty"
    assert {path.stat().st_uid for path in store.rglob("*") if path.is_file()} == {sandbox.uid}


def test_the_previous_chart_spec_could_not_load_a_model(
    sandboxed_runner: Callable[..., RunningSpec],
) -> None:
    running = sandboxed_runner(previous_chart_pool_pod_spec())
    answer = load_and_complete(running.url)
    # llama-server cannot create its socket in /app, which only the image's user may write.
    assert answer.status_code >= 500, answer.text
    assert "couldn't bind HTTP server socket" in running.sandbox.log_path.read_text()


def test_the_charts_registry_settings_reach_the_real_server(
    sandboxed_runner: Callable[..., RunningSpec], real_peers: realpeers.RealPeers
) -> None:
    """runnerPools[].registry: the loopback registry as the default, plain HTTP. The spec
    alone (no variables added by the test) must make the real server pull from it."""
    rendered = helm.render_chart(
        CHART,
        values={
            "runnerPools": [
                {
                    "name": "default",
                    "registry": {"default": real_peers.registry.address, "insecure": True},
                }
            ]
        },
    )
    (pool,) = [o for o in rendered if o["kind"] == "StatefulSet"]
    running = sandboxed_runner(pool["spec"]["template"]["spec"], registry_env=False)
    answer = load_and_complete(running.url)
    assert answer.status_code == 200, f"{answer.text}\n{running.sandbox.log_tail()}"
