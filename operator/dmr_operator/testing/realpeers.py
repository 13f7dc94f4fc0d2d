"""The real peers of the real tier, built from their published modules and run as plain processes.

Role: the emulator is the project's picture of model-runner; this module provides the real one.
``gobuild/model-runner`` is a build module of ours whose main calls upstream's ``server.Run`` at a
pinned release; :class:`ModelRunnerProcess` starts it on a loopback address the way a runner pod
runs it (its own working directory for the runner sockets, a model store, no telemetry), and stops
it without leaving processes behind. Neighbours: ``gobuild`` builds and caches it; tests under
``tests/real/`` use it. llama.cpp's ``llama-server`` and docker-agent are not here yet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from dmr_operator.testing import controlplane, gobuild
from dmr_operator.testing.waiting import wait_for

MODEL_RUNNER_VERSION = "v1.2.9"
MODEL_RUNNER_BUILD = gobuild.GoBuild(
    name=f"model-runner-{MODEL_RUNNER_VERSION}",
    module="model-runner",
    programs=("model-runner",),
    # The toolchain the go command may need to switch to (upstream's go.mod asks for 1.26.10).
    minimum_go=(1, 21),
    ldflags=f"-s -w -X main.version={MODEL_RUNNER_VERSION}",
    cgo=True,  # upstream builds its server with cgo (GPU and system probes)
    # model-runner v1.2.9 needs go >= 1.26.10; go1.27.3 is the toolchain served here.
    env={"GOTOOLCHAIN": "go1.27.3"},
    about="(about 1-2 minutes on 2 cores the first time)",
)
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 5.0


def ensure_model_runner(*, progress: gobuild.Progress = gobuild.print_progress) -> Path:
    """The built model-runner server, building it first when the cache lacks it."""
    return gobuild.ensure_built(MODEL_RUNNER_BUILD, progress=progress)["model-runner"]


class ModelRunnerProcess:
    """One real model-runner server on ``host:port``, as a runner pod's container runs it.

    ``work_dir`` holds what the pod's writable paths would: the working directory (model-runner
    creates its runner sockets relative to it), the model store (``MODELS_PATH``) and ``TMPDIR``.
    """

    def __init__(
        self,
        *,
        binary: Path,
        host: str = "127.0.0.1",
        port: int,
        work_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="dmr-model-runner-"))
        self.extra_env = env or {}
        self.log_path = self.work_dir / "model-runner.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        for sub in ("models", "tmp", "run"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.work_dir),
            "TMPDIR": str(self.work_dir / "tmp"),
            "MODELS_PATH": str(self.work_dir / "models"),
            # Upstream listens on ":PORT", every interface: two real runners on one machine
            # need two ports even on two loopback addresses.
            "MODEL_RUNNER_PORT": str(self.port),
            "DO_NOT_TRACK": "1",
            "DISABLE_SERVER_UPDATE": "1",
            **self.extra_env,
        }

    def start(self) -> ModelRunnerProcess:
        env = self.environment()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary)],
                cwd=self.work_dir / "run",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: self._died() or self._answers("/models"),
                timeout=STARTUP_TIMEOUT_SECONDS,
                message=f"model-runner on {self.url} to answer GET /models",
            )
            if self._died():
                raise RuntimeError(
                    f"model-runner exited with {self.process.returncode}; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:  # llama-server children die with the process group
            controlplane.stop_process_group(self.process, grace=STOP_GRACE_SECONDS)

    def log_tail(self, lines: int = 20) -> str:
        return controlplane.log_tail(self.log_path, lines)

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return 200 <= int(response.status) < 300
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> ModelRunnerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# CLI: `dmr-operator peers build`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("build", help="find or build the real peers and print where they are")


def peers_command(args: argparse.Namespace) -> int:
    try:
        print(f"model-runner {MODEL_RUNNER_VERSION}: {ensure_model_runner()}")
    except gobuild.BuildUnavailable as error:
        print(f"real peers unavailable: {error}", file=sys.stderr)
        return 2
    return 0
