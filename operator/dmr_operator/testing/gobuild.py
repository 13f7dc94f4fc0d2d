"""Build Go programs from the project's own small build modules, cached, with progress.

Role: the real peers of the test bed (the Kubernetes control plane today) are built from their
published Go modules through the ordinary ``go`` command, never from a copied tree. Each peer has
a build module of ours under ``gobuild/<name>/`` (a ``go.mod``/``go.sum`` pinning the upstream
release, and ``cmd/<program>/main.go`` files that call the upstream command constructors). This
module turns one of them into binaries in a per-user cache whose directory name carries a
fingerprint of the build module, so editing a pin builds anew and an unchanged one costs nothing.

Neighbours: ``controlplane`` and ``realpeers`` describe their builds with a :class:`GoBuild`
and call :func:`ensure_built`; nothing here knows what the programs are.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUILD_MODULES = Path(__file__).parent / "gobuild"
HEARTBEAT_SECONDS = 30.0
CACHE_ROOT_SUBDIR = "dmr-operator"

Progress = Callable[[str], None]


class BuildUnavailable(RuntimeError):
    """A build cannot be done on this machine; ``str()`` names the missing piece in one line."""


def print_progress(message: str) -> None:
    print(f"[gobuild] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GoBuild:
    """One build module and what it produces.

    ``name`` prefixes the cache directory (``kubernetes-1.37.2-<fingerprint>``); ``module`` is
    a directory under ``gobuild/`` (an absolute path works too: tests build throwaway modules);
    ``programs`` are its ``cmd/<program>`` directories, each giving a binary of that name.
    """

    name: str
    module: str
    programs: tuple[str, ...]
    minimum_go: tuple[int, int]
    ldflags: str = "-s -w"
    cgo: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    about: str = ""  # shown when the build starts, e.g. "about 15 minutes on 2 cores"

    @property
    def module_dir(self) -> Path:
        return BUILD_MODULES / self.module

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(f"./cmd/{program}" for program in self.programs)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_ROOT_SUBDIR


def fingerprint(build: GoBuild) -> str:
    """A short hash of everything that decides the binaries: the build module and the flags."""
    digest = hashlib.sha256()
    flags = (build.programs, build.ldflags, build.cgo, sorted(build.env.items()))
    digest.update(f"{flags}\0".encode())
    for path in sorted(p for p in build.module_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(build.module_dir)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cache_dir(build: GoBuild) -> Path:
    return cache_root() / f"{build.name}-{fingerprint(build)}"


def executable(path: Path) -> Path | None:
    return path if path.is_file() and os.access(path, os.X_OK) else None


def cached_binaries(build: GoBuild) -> dict[str, Path] | None:
    """The built programs by name when the cache holds every one of them, else None."""
    directory = cache_dir(build)
    found = {name: executable(directory / name) for name in build.programs}
    if all(found.values()):
        return {name: path for name, path in found.items() if path is not None}
    return None


def ensure_built(build: GoBuild, *, progress: Progress = print_progress) -> dict[str, Path]:
    """The cached programs, building them first when the cache lacks any (minutes, once)."""
    cached = cached_binaries(build)
    if cached is not None:
        return cached
    build_into(build, cache_dir(build), progress=progress)
    built = cached_binaries(build)
    if built is None:  # pragma: no cover - build_into guarantees the files
        raise BuildUnavailable(f"build of {build.name} finished without its programs")
    return built


# --------------------------------------------------------------------------------------------
# The go command


_GO_VERSION = re.compile(r"go(\d+)\.(\d+)")


def go_command() -> str:
    found = shutil.which("go")
    if found is None:
        raise BuildUnavailable(
            "go not found on PATH: the test bed's peers are built from Go modules "
            "(install Go >= 1.26, or set KUBEBUILDER_ASSETS to ready-made control-plane binaries)"
        )
    return found


def go_version(go: str) -> tuple[int, int]:
    completed = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, check=False, timeout=60
    )
    matched = _GO_VERSION.match(completed.stdout.strip())
    if completed.returncode != 0 or matched is None:
        raise BuildUnavailable(f"`{go} env GOVERSION` failed: {completed.stderr.strip()}")
    return int(matched.group(1)), int(matched.group(2))


def _build_env(build: GoBuild) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CGO_ENABLED": "1" if build.cgo else "0",
            # The build module lives inside the project's git tree: no VCS stamp wanted.
            "GOFLAGS": "-buildvcs=false -mod=readonly",
            # The machine's own Go, unless the caller asks for a toolchain (GOTOOLCHAIN set).
            "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "local"),
        }
    )
    env.update(build.env)
    return env


class LoggedStep:
    """A long subprocess whose output goes to a log, with a heartbeat saying how far it got."""

    def __init__(self, *, log_path: Path, progress: Progress, started: float) -> None:
        self.log_path = log_path
        self.progress = progress
        self.started = started

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}m{seconds % 60:02d}s"

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        describe: Callable[[], str],
        on_line: Callable[[str], None] = lambda line: None,
    ) -> None:
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT_SECONDS):
                self.progress(f"  {describe()} (elapsed {self.elapsed()})")

        ticker = threading.Thread(target=heartbeat, name="gobuild-heartbeat", daemon=True)
        output: list[str] = []
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
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
                    output.append(line.rstrip("\n"))
                    on_line(output[-1])
                returncode = process.wait()
            finally:
                done.set()
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if returncode != 0:
            raise BuildUnavailable(
                f"`{' '.join(argv[:3])} ...` failed (exit {returncode}): "
                f"{first_error(output)} (log: {self.log_path})"
            )


_GO_COMPILE_ERROR = re.compile(r"\.go:\d+(:\d+)?: ")


def first_error(output: Sequence[str]) -> str:
    """The line a person needs from a failed go command: a compile error (file:line), else a
    ``go:`` or error line (a module that cannot be downloaded is named there), else the last."""
    lines = [line.strip() for line in output if line.strip()]
    in_order_of_use: tuple[Callable[[str], bool], ...] = (
        lambda line: _GO_COMPILE_ERROR.search(line) is not None,
        lambda line: line.startswith("go: ") and not line.startswith("go: downloading"),
        lambda line: "error" in line.lower(),
    )
    for wanted in in_order_of_use:
        found = next((line for line in lines if wanted(line)), None)
        if found is not None:
            return found
    return lines[-1] if lines else "no output"


def build_into(build: GoBuild, destination: Path, *, progress: Progress = print_progress) -> None:
    """Download the modules and compile every program into ``destination``.

    The binaries are written to a scratch directory beside ``destination`` and moved into place
    only when all are there, so an interrupted build never leaves a half-filled cache.
    """
    go = go_command()
    have = go_version(go)
    if have < build.minimum_go:
        raise BuildUnavailable(
            f"{build.name} needs Go >= {build.minimum_go[0]}.{build.minimum_go[1]}, "
            f"found go{have[0]}.{have[1]} at {go} (or export GOTOOLCHAIN=go1.27.3 for a newer one)"
        )
    if not (build.module_dir / "go.mod").is_file():
        raise BuildUnavailable(f"build module missing: {build.module_dir / 'go.mod'}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".build-{build.name}-", dir=destination.parent))
    started = time.monotonic()
    step = LoggedStep(log_path=workspace / "build.log", progress=progress, started=started)
    env = _build_env(build)
    cwd = build.module_dir
    progress(f"building {build.name} from Go modules {build.about}".rstrip())
    progress(f"  log: {step.log_path}")
    staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=destination.parent))
    try:
        progress("step 1/3: go mod download (the first run fetches the modules)")
        step.run(
            [go, "mod", "download"],
            cwd=cwd,
            env=env,
            describe=lambda: "still downloading modules",
        )
        progress(f"step 2/3: go list (what will be compiled) (elapsed {step.elapsed()})")
        packages = _count_packages(go, build, env)
        compiled: list[str] = []
        progress(
            f"step 3/3: go build {', '.join(build.programs)} "
            f"({packages} packages; cached ones are not compiled again)"
        )
        step.run(
            [
                go,
                "build",
                "-v",
                "-trimpath",
                f"-ldflags={build.ldflags}",
                "-o",
                f"{staged}{os.sep}",
                *build.packages,
            ],
            cwd=cwd,
            env=env,
            describe=lambda: (
                f"compiled {len(compiled)}/{packages} packages, now at "
                f"{compiled[-1] if compiled else '(linking or cached)'}"
            ),
            on_line=lambda line: compiled.append(line) if _is_package_line(line) else None,
        )
        staged.chmod(0o755)  # mkdtemp makes it private; the cache is for every user
        missing = [name for name in build.programs if executable(staged / name) is None]
        if missing:
            raise BuildUnavailable(f"go build produced no {', '.join(missing)} in {staged}")
        try:
            staged.rename(destination)
        except OSError:  # a concurrent build finished first: keep the cache it wrote
            shutil.rmtree(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        progress(f"build of {build.name} failed after {step.elapsed()}; log: {step.log_path}")
        raise
    progress(f"built {build.name} in {step.elapsed()}; cached in {destination}")
    shutil.rmtree(workspace, ignore_errors=True)


def _count_packages(go: str, build: GoBuild, env: Mapping[str, str]) -> int:
    completed = subprocess.run(
        [go, "list", "-deps", *build.packages],
        cwd=build.module_dir,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if completed.returncode != 0:
        raise BuildUnavailable(f"go list failed: {completed.stderr.strip().splitlines()[:1]}")
    return len(completed.stdout.split())


def _is_package_line(line: str) -> bool:
    """``go build -v`` prints each package it compiles as a bare import path."""
    return bool(line) and " " not in line and not line.startswith(("go:", "#"))
