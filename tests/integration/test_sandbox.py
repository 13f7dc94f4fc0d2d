"""``dmr-operator sandbox`` as a person runs it: a subprocess with its own control plane.

Each run carries a marker in its environment, which every process it starts inherits; after the
sandbox exits, no process on the machine may still carry it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmr_operator.testing import controlplane
from dmr_operator.testing.waiting import wait_for

MARKER = "DMR_SANDBOX_TEST_RUN"
EXAMPLE_MODELS = ("qwen3-14b", "qwen3-vllm", "embeddinggemma")
EXAMPLE_AGENTS = ("assistant", "private-assistant")


@pytest.fixture(scope="module", autouse=True)
def binaries() -> None:
    try:
        controlplane.ensure_binaries(build=False)
    except controlplane.ControlPlaneUnavailable as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"control plane unavailable: {error}", pytrace=False)
        pytest.skip(f"control plane unavailable: {error}")


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER=marker``."""
    wanted = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted in environment:
            found.append(int(entry.name))
    return found


class Sandbox:
    """The command in a subprocess; stdout collected by a thread so it can be polled."""

    def __init__(self, *args: str, stderr_path: Path) -> None:
        self.marker = secrets.token_hex(8)
        # Progress goes to stderr, the table to stdout: kept apart so the table can be parsed.
        self.stderr_path = stderr_path
        with stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dmr_operator", "sandbox", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, MARKER: self.marker, "PYTHONUNBUFFERED": "1"},
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def report(self) -> str:
        return f"stdout:\n{self.output}\nstderr:\n{self.stderr_path.read_text()}"

    def wait(self, timeout: float) -> int:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"sandbox still running after {timeout}s\n{self.report()}"
            ) from None
        self._reader.join(timeout=5)
        return returncode

    def survivors(self) -> list[int]:
        return marked_processes(self.marker)

    def kill_survivors(self) -> None:
        for pid in self.survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run_sandbox(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    started: list[Sandbox] = []

    def run(*args: str) -> Sandbox:
        started.append(Sandbox(*args, stderr_path=tmp_path / f"stderr-{len(started)}.log"))
        return started[-1]

    yield run
    for sandbox in started:  # a failed test must not leave a control plane running
        if sandbox.process.poll() is None:
            sandbox.process.kill()
            sandbox.process.wait()
        sandbox.kill_survivors()


def test_sandbox_brings_every_example_to_ready_and_leaves_nothing_behind(
    run_sandbox: Callable[..., Sandbox],
) -> None:
    sandbox = run_sandbox("--exit-when-ready", "--timeout", "120")
    returncode = sandbox.wait(timeout=180)
    output = sandbox.output
    assert returncode == 0, sandbox.report()
    assert "everything is Ready" in output

    # The last table drawn, in kubectl's layout: every example Ready.
    drawn = output.split("everything is Ready")[0].splitlines()

    def last_row(name: str) -> list[str]:
        return next(line.split() for line in reversed(drawn) if line.startswith(f"{name} "))

    headers = {tuple(line.split()) for line in drawn if line.startswith("NAME ")}
    assert headers == {
        ("NAME", "POOL", "READY"),
        ("NAME", "MODEL", "BACKEND", "RUNNERS", "PHASE"),
        ("NAME", "MODELS", "REPLICAS", "PHASE"),
    }
    assert last_row("statefulset.apps/dmr-pool-default") == [
        "statefulset.apps/dmr-pool-default",
        "default",
        "1/1",
    ]
    for name in EXAMPLE_MODELS:
        runners, phase = last_row(f"dmrmodel.dmr.dev/{name}")[-2:]
        ready, total = runners.split("/")
        # The Sidecar Agent's own runner counts for its model too.
        assert phase == "Ready" and ready == total and int(total) >= 1, (name, runners)
    for name in EXAMPLE_AGENTS:
        assert last_row(f"agent.dmr.dev/{name}")[-1] == "Ready"
    assert last_row("dmrmodel.dmr.dev/qwen3-vllm")[1:3] == ["ai/qwen3-vllm:latest", "vllm"]

    assert "export KUBECONFIG=" in output and "kubectl get dmrm" in output
    assert sandbox.survivors() == []


def test_ctrl_c_stops_a_running_sandbox_cleanly(run_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = run_sandbox("--no-examples", "--namespace", "team-a", "--timeout", "60")
    wait_for(
        lambda: "Ctrl-C stops everything." in sandbox.output or sandbox.process.poll() is not None,
        timeout=90,
        message="the sandbox to be up",
    )
    assert sandbox.process.poll() is None, sandbox.report()
    assert "kubectl get dmrm,agents -n team-a" in sandbox.output
    running = sandbox.survivors()
    # This Python, etcd, kube-apiserver, controller-manager, scheduler and the operator.
    assert len(running) >= 6, running

    sandbox.process.send_signal(signal.SIGINT)
    assert sandbox.wait(timeout=30) == 0, sandbox.report()
    assert "stopped; nothing left running." in sandbox.output
    assert sandbox.survivors() == []
