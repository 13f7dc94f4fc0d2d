"""model-runner's validation rules with its exact messages (model-runner-api.md §3.4, §4.3).

The same text reaches users whether a value is refused by the CRD model (``dmr_operator.api``),
by the client before any HTTP call (``dmr_operator.clients.modelrunner``), or by a real runner;
the emulator (``dmr_operator.testing.emulator``) refuses with these functions too. Go semantics
(``%q`` quoting, ``time.ParseDuration``, go-shellwords) come from ``golang``. Pure, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from dmr_operator.dmr import golang

Backend = Literal["llama.cpp", "vllm", "mlx", "sglang", "diffusers"]
Mode = Literal["completion", "embedding", "reranking", "image-generation"]

BACKENDS: Final[tuple[str, ...]] = ("llama.cpp", "vllm", "mlx", "sglang", "diffusers")
DEFAULT_BACKEND: Final = "llama.cpp"
MODES: Final[tuple[str, ...]] = ("completion", "embedding", "reranking", "image-generation")
DEFAULT_MODE: Final = "completion"
MODEL_FORMATS: Final[tuple[str, ...]] = ("gguf", "safetensors", "dduf", "diffusers")

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1

BACKEND_NOT_FOUND: Final = "backend not found"


class RunnerValidationError(ValueError):
    """A value model-runner refuses; str() is the runner's own message."""


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The allow-lists are data copied name for name from model-runner's
# pkg/inference/runtime_flags_allowlist.go; a backend without a list refuses every flag.
LLAMACPP_ALLOWED_FLAGS: Final[frozenset[str]] = _words(
    """
    -t --threads -tb --threads-batch -C --cpu-mask -Cr --cpu-range --cpu-strict --prio
    --poll -Cb --cpu-mask-batch -Crb --cpu-range-batch --cpu-strict-batch --prio-batch
    --poll-batch -c --ctx-size -n --predict --n-predict --keep -b --batch-size -ub
    --ubatch-size --swa-full -fa --flash-attn --perf --no-perf --samplers -s --seed --temp
    --temperature --top-k --top-p --min-p --top-nsigma --xtc-probability --xtc-threshold
    --typical --repeat-last-n --repeat-penalty --presence-penalty --frequency-penalty
    --dry-multiplier --dry-base --dry-allowed-length --dry-penalty-last-n --mirostat
    --mirostat-lr --mirostat-ent --ignore-eos --dynatemp-range --dynatemp-exp -dev --device
    -ngl --gpu-layers --n-gpu-layers -sm --split-mode -ts --tensor-split -mg --main-gpu
    -fit --fit -fitt --fit-target -fitc --fit-ctx -kvo --kv-offload -nkvo --no-kv-offload
    --repack -nr --no-repack --no-host -ctk --cache-type-k -ctv --cache-type-v --mlock
    --mmap --no-mmap -dio --direct-io -ndio --no-direct-io -cram --cache-ram -kvu
    --kv-unified --context-shift --no-context-shift --rope-scaling --rope-scale
    --rope-freq-base --rope-freq-scale --yarn-orig-ctx --yarn-ext-factor --yarn-attn-factor
    --yarn-beta-slow --yarn-beta-fast -np --parallel -cb --cont-batching -nocb
    --no-cont-batching --warmup --no-warmup -to --timeout --threads-http --cache-prompt
    --no-cache-prompt --cache-reuse --sleep-idle-seconds --mmproj-auto --no-mmproj
    --no-mmproj-auto --mmproj-offload --no-mmproj-offload --image-min-tokens
    --image-max-tokens --spm-infill --spec-draft-threads -td --threads-draft
    --spec-draft-threads-batch -tbd --threads-batch-draft --spec-draft-cpu-mask -Cd
    --cpu-mask-draft --spec-draft-cpu-range -Crd --cpu-range-draft --spec-draft-cpu-strict
    --cpu-strict-draft --spec-draft-prio --prio-draft --spec-draft-poll --poll-draft
    --spec-draft-cpu-mask-batch -Cbd --cpu-mask-batch-draft --spec-draft-cpu-strict-batch
    --cpu-strict-batch-draft --spec-draft-prio-batch --prio-batch-draft
    --spec-draft-poll-batch --poll-batch-draft --spec-draft-override-tensor -otd
    --override-tensor-draft --spec-draft-cpu-moe -cmoed --cpu-moe-draft
    --spec-draft-n-cpu-moe --spec-draft-ncmoe -ncmoed --n-cpu-moe-draft --spec-draft-n-max
    --draft-n-max --draft-max --spec-draft-n-min --draft-n-min --draft-min
    --spec-draft-p-split --draft-p-split --spec-draft-p-min --draft-p-min
    --spec-draft-backend-sampling --no-spec-draft-backend-sampling --spec-draft-device -devd
    --device-draft --spec-draft-ngl -ngld --gpu-layers-draft --n-gpu-layers-draft
    --spec-type --spec-ngram-mod-n-min --spec-ngram-mod-n-max --spec-ngram-mod-n-match
    --spec-ngram-simple-size-n --spec-ngram-simple-size-m --spec-ngram-simple-min-hits
    --spec-ngram-map-k-size-n --spec-ngram-map-k-size-m --spec-ngram-map-k-min-hits
    --spec-ngram-map-k4v-size-n --spec-ngram-map-k4v-size-m --spec-ngram-map-k4v-min-hits
    --spec-draft-type-k -ctkd --cache-type-k-draft --spec-draft-type-v -ctvd
    --cache-type-v-draft -cd --ctx-size-draft --lora-init-without-apply
    --control-vector-layer-range --grammar -j --json-schema -bs --backend-sampling
    --chat-template --chat-template-kwargs --jinja --no-jinja --pooling --reasoning-format
    --reasoning-budget --prefill-assistant --no-prefill-assistant --api-prefix --webui
    --no-webui --webui-config --api-key --metrics --no-metrics --props --slots --no-slots
    --embedding --embeddings --rerank --reranking -sps --slot-prompt-similarity -cmoe
    --cpu-moe -ncmoe --n-cpu-moe --check-tensors --op-offload --no-op-offload -v --verbose
    """
)
VLLM_ALLOWED_FLAGS: Final[frozenset[str]] = _words(
    """
    --tensor-parallel-size -tp --pipeline-parallel-size -pp --max-model-len
    --max-num-batched-tokens --max-num-seqs --block-size --swap-space --seed --dtype
    --quantization -q --kv-cache-dtype --enforce-eager --enable-prefix-caching
    --enable-chunked-prefill --disable-custom-all-reduce --use-v2-block-manager
    --tokenizer-mode --max-logprobs --revision --load-format --disable-log-stats
    --served-model-name --gpu-memory-utilization
    """
)
ALLOWED_FLAGS: Final[Mapping[str, frozenset[str]]] = {
    "llama.cpp": LLAMACPP_ALLOWED_FLAGS,
    "vllm": VLLM_ALLOWED_FLAGS,
}


def allowed_flags(backend: str) -> frozenset[str]:
    """The runtime-flag keys ``backend`` accepts (empty: every flag is refused)."""
    return ALLOWED_FLAGS.get(backend, frozenset())


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise RunnerValidationError(BACKEND_NOT_FOUND)


def flag_key(element: str) -> str | None:
    """The flag name of a runtime-flag element, or None for a value (no leading ``-``)."""
    if not element.startswith("-"):
        return None
    return element.split("=", 1)[0]


def validate_runtime_flags(backend: str, flags: Sequence[str]) -> None:
    """model-runner's three rules, in its order: allow-list, no flag in a value, no paths.

    A negative number given as its own element (``["--seed", "-1"]``) reads as flag ``-1`` and
    is refused, like the runner does; ``"--seed=-1"`` passes.
    """
    allowed = allowed_flags(backend)
    for element in flags:
        key = flag_key(element)
        if key is not None and key not in allowed:
            raise RunnerValidationError(
                f"runtime flag {golang.quote(key)} is not allowed for backend "
                f"{golang.quote(backend)}"
            )
    for element in flags:
        _, separator, value = element.partition("=")
        if separator and value.startswith("-") and not (len(value) >= 2 and value[1].isdigit()):
            raise RunnerValidationError(
                f"invalid flag {golang.quote(element)}: value cannot start with '-' unless "
                "followed by a digit"
            )
    for element in flags:
        if "/" in element or "\\" in element:
            raise RunnerValidationError(
                f"invalid runtime flag {golang.quote(element)}: paths are not allowed "
                "(contains '/' or '\\\\')"
            )


def split_raw_runtime_flags(raw: str) -> list[str]:
    """Shell-split ``raw-runtime-flags`` the way the runner does (go-shellwords)."""
    try:
        return golang.shell_split(raw)
    except golang.ShellwordsError as error:
        raise RunnerValidationError(f"invalid runtime flags: {error}") from None


def validate_flag_sources(
    runtime_flags: Sequence[str] | None, raw_runtime_flags: str | None
) -> None:
    """Client-side rule (docker-agent's): one of the two forms, never both.

    The runner itself silently prefers ``runtime-flags``; refusing both avoids a surprise.
    """
    if runtime_flags and raw_runtime_flags and raw_runtime_flags.strip():
        raise RunnerValidationError("cannot set both runtime-flags and raw-runtime-flags; pick one")


def effective_runtime_flags(
    runtime_flags: Sequence[str] | None, raw_runtime_flags: str | None
) -> list[str]:
    """The flag list the runner validates and stores: the array if non-empty, else raw split."""
    if runtime_flags:
        return list(runtime_flags)
    if raw_runtime_flags:
        return split_raw_runtime_flags(raw_runtime_flags)
    return []


_HF_KEY: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_HF_KEY_RULE: Final = (
    "must contain only alphanumeric characters and underscores, and start with a letter or "
    "underscore"
)
_GO_TYPE_NAMES: Final[Mapping[type, str]] = {
    tuple: "[]interface {}",
    set: "map[interface {}]struct {}",
    frozenset: "map[interface {}]struct {}",
    bytes: "[]uint8",
    complex: "complex128",
}


def _hf_key_ok(key: object) -> bool:
    return isinstance(key, str) and _HF_KEY.fullmatch(key) is not None


def _validate_hf_value(path: str, value: object) -> None:
    if value is None or isinstance(value, str | bool | int | float):
        return
    if isinstance(value, list):
        for index, element in enumerate(value):
            _validate_hf_value(f"{path}[{index}]", element)
        return
    if isinstance(value, Mapping):
        for nested_key, nested_value in value.items():
            if not _hf_key_ok(nested_key):
                raise RunnerValidationError(
                    f"invalid hf_overrides nested key {golang.quote(str(nested_key))} in "
                    f"{golang.quote(path)}: {_HF_KEY_RULE}"
                )
            _validate_hf_value(f"{path}.{nested_key}", nested_value)
        return
    type_name = _GO_TYPE_NAMES.get(type(value), type(value).__name__)
    raise RunnerValidationError(
        f"invalid hf_overrides value for key {golang.quote(path)}: unsupported type {type_name}"
    )


def validate_hf_overrides(overrides: Mapping[str, Any]) -> None:
    """``HFOverrides.Validate``: keys at every depth ``^[a-zA-Z_][a-zA-Z0-9_]*$``, JSON values."""
    for key, value in overrides.items():
        if not _hf_key_ok(key):
            raise RunnerValidationError(
                f"invalid hf_overrides key {golang.quote(str(key))}: {_HF_KEY_RULE}"
            )
        _validate_hf_value(key, value)


def validate_gpu_memory_utilization(value: float) -> None:
    """[0.0, 1.0] inclusive (the runner checks this only when vLLM starts)."""
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise RunnerValidationError(
            f"gpu-memory-utilization must be between 0.0 and 1.0, got {value:f}"
        )


def validate_mode(mode: str) -> None:
    if mode not in MODES:
        raise RunnerValidationError(f"unknown backend mode: {golang.quote(mode)}")


def validate_int32(name: str, value: int) -> None:
    """Go decodes these fields into int32; anything wider is a JSON error (400 on the runner)."""
    if not INT32_MIN <= value <= INT32_MAX:
        raise RunnerValidationError(f"{name} {value} does not fit in int32")


# --- keep_alive -------------------------------------------------------------------------------

KEEP_ALIVE_IMMEDIATE: Final = 0
KEEP_ALIVE_FOREVER: Final = -1
DEFAULT_KEEP_ALIVE: Final = 5 * golang.MINUTE
# time.ParseDuration's grammar plus the literal "-1" (RE2-compatible, for the CRD schema).
# Overflow (more than ~292 years) is only caught by parse_keep_alive.
KEEP_ALIVE_PATTERN: Final = (
    r"^(?:-1|[-+]?0|[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+)$"
)


def parse_keep_alive(text: str) -> int:
    """model-runner's ``ParseKeepAlive``: nanoseconds; 0 = unload at once, -1 = never.

    Any negative duration means "never" (-1). Bare numbers other than 0/-1 and units like
    ``d`` are refused with the runner's message.
    """
    if text == "0":
        return KEEP_ALIVE_IMMEDIATE
    if text == "-1":
        return KEEP_ALIVE_FOREVER
    try:
        duration = golang.parse_duration(text)
    except golang.DurationError as error:
        raise RunnerValidationError(
            f"invalid keep_alive duration {golang.quote(text)}: {error}"
        ) from None
    return KEEP_ALIVE_FOREVER if duration < 0 else duration


def format_keep_alive(nanoseconds: int) -> str:
    """How the runner renders a stored keep_alive in JSON: ``"-1"`` or ``Duration.String()``."""
    if nanoseconds == KEEP_ALIVE_FOREVER:
        return "-1"
    return golang.format_duration(nanoseconds)


def keep_alive_echo(text: str) -> str:
    """What ``GET /engines/_configure`` shows for a keep_alive that was sent as ``text``.

    ``"5m"`` -> ``"5m0s"``, ``"1h"`` -> ``"1h0m0s"``, ``"0"`` -> ``"0s"``, ``"-1"`` and every
    other negative duration -> ``"-1"``.
    """
    return format_keep_alive(parse_keep_alive(text))


# --- thinking budget --------------------------------------------------------------------------

# docker-agent's effort table (reference/docker-agent-dmr.md §3.6); "adaptive" = unlimited (-1).
EFFORT_TOKENS: Final[Mapping[str, int]] = {
    "none": 0,
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
    "max": 32768,
    "adaptive": -1,
}
EFFORT_NAMES: Final[tuple[str, ...]] = tuple(EFFORT_TOKENS)
ADAPTIVE_PREFIX: Final = "adaptive/"


def reasoning_budget(value: int | str) -> int:
    """A thinking budget (token count or effort name) as llama.cpp's ``--reasoning-budget``."""
    if isinstance(value, bool):
        raise RunnerValidationError(f"invalid thinking budget {value!r}")
    if isinstance(value, int):
        validate_int32("reasoning-budget", value)
        return value
    name = value.strip().lower()
    if name in EFFORT_TOKENS:
        return EFFORT_TOKENS[name]
    if name.startswith(ADAPTIVE_PREFIX):
        return EFFORT_TOKENS["adaptive"]
    if re.fullmatch(r"[-+]?[0-9]+", name):
        return reasoning_budget(int(name))
    raise RunnerValidationError(
        f"invalid thinking budget {golang.quote(value)}: must be an integer or one of: "
        + ", ".join(EFFORT_NAMES)
    )


# --- backend selection ------------------------------------------------------------------------


def default_backend_for_format(
    model_format: str | None, *, path_backend: str = DEFAULT_BACKEND
) -> str:
    """The backend model-runner picks for a model of this format on Linux.

    safetensors -> vllm, dduf (and legacy diffusers) -> diffusers; gguf or unknown keeps the
    backend named in the URL (llama.cpp by default).
    """
    if model_format == "safetensors":
        return "vllm"
    if model_format in ("dduf", "diffusers"):
        return "diffusers"
    return path_backend


def default_mode_for_flags(flags: Iterable[str]) -> str:
    """The runner's default mode: ``embedding`` when a flag is exactly ``--embeddings``."""
    return "embedding" if "--embeddings" in flags else DEFAULT_MODE
