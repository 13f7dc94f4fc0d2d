"""Model references: model-runner's normalisation table, store-tag matching, the CRD pattern."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmr_operator.dmr import references

# reference/model-runner-api.md §5 (and normalize_test.go's cases).
NORMALISATION = [
    ("gemma3", "ai/gemma3:latest"),
    ("gemma3:v1", "ai/gemma3:v1"),
    ("myorg/model", "myorg/model:latest"),
    ("MyModel", "ai/mymodel:latest"),
    ("MyOrg/MyModel:Q4_K_M", "myorg/mymodel:Q4_K_M"),
    ("registry.example.com/model", "registry.example.com/model:latest"),
    ("registry.example.com:5000/x/y:tag", "registry.example.com:5000/x/y:tag"),
    ("hf.co/org/model:Q4_K_M", "huggingface.co/org/model:Q4_K_M"),
    ("huggingface.co/Org/Model", "huggingface.co/org/model:latest"),
    ("model:", "ai/model:latest"),
    ("  ai/qwen3  ", "ai/qwen3:latest"),
    ("", ""),
    ("   ", ""),
    ("0123456789ab", "0123456789ab"),
    ("sha256:" + "a" * 64, "sha256:" + "a" * 64),
]


@pytest.mark.parametrize(("reference", "expected"), NORMALISATION)
def test_normalize_reference(reference: str, expected: str) -> None:
    assert references.normalize_reference(reference) == expected


def test_ids_resolve_through_the_store_resolver() -> None:
    full = "sha256:" + "b" * 64
    resolver = {"bbbbbbbbbbbb": full, "b" * 64: full}.get
    assert references.normalize_reference("bbbbbbbbbbbb", resolve_id=resolver) == full
    assert references.normalize_reference("cccccccccccc", resolve_id=resolver) == "cccccccccccc"


@pytest.mark.parametrize(
    ("reference", "tag"),
    [
        ("qwen3", "docker.io/ai/qwen3:latest"),
        ("ai/qwen3:14B", "docker.io/ai/qwen3:14B"),
        ("docker.io/ai/qwen3:latest", "docker.io/ai/qwen3:latest"),
        ("index.docker.io/ai/qwen3", "docker.io/ai/qwen3:latest"),
        ("hf.co/org/repo:Q4_K_M", "huggingface.co/org/repo:Q4_K_M"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
    ],
)
def test_qualified_tag(reference: str, tag: str) -> None:
    assert references.qualified_tag(reference) == tag


@pytest.mark.parametrize(
    ("reference", "tag"),
    [
        # Names without a registry take the runner's DEFAULT_REGISTRY (seen on the real server:
        # a pull of ai/gemma3:270m from a loopback registry is stored under its address).
        ("ai/gemma3:270m", "127.0.0.1:5000/ai/gemma3:270m"),
        ("gemma3", "127.0.0.1:5000/ai/gemma3:latest"),
        # A written registry stays; Docker Hub spellings still mean Docker Hub.
        ("registry.example/ai/x:1", "registry.example/ai/x:1"),
        ("docker.io/ai/x:1", "docker.io/ai/x:1"),
        ("hf.co/org/m:Q4_K_M", "huggingface.co/org/m:Q4_K_M"),
    ],
)
def test_qualified_tag_on_a_runner_with_a_default_registry(reference: str, tag: str) -> None:
    assert references.qualified_tag(reference, default_registry="127.0.0.1:5000") == tag
    assert references.tag_matches_reference(tag, reference, default_registry="127.0.0.1:5000")


def test_references_address_the_same_store_model() -> None:
    same = ["ai/qwen3", "ai/qwen3:latest", "docker.io/ai/qwen3:latest", "qwen3", "QWEN3"]
    assert all(references.references_equal(same[0], other) for other in same)
    assert references.tag_matches_reference("docker.io/ai/qwen3:latest", "qwen3")
    assert not references.references_equal("ai/qwen3", "ai/qwen3:14B")
    assert not references.references_equal("ai/qwen3", "myorg/qwen3")
    # Tags are case-sensitive, names are not.
    assert not references.references_equal("ai/qwen3:q4", "ai/qwen3:Q4")


@pytest.mark.parametrize(
    "reference",
    [
        "ai/qwen3",
        "ai/qwen3:14B",
        "hf.co/org/repo:Q4_K_M",
        "registry.example.com:5000/x/y:tag",
        "qwen3",
        "ai/qwen3:0.6B-F16",
        "huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    ],
)
def test_pattern_accepts(reference: str) -> None:
    assert re.fullmatch(references.MODEL_REFERENCE_PATTERN, reference)


@pytest.mark.parametrize(
    "reference",
    [
        "",
        " ",
        "ai/qwen3 ",
        "a b",
        "..",
        "a/../b",
        "x..y",
        "-x",
        "/x",
        "x/",
        "a\x01b",
        "a\nb",
        "ai//qwen3",
        "ai/qwen3:",
        "ai/qwen3:a:b",
    ],
)
def test_pattern_rejects(reference: str) -> None:
    assert not re.fullmatch(references.MODEL_REFERENCE_PATTERN, reference)


def test_pattern_has_no_lookaround_for_kubernetes() -> None:
    # Kubernetes compiles CRD patterns with Go's RE2, which has no look-arounds.
    assert "(?=" not in references.MODEL_REFERENCE_PATTERN
    assert "(?!" not in references.MODEL_REFERENCE_PATTERN


def test_display_name() -> None:
    assert references.display_name("docker.io/ai/qwen3:latest") == "qwen3"
    assert references.display_name("ai/qwen3:14B") == "qwen3:14B"


reference_text = st.text(alphabet=st.sampled_from("abcXYZ019./:-_@ "), min_size=0, max_size=30)


@given(reference_text)
def test_normalisation_is_idempotent(reference: str) -> None:
    once = references.normalize_reference(reference)
    assert references.normalize_reference(once) == once


@given(reference_text)
def test_qualified_tag_is_stable(reference: str) -> None:
    tag = references.qualified_tag(reference)
    assert references.qualified_tag(tag) == tag
    assert references.references_equal(reference, tag)
