"""model-runner's validation rules with its exact messages, and the Go semantics behind them."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmr_operator.dmr import golang, validation
from dmr_operator.dmr.validation import RunnerValidationError


def refused(function: object, *args: object) -> str:
    with pytest.raises(RunnerValidationError) as caught:
        function(*args)  # type: ignore[operator]
    return str(caught.value)


# --- runtime flags ----------------------------------------------------------------------------


def test_allow_lists_match_model_runner() -> None:
    assert len(validation.LLAMACPP_ALLOWED_FLAGS) == 251
    assert len(validation.VLLM_ALLOWED_FLAGS) == 26
    assert {"-ngl", "--temp", "--spec-draft-n-max", "-cd", "--verbose"} <= (
        validation.allowed_flags("llama.cpp")
    )
    assert {"--max-model-len", "-tp", "--gpu-memory-utilization"} <= (
        validation.allowed_flags("vllm")
    )
    # File-taking flags are absent on purpose.
    assert not {"--model", "--log-file", "--lora", "--mmproj", "--ngl"} & (
        validation.LLAMACPP_ALLOWED_FLAGS
    )
    assert validation.allowed_flags("mlx") == frozenset()


@pytest.mark.parametrize(
    ("backend", "flags"),
    [
        ("llama.cpp", ["--threads", "8", "--temp=0.7", "-ngl", "999"]),
        ("llama.cpp", ["--seed=-1", "--rope-freq-scale=-0.5"]),
        ("llama.cpp", ["value-without-dash"]),
        ("vllm", ["--max-model-len", "8192", "--tensor-parallel-size=2"]),
        ("mlx", []),
    ],
)
def test_flags_accepted(backend: str, flags: list[str]) -> None:
    validation.validate_runtime_flags(backend, flags)


@pytest.mark.parametrize(
    ("backend", "flags", "message"),
    [
        (
            "llama.cpp",
            ["--model", "x"],
            'runtime flag "--model" is not allowed for backend "llama.cpp"',
        ),
        (
            "llama.cpp",
            ["--ngl", "9"],
            'runtime flag "--ngl" is not allowed for backend "llama.cpp"',
        ),
        ("vllm", ["--temp", "1"], 'runtime flag "--temp" is not allowed for backend "vllm"'),
        (
            "sglang",
            ["--threads", "1"],
            'runtime flag "--threads" is not allowed for backend "sglang"',
        ),
        ("mlx", ["--seed=1"], 'runtime flag "--seed" is not allowed for backend "mlx"'),
        ("diffusers", ["-v"], 'runtime flag "-v" is not allowed for backend "diffusers"'),
        # A negative number as its own element reads as a flag.
        ("llama.cpp", ["--seed", "-1"], 'runtime flag "-1" is not allowed for backend "llama.cpp"'),
        (
            "llama.cpp",
            ["--seed=-x"],
            "invalid flag \"--seed=-x\": value cannot start with '-' unless followed by a digit",
        ),
        (
            "llama.cpp",
            ["--seed=-"],
            "invalid flag \"--seed=-\": value cannot start with '-' unless followed by a digit",
        ),
        (
            "llama.cpp",
            ["--seed=--log-file=x"],
            "invalid flag \"--seed=--log-file=x\": value cannot start with '-' unless followed "
            "by a digit",
        ),
        (
            "llama.cpp",
            ["--chat-template", "a/b"],
            "invalid runtime flag \"a/b\": paths are not allowed (contains '/' or '\\\\')",
        ),
        (
            "llama.cpp",
            ["--grammar=C:\\x"],
            'invalid runtime flag "--grammar=C:\\\\x": paths are not allowed '
            "(contains '/' or '\\\\')",
        ),
    ],
)
def test_flags_refused_with_model_runner_message(
    backend: str, flags: list[str], message: str
) -> None:
    assert refused(validation.validate_runtime_flags, backend, flags) == message


def test_flag_rules_apply_in_model_runner_order() -> None:
    # Allow-list first (over every element), then injection, then paths.
    message = refused(validation.validate_runtime_flags, "llama.cpp", ["a/b", "--nope"])
    assert message.startswith('runtime flag "--nope"')
    message = refused(validation.validate_runtime_flags, "llama.cpp", ["a/b", "--seed=-x"])
    assert message.startswith('invalid flag "--seed=-x"')


def test_flag_messages_quote_like_go() -> None:
    message = refused(validation.validate_runtime_flags, "llama.cpp", ['--"x\t'])
    assert message == 'runtime flag "--\\"x\\t" is not allowed for backend "llama.cpp"'


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("--threads 8 --temp 0.7", ["--threads", "8", "--temp", "0.7"]),
        ("--chat-template-kwargs '{\"a\": 1}'", ["--chat-template-kwargs", '{"a": 1}']),
        ('--x "a b" c\\ d', ["--x", "a b", "c d"]),
        ("  ", []),
        ('""', [""]),
        ("--threads 8; --temp 1", ["--threads", "8"]),  # parsing stops at an operator
        ("a\\tb", ["a\tb"]),
    ],
)
def test_raw_flags_split_like_go_shellwords(raw: str, expected: list[str]) -> None:
    assert validation.split_raw_runtime_flags(raw) == expected


@pytest.mark.parametrize("raw", ['--x "open', "--x 'open", "--x (a)", "a)", "trailing\\"])
def test_raw_flags_parse_errors(raw: str) -> None:
    assert refused(validation.split_raw_runtime_flags, raw) == (
        "invalid runtime flags: invalid command line string"
    )


def test_flag_sources_are_exclusive_and_array_wins() -> None:
    message = refused(validation.validate_flag_sources, ["--threads", "1"], "--threads 2")
    assert message == "cannot set both runtime-flags and raw-runtime-flags; pick one"
    validation.validate_flag_sources(["--threads", "1"], "  ")
    validation.validate_flag_sources([], "--threads 2")
    assert validation.effective_runtime_flags([], "--threads 2") == ["--threads", "2"]
    assert validation.effective_runtime_flags(["-t", "1"], None) == ["-t", "1"]


@given(st.text(max_size=20), st.lists(st.text(max_size=12), max_size=6))
def test_flag_validation_only_raises_runner_validation_error(
    backend: str, flags: list[str]
) -> None:
    for candidate in (backend, "llama.cpp", "vllm"):
        with contextlib.suppress(RunnerValidationError):
            validation.validate_runtime_flags(candidate, flags)


@given(st.text(max_size=40))
def test_raw_split_only_raises_runner_validation_error(raw: str) -> None:
    with contextlib.suppress(RunnerValidationError):
        validation.split_raw_runtime_flags(raw)


# --- hf_overrides, gpu memory, mode -----------------------------------------------------------

RULE = (
    "must contain only alphanumeric characters and underscores, and start with a letter or "
    "underscore"
)


def test_hf_overrides_valid() -> None:
    validation.validate_hf_overrides(
        {
            "rope_scaling": {"type": "yarn", "factor": 4.0, "nested_list": [1, {"_k": None}]},
            "_x": True,
            "max_len2": 8,
        }
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"1abc": 1}, f'invalid hf_overrides key "1abc": {RULE}'),
        ({"a-b": 1}, f'invalid hf_overrides key "a-b": {RULE}'),
        ({"--flag": 1}, f'invalid hf_overrides key "--flag": {RULE}'),
        ({"a": {"b c": 1}}, f'invalid hf_overrides nested key "b c" in "a": {RULE}'),
        ({"a": {"b": {"c;d": 1}}}, f'invalid hf_overrides nested key "c;d" in "a.b": {RULE}'),
        ({"a": [0, {"x-y": 1}]}, f'invalid hf_overrides nested key "x-y" in "a[1]": {RULE}'),
        (
            {"a": {1, 2}},
            'invalid hf_overrides value for key "a": unsupported type map[interface {}]struct {}',
        ),
        ({"a": [b"x"]}, 'invalid hf_overrides value for key "a[0]": unsupported type []uint8'),
    ],
)
def test_hf_overrides_refused(overrides: dict[str, object], message: str) -> None:
    assert refused(validation.validate_hf_overrides, overrides) == message


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 0])
def test_gpu_memory_utilization_in_range(value: float) -> None:
    validation.validate_gpu_memory_utilization(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "gpu-memory-utilization must be between 0.0 and 1.0, got 1.500000"),
        (-0.1, "gpu-memory-utilization must be between 0.0 and 1.0, got -0.100000"),
        (float("nan"), "gpu-memory-utilization must be between 0.0 and 1.0, got nan"),
    ],
)
def test_gpu_memory_utilization_out_of_range(value: float, message: str) -> None:
    assert refused(validation.validate_gpu_memory_utilization, value) == message


def test_modes_and_backends() -> None:
    assert validation.MODES == ("completion", "embedding", "reranking", "image-generation")
    assert validation.BACKENDS == ("llama.cpp", "vllm", "mlx", "sglang", "diffusers")
    for mode in validation.MODES:
        validation.validate_mode(mode)
    assert refused(validation.validate_mode, "Completion") == 'unknown backend mode: "Completion"'
    assert refused(validation.validate_backend, "llamacpp") == "backend not found"
    assert validation.default_mode_for_flags(["--embeddings"]) == "embedding"
    assert validation.default_mode_for_flags(["--embeddings=1"]) == "completion"


# --- keep_alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "echo"),
    [
        ("5m", "5m0s"),
        ("1h", "1h0m0s"),
        ("30s", "30s"),
        ("90s", "1m30s"),
        ("1.5h", "1h30m0s"),
        ("2h30m", "2h30m0s"),
        ("300ms", "300ms"),
        ("1.5us", "1.5µs"),
        ("2µs", "2µs"),
        ("10ns", "10ns"),
        ("0", "0s"),
        ("0s", "0s"),
        ("+0", "0s"),
        ("-0", "0s"),
        ("-1", "-1"),
        ("-1s", "-1"),
        ("-5m", "-1"),
        ("-1ns", "-1"),
        ("+5m", "5m0s"),
        (".5s", "500ms"),
        ("1.s", "1s"),
        ("2562047h47m16.854775807s", "2562047h47m16.854775807s"),
    ],
)
def test_keep_alive_echo(text: str, echo: str) -> None:
    assert validation.keep_alive_echo(text) == echo
    assert re.fullmatch(validation.KEEP_ALIVE_PATTERN, text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("300", 'time: missing unit in duration "300"'),
        ("-2", 'time: missing unit in duration "-2"'),
        ("", 'time: invalid duration ""'),
        ("-", 'time: invalid duration "-"'),
        (".s", 'time: invalid duration ".s"'),
        ("5 m", 'time: unknown unit " m" in duration "5 m"'),
        ("5M", 'time: unknown unit "M" in duration "5M"'),
        ("1e3s", 'time: unknown unit "e" in duration "1e3s"'),
        ("forever", 'time: invalid duration "forever"'),
        ("2562048h", 'time: invalid duration "2562048h"'),
        ("5µx", 'time: unknown unit "\\xc2\\xb5x" in duration "5\\xc2\\xb5x"'),
    ],
)
def test_keep_alive_refused(text: str, error: str) -> None:
    message = refused(validation.parse_keep_alive, text)
    assert message == f"invalid keep_alive duration {golang.quote(text)}: {error}"
    if not any(unit in text for unit in ("2562048h",)):
        assert not re.fullmatch(validation.KEEP_ALIVE_PATTERN, text)


@given(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1))
def test_duration_string_parses_back(nanoseconds: int) -> None:
    assert golang.parse_duration(golang.format_duration(nanoseconds)) == nanoseconds


@given(st.text(alphabet="0123456789.+-nsuµmh ", max_size=12))
def test_keep_alive_pattern_agrees_with_parser(text: str) -> None:
    try:
        validation.parse_keep_alive(text)
        parses = True
    except RunnerValidationError:
        parses = False
    matches = re.fullmatch(validation.KEEP_ALIVE_PATTERN, text) is not None
    if parses:
        assert matches
    elif matches:  # only overflow gets past the pattern
        assert len(text.replace(".", "")) > 8


# --- thinking budget, backend selection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (0, 0),
        (4096, 4096),
        (-1, -1),
        ("none", 0),
        ("minimal", 1024),
        ("low", 2048),
        ("Medium", 8192),
        ("HIGH", 16384),
        ("xhigh", 32768),
        ("max", 32768),
        ("adaptive", -1),
        ("adaptive/high", -1),
        ("512", 512),
    ],
)
def test_reasoning_budget(value: int | str, tokens: int) -> None:
    assert validation.reasoning_budget(value) == tokens


def test_reasoning_budget_refused() -> None:
    assert refused(validation.reasoning_budget, "lots").startswith('invalid thinking budget "lots"')
    assert (
        refused(validation.reasoning_budget, 2**31)
        == "reasoning-budget 2147483648 does not fit in int32"
    )
    assert set(validation.EFFORT_NAMES) == {
        "none",
        "minimal",
        "low",
        "medium",
        "high",
        "xhigh",
        "max",
        "adaptive",
    }


@pytest.mark.parametrize(
    ("model_format", "backend"),
    [
        ("gguf", "llama.cpp"),
        ("safetensors", "vllm"),
        ("dduf", "diffusers"),
        ("diffusers", "diffusers"),
        (None, "llama.cpp"),
        ("unknown", "llama.cpp"),
    ],
)
def test_default_backend_for_format(model_format: str | None, backend: str) -> None:
    assert validation.default_backend_for_format(model_format) == backend


def test_gguf_keeps_the_path_backend() -> None:
    assert validation.default_backend_for_format("gguf", path_backend="vllm") == "vllm"
    assert validation.default_backend_for_format("safetensors", path_backend="llama.cpp") == "vllm"


def test_go_quote() -> None:
    assert golang.quote('a"b\\c\n\x00é\u200b') == '"a\\"b\\\\c\\n\\x00é\\u200b"'
