"""A real local Kubernetes control plane: etcd + kube-apiserver (+ controller-manager, scheduler).

Role: give integration tests and the local sandbox a genuine API server on loopback ports, with an
admin kubeconfig, and tear it all down without leaving processes behind. Neighbours: ``nodesim``
plays kubelet for Node objects on this control plane; ``tests/integration/conftest.py`` wraps it in
fixtures; ``cli.py`` dispatches ``dmr-operator controlplane build|up`` to ``controlplane_command``.

Binaries (reference/control-plane.md): ``KUBEBUILDER_ASSETS`` if set, else a per-user cache, else a
build of Kubernetes 1.20.2 from Debian's source package with Go 1.15 from Debian bullseye (a newer
Go builds an apiserver that crashes on custom resources). etcd is Debian's ``etcd-server``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import os
import re
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

KUBERNETES_VERSION = "1.20.2"
CACHE_SUBDIR = f"dmr-operator/k8s-{KUBERNETES_VERSION}"
KUBE_COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ETCD_APT_PACKAGE = "etcd-server"
DEBIAN_MIRROR = os.environ.get("DMR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The Debian release whose source package is Kubernetes 1.20.2; the one still shipping Go 1.15.
KUBERNETES_SOURCE_SUITE = "bookworm"
GO_SUITE = "bullseye"
GO_PACKAGES = ("golang-1.15-go", "golang-1.15-src")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
ADMIN_USER = "dmr-admin"
STARTUP_TIMEOUT_SECONDS = 60.0
# kube-apiserver drains for several seconds after SIGTERM; nothing here needs that drain.
STOP_GRACE_SECONDS = 1.0
BUILD_HEARTBEAT_SECONDS = 30.0

Progress = Callable[[str], None]


class ControlPlaneUnavailable(RuntimeError):
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
    # envtest asset directories (KUBEBUILDER_ASSETS) ship only kube-apiserver and etcd.
    controller_manager: Path | None
    scheduler: Path | None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_SUBDIR


def _executable(path: Path) -> Path | None:
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _find_etcd(assets: Path | None) -> Path:
    in_assets = _executable(assets / "etcd") if assets is not None else None
    on_path = shutil.which("etcd")
    found = in_assets or (Path(on_path) if on_path else None)
    if found is None:
        raise ControlPlaneUnavailable(
            f"etcd not found on PATH: install the Debian package {ETCD_APT_PACKAGE} "
            f"(apt-get install {ETCD_APT_PACKAGE})"
        )
    return found


def _binaries_in(directory: Path, *, etcd: Path) -> Binaries | None:
    apiserver = _executable(directory / "kube-apiserver")
    if apiserver is None:
        return None
    return Binaries(
        apiserver=apiserver,
        etcd=etcd,
        controller_manager=_executable(directory / "kube-controller-manager"),
        scheduler=_executable(directory / "kube-scheduler"),
    )


def find_binaries() -> Binaries | None:
    """The binaries from ``KUBEBUILDER_ASSETS`` or the cache, or None when a build is needed."""
    assets_env = os.environ.get("KUBEBUILDER_ASSETS")
    if assets_env:
        assets = Path(assets_env)
        found = _binaries_in(assets, etcd=_find_etcd(assets))
        if found is None:
            raise ControlPlaneUnavailable(f"KUBEBUILDER_ASSETS={assets} has no kube-apiserver")
        return found
    cached = cache_dir()
    if all(_executable(cached / name) for name in KUBE_COMPONENTS):
        return _binaries_in(cached, etcd=_find_etcd(None))
    return None


def ensure_binaries(*, build: bool = True, progress: Progress = print_progress) -> Binaries:
    """Find the binaries or, when ``build`` allows it, build and cache them (minutes, once)."""
    found = find_binaries()
    if found is not None:
        return found
    etcd = _find_etcd(None)  # fail before a long build that could not be used anyway
    if not build:
        raise ControlPlaneUnavailable(
            f"no Kubernetes binaries in {cache_dir()}: run `dmr-operator controlplane build`"
        )
    build_binaries(destination=cache_dir(), progress=progress)
    built = _binaries_in(cache_dir(), etcd=etcd)
    if built is None:  # pragma: no cover - build_binaries guarantees the files
        raise ControlPlaneUnavailable(f"build finished but {cache_dir()} has no kube-apiserver")
    return built


# --------------------------------------------------------------------------------------------
# Building from Debian's source package


def _check_build_prerequisites() -> None:
    if not Path("/etc/debian_version").exists():
        raise ControlPlaneUnavailable(
            "not a Debian system: cannot build Kubernetes from Debian packages "
            "(set KUBEBUILDER_ASSETS to a directory with kube-apiserver and etcd)"
        )
    if os.geteuid() != 0:
        raise ControlPlaneUnavailable(
            "building the control plane needs root (apt-get): run "
            "`dmr-operator controlplane build` as root once, or set KUBEBUILDER_ASSETS"
        )
    if not Path(DEBIAN_KEYRING).exists():
        raise ControlPlaneUnavailable(
            f"{DEBIAN_KEYRING} missing: apt-get install debian-archive-keyring"
        )
    missing = [
        tool for tool in ("apt-get", "dpkg", "tar", "make", "rsync") if not shutil.which(tool)
    ]
    if missing:
        raise ControlPlaneUnavailable(
            f"tools missing for the control-plane build: {', '.join(missing)} "
            f"(apt-get install {' '.join(missing)})"
        )


class _BuildSession:
    """One build in a scratch directory: timed steps, a private apt configuration, logs."""

    def __init__(self, *, workspace: Path, progress: Progress) -> None:
        self.workspace = workspace
        self.progress = progress
        self.started = time.monotonic()
        self.log_path = workspace / "build.log"
        apt_root = workspace / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (apt_root / sub).mkdir(parents=True)
        sources = apt_root / "sources.list"
        # A private sources list and state: the machine's own apt configuration stays untouched.
        sources.write_text(
            f"deb-src [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {KUBERNETES_SOURCE_SUITE} main\n"
            f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {GO_SUITE} main\n"
        )
        self.apt_options = [
            "-q",
            "-o",
            f"Dir::Etc::SourceList={sources}",
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            f"Dir::State::Lists={apt_root / 'lists'}",
            "-o",
            f"Dir::Cache={apt_root / 'cache'}",
            "-o",
            "Dir::State::Status=/dev/null",
            # The scratch directory is private to root; apt's _apt sandbox user could not write it.
            "-o",
            "APT::Sandbox::User=root",
        ]

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.0f}s"

    @contextlib.contextmanager
    def step(self, number: int, total: int, title: str) -> Iterator[None]:
        self.progress(f"build step {number}/{total}: {title} (elapsed {self.elapsed()})")
        yield

    def run(self, argv: Sequence[str], *, cwd: Path | None = None) -> None:
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            completed = subprocess.run(
                argv,
                check=False,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if completed.returncode != 0:
            raise ControlPlaneUnavailable(
                f"`{' '.join(argv[:3])} ...` failed (exit {completed.returncode}): "
                f"{_last_line(self.log_path)} (log: {self.log_path})"
            )

    def apt_get(self, *args: str, cwd: Path | None = None) -> None:
        self.run(["apt-get", *self.apt_options, *args], cwd=cwd)

    def make(self, *, source: Path, env: dict[str, str]) -> None:
        """Run the Kubernetes make, reporting each build phase and a heartbeat while Go compiles."""
        # Targets of the current "Building go targets" group: Go compiles them together.
        current: list[str] = ["(starting)"]
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(BUILD_HEARTBEAT_SECONDS):
                building = ", ".join(current) or "the next step"
                self.progress(f"  still building {building} (elapsed {self.elapsed()})")

        argv = ["make", f"WHAT={' '.join(f'cmd/{name}' for name in KUBE_COMPONENTS)}"]
        make_log = self.workspace / "make.log"
        ticker = threading.Thread(
            target=heartbeat, name="controlplane-build-heartbeat", daemon=True
        )
        with make_log.open("w") as log:
            process = subprocess.Popen(
                argv,
                cwd=source,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            ticker.start()
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    if line.startswith("+++ "):
                        current.clear()
                    target = _make_target(line)
                    if target is not None:
                        current.append(target)
                        self.progress(f"  make: {target} (elapsed {self.elapsed()})")
                returncode = process.wait()
            finally:
                done.set()
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if returncode != 0:
            raise ControlPlaneUnavailable(
                f"make failed (exit {returncode}): {_last_line(make_log)} (log: {make_log})"
            )


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# Kubernetes' make prints "+++ [1121 21:31:34] Building go targets for linux/amd64:" and then
# the targets indented by four spaces: both tell where a several-minute build currently is.
_MAKE_TARGET_LINE = re.compile(r"^    (?:\./)?((?:vendor/|cmd/)\S+)\s*$")


def _make_target(line: str) -> str | None:
    matched = _MAKE_TARGET_LINE.match(line)
    return matched.group(1) if matched else None


def build_binaries(*, destination: Path, progress: Progress = print_progress) -> None:
    """Build kube-apiserver, kube-controller-manager and kube-scheduler into ``destination``.

    Everything happens in a scratch directory beside ``destination`` that is moved into place
    only when complete, so an interrupted build never leaves a half-filled cache.
    """
    _check_build_prerequisites()
    destination.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=".build-", dir=destination.parent))
    session = _BuildSession(workspace=workspace, progress=progress)
    progress(f"building Kubernetes {KUBERNETES_VERSION} (4-7 minutes on 2 cores) in {workspace}")
    total = 6
    downloads = workspace / "downloads"
    downloads.mkdir()
    goroot_unpacked = workspace / "go"
    source = workspace / "src"
    try:
        with session.step(1, total, f"apt-get update ({KUBERNETES_SOURCE_SUITE} src, {GO_SUITE})"):
            session.apt_get("update")
        with session.step(2, total, "apt-get source --download-only kubernetes (34 MB)"):
            session.apt_get("source", "--download-only", "kubernetes", cwd=downloads)
        with session.step(3, total, f"apt-get download {' '.join(GO_PACKAGES)} ({GO_SUITE})"):
            session.apt_get("download", *GO_PACKAGES, cwd=downloads)
        with session.step(4, total, "unpack Go 1.15 (dpkg -x)"):
            for deb in sorted(downloads.glob("golang-1.15-*.deb")):
                session.run(["dpkg", "-x", str(deb), str(goroot_unpacked)])
        with session.step(5, total, "unpack the kubernetes source"):
            tarballs = sorted(downloads.glob("kubernetes_*.orig.tar.*"))
            if not tarballs:
                raise ControlPlaneUnavailable(f"no kubernetes_*.orig.tar.* in {downloads}")
            source.mkdir()
            session.run(["tar", "-xf", str(tarballs[0]), "--strip-components=1", "-C", str(source)])
            # The Kubernetes 1.20 build scripts expect the tree at $GOPATH/src/k8s.io/kubernetes.
            gopath_link = source / ".go/src/k8s.io/kubernetes"
            gopath_link.parent.mkdir(parents=True)
            gopath_link.symlink_to("../../..")
        with session.step(6, total, "make (the long step)"):
            goroot = goroot_unpacked / "usr/lib/go-1.15"
            env = {
                **{key: value for key, value in os.environ.items() if not key.startswith("GO")},
                "GOROOT": str(goroot),
                "GOPATH": str(source / ".go"),
                "CGO_ENABLED": "0",
                "PATH": f"{goroot / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            }
            session.make(source=source, env=env)
        built = source / "_output/local/bin/linux/amd64"
        staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=destination.parent))
        for name in KUBE_COMPONENTS:
            shutil.copy2(built / name, staged / name)
        try:
            staged.rename(destination)
        except OSError:  # a concurrent build finished first: keep the cache it wrote
            shutil.rmtree(staged)
    except BaseException:
        progress(f"build failed after {session.elapsed()}; logs kept in {workspace}")
        raise
    progress(f"built in {session.elapsed()}; cached in {destination}")
    shutil.rmtree(workspace, ignore_errors=True)


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


def _stop_process(process: _Process, *, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop the process's whole group (each component runs in its own session) and reap it.

    SIGTERM, then SIGKILL after ``grace`` seconds; ``grace=0`` is a crash.
    """
    group = process.popen.pid
    if process.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            process.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            process.popen.wait()
    # Anything the component itself forked dies with the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 15) -> str:
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
                    f"log {process.log_path}:\n{_log_tail(process.log_path)}"
                )
            if check():
                return
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"{process.name}: no {what} within {self.startup_timeout:g}s; "
                    f"log {process.log_path}:\n{_log_tail(process.log_path)}"
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
                "--insecure-port=0",
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
                "--port=0",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self._binaries.scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--port=0",
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
