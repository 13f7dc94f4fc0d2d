"""What ``testing.podsandbox`` takes from a pod spec (the script it runs is checked here; that it
runs the real model-runner as the spec says is tests/real/test_runner_pod_specs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmr_operator.testing import podsandbox

IMAGE = podsandbox.Image(
    files={"/app/server": Path("/bin/true")},
    entrypoint=("/app/server", "--flag"),
    workdir="/app",
    env={"HOME": "/home/app", "PORT": "1"},
    user=999,
    owned_dirs=("/app",),
)


def pod(**container: Any) -> dict[str, Any]:
    return {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 2000, "fsGroup": 3000},
        "containers": [{"name": "main", **container}],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }


def sandbox(spec: dict[str, Any], tmp_path: Path) -> podsandbox.ContainerSandbox:
    return podsandbox.ContainerSandbox(
        pod_spec=spec, container="main", image=IMAGE, root=tmp_path, env_overrides={"PORT": "3"}
    )


def test_user_groups_and_environment_follow_the_spec(tmp_path: Path) -> None:
    box = sandbox(pod(env=[{"name": "PORT", "value": "2"}, {"name": "X", "value": "y"}]), tmp_path)
    assert (box.uid, box.gid, box.fs_group) == (1000, 2000, 3000)
    # The image's ENV, then the container's env, then the caller's overrides.
    assert box.environment() == {"HOME": "/home/app", "PORT": "3", "X": "y"}
    script = box.script()
    assert "setpriv --reuid 1000 --regid 2000 --groups 2000,3000" in script
    assert "cd /app && exec /app/server --flag" in script
    assert 'remount,ro "$ROOT"' not in script  # the root stays writable unless asked


def test_container_security_wins_and_read_only_root_is_honoured(tmp_path: Path) -> None:
    spec = pod(
        securityContext={"runAsUser": 7, "readOnlyRootFilesystem": True},
        workingDir="/var/run/x",
        volumeMounts=[{"name": "data", "mountPath": "/tmp", "subPath": ".tmp"}],
    )
    box = sandbox(spec, tmp_path)
    assert (box.uid, box.gid) == (7, 2000)
    script = box.script()
    assert 'mount -o remount,ro "$ROOT"' in script
    assert "cd /var/run/x && exec" in script
    # Mount targets are resolved inside the container's root (the host's /var/run is a link).
    assert f'mount --bind {tmp_path}/volumes/data/.tmp "$(inside /tmp)"' in script


def test_the_image_user_runs_when_the_spec_names_none(tmp_path: Path) -> None:
    box = sandbox({"containers": [{"name": "main"}]}, tmp_path)
    assert (box.uid, box.gid, box.fs_group) == (999, 999, None)
