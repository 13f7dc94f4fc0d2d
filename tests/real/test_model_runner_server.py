"""The real model-runner server (upstream's server package at the pinned release, built here):
it starts the way a runner pod runs it, answers the routes the operator uses, and refuses bad
configurations with exactly the message the operator's own validation gives before any call.

No model and no llama-server are involved yet: these are the answers the real server gives
before a model is loaded, which is where the operator's client-side rules must match it.
"""

from __future__ import annotations

import httpx
import pytest

from dmr_operator.dmr import validation
from dmr_operator.testing import realpeers

# Bad runtime flags, one per rule of model-runner's validation (allow-list, a value that looks
# like a flag, a path), for the llama.cpp and vLLM allow-lists.
BAD_FLAGS = [
    ("llama.cpp", ["--model", "x"]),
    ("llama.cpp", ["--host=0.0.0.0"]),
    ("llama.cpp", ["--temp", "0.7", "--seed", "-1"]),
    ("llama.cpp", ["--temp=-x"]),
    ("llama.cpp", ["--grammar-file=/etc/passwd"]),
    ("vllm", ["--trust-remote-code"]),
    ("vllm", ["--max-model-len=4096", "--download-dir=/tmp"]),
]


def test_it_starts_as_a_pod_runs_it_and_reports_its_release(
    model_runner: realpeers.ModelRunnerProcess,
) -> None:
    with httpx.Client(base_url=model_runner.url, timeout=10) as http:
        assert http.get("/models").json() == []
        assert http.get("/engines/_configure").json() in ([], None)
        assert http.get("/version").json()["version"] == realpeers.MODEL_RUNNER_VERSION
        status = http.get("/engines/status")
        assert status.status_code == 200
        backends = status.json()
        assert "llama.cpp" in backends
        # Built without a vLLM binary, as the non-vLLM images are: says so per backend (M3).
        assert backends["vllm"].startswith("Not Installed")
    assert model_runner.process is not None and model_runner.process.poll() is None
    # Everything it wrote is under the pod's writable paths (home, store, working dir, tmp).
    assert (model_runner.work_dir / "models").is_dir()


@pytest.mark.parametrize(("backend", "flags"), BAD_FLAGS)
def test_bad_runtime_flags_are_refused_with_the_operators_own_message(
    model_runner: realpeers.ModelRunnerProcess, backend: str, flags: list[str]
) -> None:
    with pytest.raises(validation.RunnerValidationError) as ours:
        validation.validate_runtime_flags(backend, flags)
    with httpx.Client(base_url=model_runner.url, timeout=10) as http:
        answer = http.post(
            f"/engines/{backend}/_configure",
            json={"model": "ai/smollm2:135M-Q4_0", "runtime-flags": flags},
        )
    assert answer.status_code == 500
    assert answer.text.strip() == str(ours.value)
