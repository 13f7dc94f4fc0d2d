"""The backend verdicts from /engines/status answers the real images give (reconcile.backends)."""

from __future__ import annotations

import pytest

from dmr_operator.reconcile import backends
from dmr_operator.testing.emulator import IMAGE_BACKEND_STATUS

STARTING = dict.fromkeys(("diffusers", "llama.cpp", "mlx", "sglang", "vllm"), "Not Installed")


@pytest.mark.parametrize(
    ("image", "backend", "verdict"),
    [
        ("latest", "llama.cpp", "available"),
        ("latest", "vllm", "unavailable"),
        ("latest", "mlx", "unavailable"),
        ("latest", "diffusers", "available"),  # installed by the runner on first use
        ("latest-vllm-cuda", "vllm", "available"),
        ("latest-sglang-cuda", "vllm", "unavailable"),  # not even listed
        ("latest-sglang-cuda", "sglang", "available"),
    ],
)
def test_verdicts_per_image(image: str, backend: str, verdict: str) -> None:
    assert backends.check_backend(backend, IMAGE_BACKEND_STATUS[image]).verdict == verdict


def test_a_runner_that_has_not_checked_its_backends_yet_is_starting() -> None:
    for backend in STARTING:
        assert backends.check_backend(backend, STARTING).verdict == "starting"
    installing = {**IMAGE_BACKEND_STATUS["latest"], "vllm": "Installing: downloading vllm"}
    assert backends.check_backend("vllm", installing).verdict == "starting"
    broken = {**IMAGE_BACKEND_STATUS["latest"], "llama.cpp": "Error: failed to install"}
    assert backends.check_backend("llama.cpp", broken).verdict == "unavailable"


def test_the_message_names_backend_image_status_and_what_to_use() -> None:
    check = backends.check_backend("vllm", IMAGE_BACKEND_STATUS["latest"])
    message = backends.unavailable_message(
        "vllm", check, runner="pool-default-0", image="docker/model-runner:latest"
    )
    assert message == (
        "backend vllm is not available on runner pool-default-0 (image "
        "docker/model-runner:latest): it reports 'Not Installed: binary not found'; use a vLLM "
        "image (docker/model-runner:latest-vllm-cuda; chart: runnerPools[].engine: vllm) or a GGUF "
        "model on llama.cpp"
    )
    missing = backends.check_backend("vllm", IMAGE_BACKEND_STATUS["latest-sglang-cuda"])
    assert "it does not list it" in backends.unavailable_message(
        "vllm", missing, runner="r", image=None
    )
