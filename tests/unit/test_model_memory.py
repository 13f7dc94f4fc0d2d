"""What a model needs in memory (reconcile.model_memory): the KV-cache bound from GGUF metadata
as the real model-runner reports it (strings), the context model-runner would run with, the
padding llama.cpp applies, and the stated estimate when the metadata is missing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmr_operator.dmr import wire
from dmr_operator.reconcile import model_memory

MIB = 2**20
# GET /models/ai/gemma3:270m from the real model-runner v1.2.9 (tokenizer keys left out).
GEMMA_REPLY = {
    "id": "sha256:18852088a6d72857d3436bc918c99ed7d1fb6b46d34f518f5883c9363b5db0ef",
    "tags": ["127.0.0.1:33195/ai/gemma3:270m"],
    "created": 0,
    "config": {
        "format": "gguf",
        "quantization": "MOSTLY_Q4_K_M",
        "parameters": "268.10M",
        "architecture": "gemma3",
        "size": "235.16MiB",
        "gguf": {
            "gemma3.attention.head_count": "4",
            "gemma3.attention.head_count_kv": "1",
            "gemma3.attention.key_length": "256",
            "gemma3.attention.layer_norm_rms_epsilon": "0.000001",
            "gemma3.attention.sliding_window": "512",
            "gemma3.attention.value_length": "256",
            "gemma3.block_count": "18",
            "gemma3.context_length": "32768",
            "gemma3.embedding_length": "640",
            "gemma3.feed_forward_length": "2048",
            "general.architecture": "gemma3",
            "general.tags": "gemma3, gemma, google, text-generation",
        },
        "context_size": 32768,
    },
}
GEMMA = wire.StoreModel.model_validate(GEMMA_REPLY)
GEMMA_WEIGHTS = int(235.16 * MIB)
# A Llama-3-8B-like shape: grouped-query attention, head length from the embedding width.
LLAMA = {
    "general.architecture": "llama",
    "llama.block_count": "32",
    "llama.attention.head_count": "32",
    "llama.attention.head_count_kv": "8",
    "llama.embedding_length": "4096",
    "llama.context_length": "131072",
}


def test_gemma_as_the_real_runner_reports_it() -> None:
    needs = model_memory.needs_of(GEMMA, context_size=2048)
    assert needs is not None
    # 2048 tokens x 18 layers x 1 KV head x (256 + 256) x 2 B: what llama-server allocated.
    assert needs.kv_cache_bytes == 36 * MIB
    assert needs.weights_bytes == GEMMA_WEIGHTS
    assert needs.compute_bytes == model_memory.COMPUTE_ALLOWANCE_BYTES
    assert needs.total_bytes == GEMMA_WEIGHTS + 36 * MIB + model_memory.COMPUTE_ALLOWANCE_BYTES
    assert not needs.estimated
    assert needs.context_size == 2048
    assert needs.formula == (
        "weights 235.16 MiB + KV cache 2048 tokens x 18 layers x 1 KV heads x (256 + 256) x 2 B"
        " = 36.00 MiB + compute 64.00 MiB = 335.16 MiB"
    )
    bigger = model_memory.needs_of(GEMMA, context_size=8192)
    assert bigger is not None and bigger.kv_cache_bytes == 144 * MIB


@pytest.mark.parametrize(
    ("context_size", "packaged", "cells"),
    [
        (None, 16384, 16384),  # model-runner passes the packaged context size
        (0, 16384, 16384),  # 0 and negatives are ignored like absent ...
        (-2, 16384, 16384),
        (-1, 16384, 32768),  # ... but -1 is "unlimited": the trained context
        (None, None, 32768),  # nothing packaged: llama-server uses the trained one
        (2000, None, 2048),  # llama.cpp pads its cache to 256 cells
        (4096, 16384, 4096),
    ],
)
def test_the_context_is_the_one_model_runner_would_run_with(
    context_size: int | None, packaged: int | None, cells: int
) -> None:
    needs = model_memory.model_needs(
        weights_bytes=GEMMA_WEIGHTS,
        gguf=GEMMA.config.gguf,
        context_size=context_size,
        packaged_context_size=packaged,
    )
    assert needs.context_size == cells
    assert needs.kv_cache_bytes == cells * 18 * 512 * 2


def test_padding_is_said_in_the_formula() -> None:
    needs = model_memory.model_needs(weights_bytes=1, gguf=GEMMA.config.gguf, context_size=2000)
    assert "2048 tokens (2000 padded)" in needs.formula


def test_grouped_query_attention_with_the_head_length_from_the_embedding_width() -> None:
    needs = model_memory.model_needs(weights_bytes=4 * 2**30, gguf=LLAMA, context_size=8192)
    # 8192 x 32 layers x 8 KV heads x (128 + 128) x 2 B = 1 GiB.
    assert needs.kv_cache_bytes == 2**30
    without_kv_heads = {k: v for k, v in LLAMA.items() if not k.endswith("head_count_kv")}
    dense = model_memory.model_needs(weights_bytes=1, gguf=without_kv_heads, context_size=8192)
    assert dense.kv_cache_bytes == 4 * 2**30  # head_count_kv defaults to head_count


def test_per_layer_head_counts_are_summed() -> None:
    hybrid = {
        "general.architecture": "x",
        "x.block_count": "4",
        "x.attention.head_count": "[8, 8, 8, 8]",
        "x.attention.head_count_kv": "[0, 0, 2, 4]",  # two recurrent layers without a cache
        "x.embedding_length": "1024",
        "x.context_length": "4096",
    }
    needs = model_memory.model_needs(weights_bytes=1, gguf=hybrid, context_size=None)
    assert needs.kv_cache_bytes == 4096 * 6 * (128 + 128) * 2
    assert "6 KV heads summed over 4 layers" in needs.formula


def test_numbers_written_as_floats_are_read() -> None:
    floats = {**LLAMA, "llama.block_count": "32.0", "llama.attention.head_count_kv": " 8 "}
    assert model_memory.model_needs(
        weights_bytes=1, gguf=floats, context_size=8192
    ) == model_memory.model_needs(weights_bytes=1, gguf=LLAMA, context_size=8192)


@pytest.mark.parametrize(
    "gguf",
    [
        None,  # a safetensors model: no gguf map
        {},
        {"general.architecture": "mamba", "mamba.block_count": "64"},  # no attention heads
        {**LLAMA, "llama.attention.head_count": "lots"},
        {**LLAMA, "llama.block_count": "0"},
        {k: v for k, v in LLAMA.items() if k != "llama.context_length"},  # no context known
    ],
)
def test_without_usable_metadata_it_is_a_stated_estimate(gguf: dict[str, str] | None) -> None:
    needs = model_memory.model_needs(weights_bytes=1000 * MIB, gguf=gguf, context_size=None)
    assert needs.estimated
    assert needs.context_size is None
    assert needs.kv_cache_bytes == int(1000 * MIB * model_memory.FALLBACK_KV_FACTOR)
    assert needs.formula.startswith("estimate (")
    assert "x weights" in needs.formula


def test_negative_lengths_are_not_lengths() -> None:
    negative = {**SHAPE, "llama.attention.key_length": "-128", "llama.attention.value_length": "-1"}
    needs = model_memory.model_needs(weights_bytes=1, gguf=negative, context_size=8192)
    assert needs.kv_cache_bytes == 2**30  # the head length from the embedding width instead


def test_a_model_without_a_readable_size_has_no_needs() -> None:
    unsized = GEMMA.model_copy(update={"config": GEMMA.config.model_copy(update={"size": None})})
    assert model_memory.needs_of(unsized, context_size=2048) is None


@given(
    first=st.integers(min_value=1, max_value=2**20),
    second=st.integers(min_value=1, max_value=2**20),
)
def test_more_context_never_needs_less(first: int, second: int) -> None:
    small, large = sorted((first, second))
    needs = [
        model_memory.model_needs(weights_bytes=1, gguf=LLAMA, context_size=size).kv_cache_bytes
        for size in (small, large)
    ]
    assert needs[0] <= needs[1]
    # And never less than the unpadded formula (the bound is conservative).
    assert needs[0] >= small * 32 * 8 * 256 * 2


SHAPE = {**LLAMA, "llama.attention.key_length": "128", "llama.attention.value_length": "128"}
METADATA_VALUES = st.one_of(
    st.integers(-600, 600).map(str),
    st.lists(st.integers(-2, 9), max_size=40).map(str),
    st.text(max_size=8),
)


@given(
    # A real shape with any of its values replaced by a number, an array or text.
    metadata=st.fixed_dictionaries(
        {},
        optional={key: st.one_of(st.just(value), METADATA_VALUES) for key, value in SHAPE.items()},
    ),
    context_size=st.one_of(st.none(), st.integers(-5, 2**31 - 1)),
)
def test_any_metadata_gives_needs_at_least_the_weights(
    metadata: dict[str, str], context_size: int | None
) -> None:
    needs = model_memory.model_needs(
        weights_bytes=123 * MIB, gguf=metadata, context_size=context_size
    )
    assert needs.weights_bytes == 123 * MIB
    assert needs.kv_cache_bytes >= 0
    assert needs.total_bytes >= needs.weights_bytes + needs.compute_bytes
    assert needs.estimated == (needs.context_size is None)


def test_a_model_and_its_draft_need_the_sum() -> None:
    main = model_memory.model_needs(weights_bytes=6 * 2**30, gguf=None, context_size=4096)
    draft = model_memory.model_needs(weights_bytes=2**30, gguf=None, context_size=4096)
    both = model_memory.combined([main, draft])
    assert both.total_bytes == main.total_bytes + draft.total_bytes
    assert both.estimated and " + " in both.formula
    assert model_memory.combined([main]) is main
