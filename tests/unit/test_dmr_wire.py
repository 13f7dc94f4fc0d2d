"""Wire models: exact aliases, omission of absent values, validate_for, the read-back comparison."""

from __future__ import annotations

import pytest

from dmr_operator.dmr import wire
from dmr_operator.dmr.validation import RunnerValidationError


def full_request(**overrides: object) -> wire.ConfigureRequest:
    fields: dict[str, object] = {
        "model": "ai/qwen3",
        "mode": "completion",
        "context_size": 8192,
        "runtime_flags": ["--temp", "0.7"],
        "keep_alive": "30m",
        "speculative": wire.SpeculativeConfig(draft_model="ai/qwen3:0.6B", num_tokens=8),
        "vllm": wire.VLLMConfig(
            gpu_memory_utilization=0.8, hf_overrides={"rope_scaling": {"type": "yarn"}, "n": None}
        ),
        "llamacpp": wire.LlamaCppConfig(reasoning_budget=0),
    }
    fields.update(overrides)
    return wire.ConfigureRequest.model_validate(fields)


def test_to_wire_uses_model_runner_spellings() -> None:
    assert full_request().to_wire() == {
        "model": "ai/qwen3",
        "context-size": 8192,
        "runtime-flags": ["--temp", "0.7"],
        "speculative": {"draft_model": "ai/qwen3:0.6B", "num_tokens": 8},
        "keep_alive": "30m",
        "vllm": {
            "gpu-memory-utilization": 0.8,
            # A null inside the overrides is a value, not an absent field.
            "hf-overrides": {"rope_scaling": {"type": "yarn"}, "n": None},
        },
        "llamacpp": {"reasoning-budget": 0},
        "mode": "completion",
    }


def test_absent_fields_are_omitted_never_null() -> None:
    assert wire.ConfigureRequest(model="ai/qwen3").to_wire() == {"model": "ai/qwen3"}
    raw = wire.ConfigureRequest(model="m", raw_runtime_flags="--threads 4").to_wire()
    assert raw == {"model": "m", "raw-runtime-flags": "--threads 4"}


def test_parses_from_wire_aliases() -> None:
    request = wire.ConfigureRequest.model_validate(full_request().to_wire())
    assert request == full_request()


def test_validate_for_runs_every_rule() -> None:
    full_request().validate_for("llama.cpp")
    cases = [
        (full_request(mode="chat"), "llama.cpp", 'unknown backend mode: "chat"'),
        (
            full_request(keep_alive="1d"),
            "llama.cpp",
            'invalid keep_alive duration "1d": time: unknown unit "d" in duration "1d"',
        ),
        (full_request(), "vllm", 'runtime flag "--temp" is not allowed for backend "vllm"'),
        (full_request(), "llama", "backend not found"),
        (
            full_request(raw_runtime_flags="--threads 2"),
            "llama.cpp",
            "cannot set both runtime-flags and raw-runtime-flags; pick one",
        ),
        (
            full_request(runtime_flags=None, raw_runtime_flags="--x 'open"),
            "llama.cpp",
            "invalid runtime flags: invalid command line string",
        ),
        (
            full_request(vllm=wire.VLLMConfig(gpu_memory_utilization=2)),
            "llama.cpp",
            "gpu-memory-utilization must be between 0.0 and 1.0, got 2.000000",
        ),
        (
            full_request(vllm=wire.VLLMConfig(hf_overrides={"a-b": 1})),
            "llama.cpp",
            'invalid hf_overrides key "a-b": must contain only alphanumeric characters and '
            "underscores, and start with a letter or underscore",
        ),
        (
            full_request(context_size=2**31),
            "llama.cpp",
            "context-size 2147483648 does not fit in int32",
        ),
    ]
    for request, backend, message in cases:
        with pytest.raises(RunnerValidationError) as caught:
            request.validate_for(backend)
        assert str(caught.value) == message


def test_effective_mode() -> None:
    assert wire.ConfigureRequest(model="m").effective_mode() == "completion"
    embedding = wire.ConfigureRequest(model="m", runtime_flags=["--embeddings"])
    assert embedding.effective_mode() == "embedding"
    raw = wire.ConfigureRequest(model="m", raw_runtime_flags="--embeddings")
    assert raw.effective_mode() == "embedding"


def test_stored_config_is_what_the_runner_echoes() -> None:
    request = full_request(
        runtime_flags=None,
        raw_runtime_flags="--temp 0.7 --top-k 40",
        speculative=wire.SpeculativeConfig(draft_model="", num_tokens=0),
        vllm=wire.VLLMConfig(hf_overrides={}),
    )
    assert request.stored_config().to_wire() == {
        "context-size": 8192,
        "runtime-flags": ["--temp", "0.7", "--top-k", "40"],
        "speculative": {},
        "keep_alive": "30m0s",
        "vllm": {},
        "llamacpp": {"reasoning-budget": 0},
    }


def entry_for(request: wire.ConfigureRequest, **config: object) -> wire.ModelConfigEntry:
    wire_config = request.stored_config().to_wire()
    wire_config.update(config)
    return wire.ModelConfigEntry.model_validate(
        {
            "Backend": "llama.cpp",
            "Model": "docker.io/ai/qwen3:latest",
            "ModelID": "sha256:" + "a" * 64,
            "Mode": request.effective_mode(),
            "Config": wire_config,
        }
    )


def test_config_differences_empty_for_the_echo() -> None:
    request = full_request(runtime_flags=None, raw_runtime_flags="--temp 0.7")
    assert wire.config_differences(request, entry_for(request), backend="llama.cpp") == []
    bare = wire.ConfigureRequest(model="ai/qwen3", vllm=wire.VLLMConfig(hf_overrides={}))
    assert wire.config_differences(bare, entry_for(bare)) == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"context-size": 4096}, "context-size"),
        ({"keep_alive": "5m0s"}, "keep_alive"),
        ({"runtime-flags": ["--temp", "0.8"]}, "runtime-flags"),
        ({"speculative": {"draft_model": "ai/qwen3:0.6B", "num_tokens": 4}}, "speculative"),
        (
            {"vllm": {"gpu-memory-utilization": 0.8, "hf-overrides": {"rope_scaling": {}}}},
            "vllm.hf-overrides",
        ),
        (
            {"vllm": {"hf-overrides": {"rope_scaling": {"type": "yarn"}, "n": None}}},
            "vllm.gpu-memory-utilization",
        ),
        ({"llamacpp": {}}, "llamacpp.reasoning-budget"),
    ],
)
def test_config_differences_name_the_field(config: dict[str, object], field: str) -> None:
    request = full_request()
    differences = wire.config_differences(request, entry_for(request, **config))
    assert [difference.split(":")[0] for difference in differences] == [field]


def test_config_differences_checks_mode_and_backend() -> None:
    request = full_request(mode="embedding")
    entry = entry_for(full_request())
    assert wire.config_differences(request, entry, backend="vllm") == [
        "backend: want 'vllm', runner has 'llama.cpp'",
        "mode: want 'embedding', runner has 'completion'",
    ]


def test_store_model_and_progress() -> None:
    model = wire.StoreModel.model_validate(
        {
            "id": "sha256:" + "c" * 64,
            "tags": ["docker.io/ai/qwen3:latest"],
            "created": 1,
            "config": {"format": "gguf", "size": "4.68 GiB", "context_size": 40960, "gguf": {}},
        }
    )
    assert model.has_reference("qwen3") and not model.has_reference("ai/qwen3:14B")
    assert wire.digest_of(model) == "sha256:" + "c" * 64
    assert model.config.format == "gguf" and model.config.context_size == 40960

    tracker = wire.PullProgressTracker()
    line = {"type": "progress", "message": "", "total": 200, "mode": "pull"}
    first = wire.PullProgress.model_validate(
        {**line, "layer": {"id": "a", "size": 100, "current": 50}}
    )
    assert first.layer_percent == 50.0
    assert tracker.update(first) == 25.0
    second = wire.PullProgress.model_validate(
        {**line, "layer": {"id": "b", "size": 100, "current": 100}}
    )
    assert tracker.update(second) == 75.0
    success = wire.PullProgress.model_validate({"type": "success", "message": "ok"})
    assert tracker.update(success) == 100.0
    assert success.layer.id is None and success.layer_percent is None
