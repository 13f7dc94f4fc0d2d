"""What one model needs in memory on a runner: weights, KV cache for its context, compute. Pure.

Placement (``reconcile.placement``) puts a DMRModel only on pods where this fits; model-runner
itself admits models by runner slot alone (real-peers.md M6). The inputs are what the runner's
own store says of the model (``GET /models/{ref}``: ``config.size``, the packaged
``config.context_size`` and the GGUF metadata map ``config.gguf``, whose values are all strings)
and the DMRModel's ``contextSize``.

The KV cache is an upper bound for llama.cpp: ``n_ctx x (KV heads summed over the layers) x
(key_length + value_length) x 2`` bytes (f16 keys and values), with ``n_ctx`` rounded up to
llama.cpp's 256-cell padding. It ignores that llama.cpp gives sliding-window layers a smaller
cache and can quantise the cache (``--cache-type-k``): both only make the real one smaller.
Measured against the real llama-server with Gemma 3 270M (15 of its 18 layers slide over 512
tokens): exact at 2048 tokens (36 MiB), 2.3 times the real cache at 8192 (144 vs 61.5 MiB).

Without the metadata the formula needs (no ``gguf`` map, as for safetensors models, or an
architecture without attention heads), the KV cache is taken as ``FALLBACK_KV_FACTOR`` times the
weights and the result says it is an estimate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from dmr_operator.api.v1alpha1.dmrmodel import DMRModelSpec
from dmr_operator.dmr import wire
from dmr_operator.reconcile import capacity

# f16 keys and values: llama.cpp's default cache type.
KV_BYTES_PER_ELEMENT: Final = 2
# llama.cpp pads the cache to whole 256-cell pages (seen: --ctx-size 2000 gives 2048 cells).
KV_CELL_PADDING: Final = 256
# What llama-server reserves besides weights and KV cache, from its own report for Gemma 3 270M
# on CPU: compute buffer 22.3 MiB (2048 tokens) to 28.8 MiB (8192), output buffer 4 MiB and
# repacked CPU weights 12.7 MiB, i.e. 39 to 45 MiB. A floor: bigger models need more (the
# compute buffer grows with the embedding width and the vocabulary).
COMPUTE_ALLOWANCE_BYTES: Final = 64 * 2**20
# No metadata: assume a KV cache as large as the weights. Not a measurement; chat models of
# 1-70B parameters need 0.1-0.4 times their weights at 8k tokens, more at their full context.
FALLBACK_KV_FACTOR: Final = 1.0
# vLLM's own default for --gpu-memory-utilization (model-runner passes one only when configured).
VLLM_DEFAULT_GPU_SHARE: Final = 0.9
_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class ModelNeeds:
    """Bytes a loaded model takes on one runner, and how that figure was reached."""

    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    context_size: int | None  # cache cells the KV figure is for; None when estimated without
    estimated: bool  # True: the KV figure is FALLBACK_KV_FACTOR x weights, not the formula
    formula: str  # for people: the numbers that went in, e.g. in a status message
    # vLLM reserves this fraction of the GPU memory it is given at start-up, whatever the model
    # (--gpu-memory-utilization, 0.9 by default); None for llama.cpp, which takes what it needs.
    gpu_share: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes

    def on_pod(self, gpu_memory_bytes: int) -> int:
        """Bytes it takes on a pod with that much GPU memory (0: a CPU pod)."""
        if self.gpu_share is None or gpu_memory_bytes <= 0:
            return self.total_bytes
        return max(self.total_bytes, math.ceil(self.gpu_share * gpu_memory_bytes))


def vllm_gpu_share(spec: DMRModelSpec) -> float | None:
    """The share of its GPUs' memory a DMRModel reserves when vLLM runs it: its
    ``vllm.gpuMemoryUtilization``, else vLLM's default. For ``backend: vllm``, or no backend
    with vLLM options (model-runner picks vLLM for safetensors); None for llama.cpp."""
    options = spec.vllm
    if spec.backend == "vllm" or (spec.backend is None and options is not None):
        if options is not None and options.gpu_memory_utilization is not None:
            return options.gpu_memory_utilization
        return VLLM_DEFAULT_GPU_SHARE
    return None


def combined(parts: Sequence[ModelNeeds]) -> ModelNeeds:
    """What models loaded together need (a model and its speculative draft): the sums."""
    if len(parts) == 1:
        return parts[0]
    return ModelNeeds(
        weights_bytes=sum(p.weights_bytes for p in parts),
        kv_cache_bytes=sum(p.kv_cache_bytes for p in parts),
        compute_bytes=sum(p.compute_bytes for p in parts),
        context_size=parts[0].context_size,
        estimated=any(p.estimated for p in parts),
        formula=" + ".join(f"({p.formula})" for p in parts),
        gpu_share=parts[0].gpu_share,
    )


def needs_of(model: wire.StoreModel, *, context_size: int | None) -> ModelNeeds | None:
    """What ``model`` (as a runner's store reports it) needs with the DMRModel's
    ``contextSize``; None when the store gives no readable size for its weights."""
    weights = capacity.size_in_bytes(model.config.size)
    if weights is None:
        return None
    return model_needs(
        weights_bytes=weights,
        gguf=model.config.gguf,
        context_size=context_size,
        packaged_context_size=model.config.context_size,
    )


def model_needs(
    *,
    weights_bytes: int,
    gguf: Mapping[str, str] | None,
    context_size: int | None,
    packaged_context_size: int | None = None,
) -> ModelNeeds:
    """The needs of a model of ``weights_bytes`` with GGUF metadata ``gguf``.

    ``context_size`` is the DMRModel's; None, 0 or a negative number mean what model-runner
    then runs with: the model's packaged context size (``packaged_context_size``), else the
    trained one (``<arch>.context_length``).
    """
    metadata = gguf or {}
    context = _context(metadata, context_size, packaged_context_size)
    per_token = _kv_bytes_per_token(metadata)
    if context is None or per_token is None:
        return _fallback(weights_bytes, "no context size" if per_token else "no attention shape")
    cells = math.ceil(context / KV_CELL_PADDING) * KV_CELL_PADDING
    kv = cells * per_token.bytes
    padded = f" ({context} padded)" if cells != context else ""
    formula = (
        f"weights {_mib(weights_bytes)} + KV cache {cells} tokens{padded} x "
        f"{per_token.describe()} "
        f"x {KV_BYTES_PER_ELEMENT} B = {_mib(kv)} + compute {_mib(COMPUTE_ALLOWANCE_BYTES)} "
        f"= {_mib(weights_bytes + kv + COMPUTE_ALLOWANCE_BYTES)}"
    )
    return ModelNeeds(
        weights_bytes=weights_bytes,
        kv_cache_bytes=kv,
        compute_bytes=COMPUTE_ALLOWANCE_BYTES,
        context_size=cells,
        estimated=False,
        formula=formula,
    )


@dataclass(frozen=True)
class _PerToken:
    layers: int
    kv_heads: int  # summed over the layers
    uniform: bool  # every layer has kv_heads / layers heads
    key_length: int
    value_length: int

    @property
    def bytes(self) -> int:
        return self.kv_heads * (self.key_length + self.value_length) * KV_BYTES_PER_ELEMENT

    def describe(self) -> str:
        heads = (
            f"{self.layers} layers x {self.kv_heads // self.layers} KV heads"
            if self.uniform
            else f"{self.kv_heads} KV heads summed over {self.layers} layers"
        )
        return f"{heads} x ({self.key_length} + {self.value_length})"


def _kv_bytes_per_token(metadata: Mapping[str, str]) -> _PerToken | None:
    architecture = metadata.get("general.architecture", "").strip()
    if not architecture:
        return None

    def numbers(key: str) -> list[int]:
        return _integers(metadata.get(f"{architecture}.{key}"))

    layers = numbers("block_count")
    heads = numbers("attention.head_count")
    embedding = numbers("embedding_length")
    if len(layers) != 1 or layers[0] <= 0 or not heads or max(heads) <= 0:
        return None
    n_layer = layers[0]
    kv_heads = numbers("attention.head_count_kv") or heads
    # Per-layer counts (some architectures vary them) are summed; one count holds for every layer.
    per_layer = len(kv_heads) == n_layer and len(set(kv_heads)) > 1
    total_kv_heads = sum(kv_heads) if per_layer else max(kv_heads) * n_layer
    head_length = None
    if embedding and embedding[0] > 0:
        # GGUF's default head length; the smallest head count gives the longest, conservatively.
        head_length = embedding[0] // min(count for count in heads if count > 0)
    key_length = _largest(numbers("attention.key_length")) or head_length
    value_length = _largest(numbers("attention.value_length")) or head_length
    if not key_length or not value_length or total_kv_heads <= 0:
        return None
    return _PerToken(n_layer, total_kv_heads, not per_layer, key_length, value_length)


def _context(
    metadata: Mapping[str, str], requested: int | None, packaged: int | None
) -> int | None:
    """The context llama-server runs with: the requested one when above 0; for -1 ("unlimited")
    the trained one; otherwise (model-runner ignores 0 and other negatives) the packaged one,
    else the trained one."""
    if requested is not None and requested > 0:
        return requested
    architecture = metadata.get("general.architecture", "").strip()
    trained = _largest(_integers(metadata.get(f"{architecture}.context_length")))
    candidates = (trained, packaged) if requested == -1 else (packaged, trained)
    return next((size for size in candidates if size is not None and size > 0), None)


def _fallback(weights_bytes: int, reason: str) -> ModelNeeds:
    kv = int(weights_bytes * FALLBACK_KV_FACTOR)
    total = weights_bytes + kv + COMPUTE_ALLOWANCE_BYTES
    return ModelNeeds(
        weights_bytes=weights_bytes,
        kv_cache_bytes=kv,
        compute_bytes=COMPUTE_ALLOWANCE_BYTES,
        context_size=None,
        estimated=True,
        formula=(
            f"estimate ({reason} in the model's metadata): weights {_mib(weights_bytes)} "
            f"+ KV cache {FALLBACK_KV_FACTOR:g} x weights + compute "
            f"{_mib(COMPUTE_ALLOWANCE_BYTES)} = {_mib(total)}"
        ),
    )


def _integers(value: str | None) -> list[int]:
    """The counts in a metadata value: ``"4"``, ``"4.0"``, or an array as model-runner renders
    one (``"[4, 4, 8]"``, ``"4, 4, 8"``). Anything else, a fraction or a negative: none."""
    found: list[int] = []
    for text in _NUMBER.findall(value or ""):
        number = float(text)
        if not math.isfinite(number) or number < 0 or number != int(number):
            return []
        found.append(int(number))
    return found


def _largest(values: Sequence[int]) -> int | None:
    return max(values) if values else None


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"
