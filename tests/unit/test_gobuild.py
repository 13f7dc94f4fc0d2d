"""Building Go programs from a build module: cache, fingerprint, progress, and the errors a person
gets when a piece is missing (no go, an old go, a compile error). Uses the machine's real go on
throwaway modules that need only the standard library."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dmr_operator.testing import controlplane, gobuild

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed")


def _module(directory: Path, *, body: str = 'fmt.Println("hello from", os.Args[0])') -> Path:
    (directory / "cmd" / "hello").mkdir(parents=True)
    (directory / "go.mod").write_text("module example.test/hello\n\ngo 1.21\n")
    (directory / "cmd" / "hello" / "main.go").write_text(
        f'package main\n\nimport (\n\t"fmt"\n\t"os"\n)\n\nfunc main() {{ {body} }}\n'
    )
    return directory


def _build(module: Path) -> gobuild.GoBuild:
    return gobuild.GoBuild(
        name="hello-1", module=str(module), programs=("hello",), minimum_go=(1, 21)
    )


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_once_into_the_cache_with_progress(tmp_path: Path, private_cache: Path) -> None:
    build = _build(_module(tmp_path / "mod"))
    said: list[str] = []
    binaries = gobuild.ensure_built(build, progress=said.append)
    output = subprocess.run([binaries["hello"]], capture_output=True, text=True, check=True)
    assert output.stdout.startswith("hello from")
    assert binaries["hello"].parent == gobuild.cache_dir(build)
    assert binaries["hello"].parent.parent == private_cache / "dmr-operator"
    assert any(line.startswith("step 3/3: go build hello") for line in said)
    assert any(line.startswith("built hello-1 in ") for line in said)
    again: list[str] = []
    assert gobuild.ensure_built(build, progress=again.append) == binaries
    assert again == []  # cached: nothing built, nothing said
    # No scratch directories are left beside the cache.
    assert [p.name for p in (private_cache / "dmr-operator").iterdir()] == [
        gobuild.cache_dir(build).name
    ]


def test_the_cache_follows_the_build_module(tmp_path: Path) -> None:
    module = _module(tmp_path / "mod")
    before = gobuild.cache_dir(_build(module))
    (module / "cmd" / "hello" / "main.go").write_text(
        'package main\n\nfunc main() { println("changed") }\n'
    )
    assert gobuild.cache_dir(_build(module)) != before


def test_a_compile_error_names_the_file_and_fills_no_cache(tmp_path: Path) -> None:
    build = _build(_module(tmp_path / "mod", body="fmt.Println(os.Args); undefinedThing()"))
    with pytest.raises(gobuild.BuildUnavailable) as failed:
        gobuild.ensure_built(build, progress=lambda message: None)
    assert "main.go" in str(failed.value) and "undefinedThing" in str(failed.value)
    assert "\n" not in str(failed.value)
    assert gobuild.cached_binaries(build) is None
    # Only the build's log is kept (its path is in the message), no half-filled directory.
    (kept,) = gobuild.cache_root().iterdir()
    assert kept.name.startswith(".build-hello-1-") and str(kept) in str(failed.value)


def test_no_go_on_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(gobuild.BuildUnavailable, match="go not found on PATH"):
        gobuild.ensure_built(_build(_module(tmp_path / "mod")), progress=lambda message: None)


def test_a_go_older_than_the_module_needs_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "go"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho go1.20.3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(gobuild.BuildUnavailable) as old:
        gobuild.ensure_built(_build(_module(tmp_path / "mod")), progress=lambda message: None)
    assert "needs Go >= 1.21, found go1.20" in str(old.value)


def test_the_control_plane_module_pins_one_release_everywhere() -> None:
    """go.mod requires k8s.io/kubernetes at KUBERNETES_VERSION and replaces every staging module
    with the same release's v0.MINOR.PATCH (a stray pin would mix two releases)."""
    go_mod = (controlplane.CONTROL_PLANE_BUILD.module_dir / "go.mod").read_text()
    major, minor, patch = controlplane.KUBERNETES_VERSION.split(".")
    assert f"k8s.io/kubernetes v{controlplane.KUBERNETES_VERSION}" in go_mod
    replaces = [
        line.split() for line in go_mod.splitlines() if line.startswith("\t") and "=>" in line
    ]
    assert len(replaces) > 20
    for old, _, new, version in replaces:
        assert old == new and old.startswith("k8s.io/")
        assert version == f"v0.{minor}.{patch}", (old, version)
    assert major == "1"
