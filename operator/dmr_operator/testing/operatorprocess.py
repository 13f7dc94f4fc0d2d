"""The operator as a separate process, the way it runs in a cluster: for tests, benchmarks, sandbox.

A real process (not a thread in the test) so that tests can SIGKILL it mid-reconcile, count its
memory, and read its JSON log; its stdout/stderr go to a log file whose tail is shown on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dmr_operator.testing import controlplane
from dmr_operator.testing.waiting import wait_for


class OperatorProcess(controlplane.StartStopContext):
    """``dmr-operator run`` against a kubeconfig, started and stopped by the caller."""

    def __init__(
        self,
        *,
        kubeconfig: Path | str,
        namespaces: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        verify_interval: float = 60.0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = str(kubeconfig)
        self.namespaces = list(namespaces)
        self.extra_args = list(extra_args)
        self.verify_interval = verify_interval
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="dmr-operator-", suffix=".log")[1])
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "dmr_operator", "run", "--kubeconfig", self.kubeconfig]
        argv += ["--verify-interval", str(self.verify_interval), "--log-format", "json"]
        for namespace in self.namespaces:
            argv += ["--namespace", namespace]
        return argv + self.extra_args

    def start(self) -> OperatorProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        wait_for(
            lambda: self._started() or self._died(),
            timeout=60,
            message="the operator to start",
        )
        if self._died():
            raise RuntimeError(f"the operator exited at start:\n{self.log_tail()}")
        return self

    def _started(self) -> bool:
        log = self.log()
        return ("dmr-operator" in log and "started" in log) or self.standing_by()

    def standing_by(self) -> bool:
        """A replica waiting for the leader-election lease (it acts once it holds it)."""
        return "standing by" in self.log()

    def leading(self) -> bool:
        return "leading: holding lease" in self.log()

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, as a node failure or OOM would: no cleanup handlers run."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if the operator does not exit in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.process.poll() is None:
                self.kill()
        return self.process.returncode
