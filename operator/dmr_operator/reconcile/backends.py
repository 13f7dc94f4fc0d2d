"""Whether a runner can run a backend, judged from its ``GET /engines/status``. Pure.

model-runner's images differ in the engines they carry (real-peers.md M3): ``latest``,
``latest-cuda`` and ``latest-rocm`` run llama.cpp (diffusers is installed on first use);
``latest-vllm-cuda`` adds vLLM; ``latest-sglang-cuda`` SGLang; MLX is macOS only. A model whose
backend the image lacks is still *configured* (the runner only stores the settings) and fails
only when loaded, so the operator asks first. Each backend reports ``Running[: details]``,
``Installing[: details]``, ``Not Installed[: why]`` or ``Error: why``; right after the process
starts, every one says a bare ``Not Installed`` until its install check has run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

RUNNING: Final = "Running"
INSTALLING: Final = "Installing"
NOT_INSTALLED: Final = "Not Installed"
# Installed by the runner itself on first use: a bare "Not Installed" is not a refusal.
ON_DEMAND: Final = frozenset({"diffusers"})

_ADVICE: Final[Mapping[str, str]] = {
    "vllm": "use a vLLM image (docker/model-runner:latest-vllm-cuda; chart: runnerPools[].engine: "
    "vllm) or a GGUF model on llama.cpp",
    "sglang": "use docker/model-runner:latest-sglang-cuda, or vLLM / llama.cpp",
    "mlx": "MLX runs only on Apple Silicon: use llama.cpp (GGUF) or vLLM (safetensors)",
    "llama.cpp": "use a docker/model-runner image with llama.cpp (latest, latest-cuda, "
    "latest-rocm)",
    "diffusers": "use a docker/model-runner image with diffusers (latest, latest-cuda)",
}

Verdict = Literal["available", "starting", "unavailable"]


@dataclass(frozen=True)
class BackendCheck:
    verdict: Verdict
    status: str | None  # what the runner said about the backend (None: not listed)

    @property
    def available(self) -> bool:
        return self.verdict == "available"


def check_backend(backend: str, statuses: Mapping[str, str]) -> BackendCheck:
    """The verdict on ``backend`` from a runner's ``/engines/status`` answer."""
    status = statuses.get(backend)
    if status is None:
        # An image built without the backend (e.g. -tags=novllm) does not list it.
        return BackendCheck("unavailable", None)
    kind = status.split(":", 1)[0].strip()
    if kind == RUNNING:
        return BackendCheck("available", status)
    if kind == INSTALLING or (status == NOT_INSTALLED and _still_starting(statuses)):
        return BackendCheck("starting", status)
    if status == NOT_INSTALLED and backend in ON_DEMAND:
        return BackendCheck("available", status)
    return BackendCheck("unavailable", status)


def _still_starting(statuses: Mapping[str, str]) -> bool:
    """Every backend still at its initial bare "Not Installed": no install check has run."""
    return bool(statuses) and all(value == NOT_INSTALLED for value in statuses.values())


def unavailable_message(
    backend: str, check: BackendCheck, *, runner: str, image: str | None
) -> str:
    """``BackendUnavailable``'s message: the backend, the image, what it said, what to use."""
    said = f"it reports {check.status!r}" if check.status else "it does not list it"
    where = f"runner {runner} (image {image})" if image else f"runner {runner}"
    advice = _ADVICE.get(backend, "use an image that has it")
    return f"backend {backend} is not available on {where}: {said}; {advice}"
