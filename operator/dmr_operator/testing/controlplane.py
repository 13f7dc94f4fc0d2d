"""A real local Kubernetes control plane: etcd + kube-apiserver (+ controller-manager, scheduler).

Role: give integration tests and the local sandbox a genuine API server on loopback ports, with an
admin kubeconfig, and tear it all down without leaving processes behind. Neighbours: ``nodesim``
plays kubelet for Node objects on this control plane; ``tests/integration/conftest.py`` wraps it in
fixtures; ``cli.py`` dispatches ``dmr-operator controlplane build|up`` to ``controlplane_command``.

Binaries: ``KUBEBUILDER_ASSETS`` if set (kube-apiserver and etcd at least, as envtest ships them),
else the per-user cache, else a build from Go modules (``gobuild``): Kubernetes 1.37.2's own
command constructors behind mains of ours in ``gobuild/controlplane``, etcd at the version that
release requires, and kubectl at the same version.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from dmr_operator.testing import gobuild

KUBERNETES_VERSION = "1.37.2"
_MAJOR, _MINOR = KUBERNETES_VERSION.split(".")[:2]
KUBE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# The control plane's build module (gobuild/controlplane): upstream commands at one release, plus
# etcd at the version that release requires, plus kubectl at the server's own version.
CONTROL_PLANE_BUILD = gobuild.GoBuild(
    name=f"kubernetes-{KUBERNETES_VERSION}",
    module="controlplane",
    programs=(*KUBE_COMPONENTS, "etcd", "kubectl"),
    minimum_go=(1, 26),
    # What Kubernetes' own build stamps, so /version and kubectl report the real release.
    ldflags=" ".join(
        [
            "-s -w",
            f"-X k8s.io/component-base/version.gitVersion=v{KUBERNETES_VERSION}",
            f"-X k8s.io/component-base/version.gitMajor={_MAJOR}",
            f"-X k8s.io/component-base/version.gitMinor={_MINOR}",
            "-X k8s.io/component-base/version.gitTreeState=clean",
        ]
    ),
    about="(about 7 minutes on 2 cores the first time, 610 MB of modules)",
)
# A /16 as clusters have (kubeadm's default is a /12): with placement every DMRModel has a
# Service, and a /24 ran out at 254 of them (bench/placement_scale.py). 10.0.0.1, the
# ``kubernetes`` Service, stays the first address (it is in the serving certificate).
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/16"
ADMIN_USER = "dmr-admin"
STARTUP_TIMEOUT_SECONDS = 60.0
# kube-apiserver drains for several seconds after SIGTERM; nothing here needs that drain.
STOP_GRACE_SECONDS = 1.0

Progress = Callable[[str], None]


class ControlPlaneUnavailable(gobuild.BuildUnavailable):
    """The control-plane binaries cannot be had on this machine; ``str()`` is a one-line reason."""


class ControlPlaneError(RuntimeError):
    """A control-plane process failed to start or to become ready."""


def print_progress(message: str) -> None:
    print(f"[controlplane] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Binaries: where they come from


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    etcd: Path
    # envtest asset directories (KUBEBUILDER_ASSETS) ship only kube-apiserver, etcd and kubectl.
    controller_manager: Path | None
    scheduler: Path | None
    kubectl: Path | None


def cache_dir() -> Path:
    return gobuild.cache_dir(CONTROL_PLANE_BUILD)


def _binaries_in(directory: Path) -> Binaries | None:
    apiserver = gobuild.executable(directory / "kube-apiserver")
    etcd = gobuild.executable(directory / "etcd")
    if apiserver is None or etcd is None:
        return None
    return Binaries(
        apiserver=apiserver,
        etcd=etcd,
        controller_manager=gobuild.executable(directory / "kube-controller-manager"),
        scheduler=gobuild.executable(directory / "kube-scheduler"),
        kubectl=gobuild.executable(directory / "kubectl"),
    )


def find_binaries() -> Binaries | None:
    """The binaries from ``KUBEBUILDER_ASSETS`` or the cache, or None when a build is needed."""
    assets_env = os.environ.get("KUBEBUILDER_ASSETS")
    if assets_env:
        assets = Path(assets_env)
        found = _binaries_in(assets)
        if found is None:
            present = sorted(p.name for p in assets.iterdir()) if assets.is_dir() else []
            raise ControlPlaneUnavailable(
                f"KUBEBUILDER_ASSETS={assets} needs kube-apiserver and etcd "
                f"(it holds: {', '.join(present) or 'nothing'})"
            )
        return found
    cached = gobuild.cached_binaries(CONTROL_PLANE_BUILD)
    return None if cached is None else _binaries_in(cached["kube-apiserver"].parent)


def ensure_binaries(*, build: bool = True, progress: Progress = print_progress) -> Binaries:
    """Find the binaries or, when ``build`` allows it, build and cache them (minutes, once)."""
    found = find_binaries()
    if found is not None:
        return found
    if not build:
        raise ControlPlaneUnavailable(
            f"no Kubernetes binaries in {cache_dir()}: run `dmr-operator controlplane build`"
        )
    try:
        programs = gobuild.ensure_built(CONTROL_PLANE_BUILD, progress=progress)
    except gobuild.BuildUnavailable as error:
        raise ControlPlaneUnavailable(str(error)) from error
    built = _binaries_in(programs["kube-apiserver"].parent)
    if built is None:  # pragma: no cover - ensure_built guarantees the files
        raise ControlPlaneUnavailable(f"build finished but {cache_dir()} has no kube-apiserver")
    return built


# --------------------------------------------------------------------------------------------
# Running it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class StartStopContext:
    """``with process:`` starts it and stops it on the way out, for the test bed's processes
    (subclasses give ``start`` returning themselves, and ``stop``)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process_group(popen: subprocess.Popen[Any], *, grace: float) -> None:
    """Stop a process started in its own session, with its whole group, and reap it.

    SIGTERM, then SIGKILL after ``grace`` seconds; ``grace=0`` is a crash. Anything the process
    itself forked dies with the group.
    """
    group = popen.pid
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            popen.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _stop_process(process: _Process, *, grace: float = STOP_GRACE_SECONDS) -> None:
    stop_process_group(process.popen, grace=grace)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _openssl(*args: str, cwd: Path) -> None:
    completed = subprocess.run(
        ["openssl", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if completed.returncode != 0:
        raise ControlPlaneError(f"openssl {args[0]} failed: {completed.stderr.strip()}")


def _write_certificates(directory: Path) -> None:
    """A CA, an apiserver serving certificate for 127.0.0.1, and the service-account key pair.

    Clients verify TLS against this CA (no insecure-skip-tls-verify, whose warnings would turn
    into test errors); the service-account pair signs and verifies ServiceAccount tokens.
    Elliptic-curve keys because generating four RSA keys costs a second of every start.
    """
    if not shutil.which("openssl"):
        raise ControlPlaneUnavailable("openssl not found: apt-get install openssl")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "30",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=dmr-operator-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "serving.key", "-out", "serving.csr", "-subj", "/CN=kube-apiserver",
        cwd=directory,
    )  # fmt: skip
    (directory / "serving.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    )
    _openssl(
        "x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "30", "-extfile", "serving.ext", "-out", "serving.crt",
        cwd=directory,
    )  # fmt: skip
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=directory)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager and kube-scheduler with ``controllers``).

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Process logs go to
    ``work_dir``; it is deleted on a clean stop unless ``keep_work_dir``, and kept (path printed)
    when startup fails.
    """

    def __init__(
        self,
        *,
        controllers: bool = False,
        binaries: Binaries | None = None,
        work_dir: Path | None = None,
        keep_work_dir: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
        progress: Progress = print_progress,
    ) -> None:
        self.controllers = controllers
        self._binaries = binaries
        self._owns_work_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="dmr-controlplane-"))
        self._keep_work_dir = keep_work_dir
        self.startup_timeout = startup_timeout
        self._progress = progress
        self._processes: dict[str, _Process] = {}
        self.admin_token = secrets.token_urlsafe(32)
        self.apiserver_port = 0
        self._etcd_url = ""
        self._atexit_registered = False

    # -- public surface ---------------------------------------------------------------------

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    @property
    def ca_path(self) -> Path:
        return self.work_dir / "ca.crt"

    @property
    def pids(self) -> list[int]:
        """Process ids of every component currently running (tests check teardown with them)."""
        return [p.popen.pid for p in self._processes.values() if p.popen.poll() is None]

    def log_path(self, component: str) -> Path:
        return self.work_dir / f"{component}.log"

    def start(self) -> ControlPlane:
        binaries = self._binaries or ensure_binaries(progress=self._progress)
        if self.controllers and (binaries.controller_manager is None or binaries.scheduler is None):
            raise ControlPlaneUnavailable(
                "controllers=True needs kube-controller-manager and kube-scheduler beside "
                f"{binaries.apiserver}"
            )
        self._binaries = binaries
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self._atexit_registered:
            atexit.register(self.stop)  # a plain script that forgets stop() leaves nothing behind
            self._atexit_registered = True
        try:
            _write_certificates(self.work_dir)
            (self.work_dir / "tokens.csv").write_text(
                f"{self.admin_token},{ADMIN_USER},{ADMIN_USER},system:masters\n"
            )
            self._start_etcd()
            self.apiserver_port = free_port()
            self.kubeconfig_for_token(self.admin_token, self.kubeconfig_path, user=ADMIN_USER)
            self._start_apiserver()
            if self.controllers:
                self._start_controllers()
        except BaseException:
            self._progress(f"control plane failed to start; logs kept in {self.work_dir}")
            self._keep_work_dir = True
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (reverse start order: etcd last) and reap it."""
        for name in reversed(list(self._processes)):
            _stop_process(self._processes.pop(name))
        if self._owns_work_dir and not self._keep_work_dir and self.work_dir.exists():
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def restart_apiserver(self, *, graceful: bool = False) -> None:
        """Stop (by default: kill) and start kube-apiserver on the same port, keeping etcd."""
        _stop_process(
            self._processes.pop("kube-apiserver"), grace=STOP_GRACE_SECONDS if graceful else 0
        )
        self._start_apiserver()

    def kubeconfig_for_token(self, token: str, path: Path, *, user: str = "user") -> Path:
        """Write a kubeconfig for this server authenticating with ``token`` (e.g. a SA token)."""
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dmr-local",
                    "cluster": {"server": self.server_url, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "dmr-local", "context": {"cluster": "dmr-local", "user": user}}],
            "current-context": "dmr-local",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin user (loaded from the kubeconfig)."""
        import kubernetes

        return kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig_path)
        )

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._keep_work_dir = True
            self._progress(f"kept control-plane logs in {self.work_dir}")
        self.stop()

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str]) -> _Process:
        log_path = self.log_path(name)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown kills all it forks
            )
        process = _Process(name=name, popen=popen, log_path=log_path)
        self._processes[name] = process
        return process

    def _wait_ready(self, process: _Process, check: Callable[[], bool], *, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            returncode = process.popen.poll()
            if returncode is not None:
                raise ControlPlaneError(
                    f"{process.name} exited with {returncode} before {what}; "
                    f"log {process.log_path}:\n{log_tail(process.log_path)}"
                )
            if check():
                return
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"{process.name}: no {what} within {self.startup_timeout:g}s; "
                    f"log {process.log_path}:\n{log_tail(process.log_path)}"
                )
            time.sleep(0.1)

    def _start_etcd(self) -> None:
        assert self._binaries is not None
        client_port, peer_port = free_port(), free_port()
        self._etcd_url = f"http://127.0.0.1:{client_port}"
        process = self._spawn(
            "etcd",
            [
                str(self._binaries.etcd),
                f"--data-dir={self.work_dir / 'etcd-data'}",
                f"--listen-client-urls={self._etcd_url}",
                f"--advertise-client-urls={self._etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--log-level=warn",
            ],
        )
        self._wait_ready(process, lambda: self._http_ok(f"{self._etcd_url}/health"), what="health")

    def _start_apiserver(self) -> None:
        assert self._binaries is not None
        work = self.work_dir
        process = self._spawn(
            "kube-apiserver",
            [
                str(self._binaries.apiserver),
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                # Loopback on purpose: works on machines without any other interface; the
                # `kubernetes` Service endpoints (which may not be loopback) are then not managed.
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={work / 'serving.crt'}",
                f"--tls-private-key-file={work / 'serving.key'}",
                f"--token-auth-file={work / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={work / 'sa.pub'}",
                f"--service-account-signing-key-file={work / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        self._wait_ready(
            process,
            lambda: self._http_ok(f"{self.server_url}/readyz", token=self.admin_token),
            what="/readyz",
        )

    def _start_controllers(self) -> None:
        assert self._binaries is not None
        assert self._binaries.controller_manager is not None
        assert self._binaries.scheduler is not None
        kubeconfig = str(self.kubeconfig_path)
        self._spawn(
            "kube-controller-manager",
            [
                str(self._binaries.controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--service-account-private-key-file={self.work_dir / 'sa.key'}",
                f"--root-ca-file={self.ca_path}",
                # No kubelet heartbeats here: node lifecycle would taint every simulated node.
                "--controllers=*,-nodelifecycle",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self._binaries.scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        )
        # The serviceaccount controller creating `default` proves the controller-manager works;
        # pods cannot be created in a namespace before that account exists.
        self._wait_ready(
            self._processes["kube-controller-manager"],
            lambda: self._http_ok(
                f"{self.server_url}/api/v1/namespaces/default/serviceaccounts/default",
                token=self.admin_token,
            ),
            what="the default ServiceAccount",
        )

    def _http_ok(self, url: str, *, token: str | None = None) -> bool:
        request = urllib.request.Request(url)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return 200 <= int(response.status) < 300
        except (urllib.error.URLError, OSError):
            return False


# --------------------------------------------------------------------------------------------
# CLI: `dmr-operator controlplane build|up`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("build", help="find or build the binaries and print where they are")
    up = actions.add_parser("up", help="start a control plane and run until Ctrl-C")
    up.add_argument(
        "--no-controllers",
        action="store_true",
        help="start only etcd and kube-apiserver (no controller-manager, no scheduler)",
    )
    up.add_argument("--work-dir", type=Path, help="directory for certificates, data and logs")


def controlplane_command(args: argparse.Namespace) -> int:
    try:
        if args.action == "build":
            binaries = ensure_binaries()
            print(f"kube-apiserver: {binaries.apiserver}")
            print(f"kube-controller-manager: {binaries.controller_manager or 'not available'}")
            print(f"kube-scheduler: {binaries.scheduler or 'not available'}")
            print(f"etcd: {binaries.etcd}")
            print(f"kubectl: {binaries.kubectl or 'not available'}")
            return 0
        return _run_until_interrupted(
            ControlPlane(controllers=not args.no_controllers, work_dir=args.work_dir)
        )
    except ControlPlaneUnavailable as error:
        print(f"control plane unavailable: {error}", file=sys.stderr)
        return 2


def _run_until_interrupted(control_plane: ControlPlane) -> int:
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        started = time.monotonic()
        with control_plane:
            elapsed = time.monotonic() - started
            print(f"control plane up in {elapsed:.1f}s at {control_plane.server_url}")
            print(f"kubeconfig: {control_plane.kubeconfig_path}")
            print(f"export KUBECONFIG={control_plane.kubeconfig_path}")
            print("Ctrl-C stops it.", flush=True)
            stopping.wait()
            print("stopping ...", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
