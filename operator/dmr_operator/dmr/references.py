"""Model references the way model-runner reads them (reference/model-runner-api.md §5).

model-runner normalises every reference before it looks a model up (``qwen3`` ->
``ai/qwen3:latest``, ``hf.co/`` -> ``huggingface.co/``) and its store returns tags fully
qualified (``docker.io/ai/qwen3:latest``). The CRD models (``dmr_operator.api``) use
MODEL_REFERENCE_PATTERN, the reconciler compares references through ``references_equal`` and
``tag_matches_reference``, and the emulator resolves its store with the same functions. Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

DEFAULT_ORG: Final = "ai"
DEFAULT_TAG: Final = "latest"
DEFAULT_DOMAIN: Final = "docker.io"
# docker/distribution treats the legacy Hub name as the default domain.
LEGACY_DEFAULT_DOMAIN: Final = "index.docker.io"

# A path component: alphanumerics joined by ".", "_", "__" or runs of "-" (docker/distribution's
# grammar, upper case allowed because model-runner lower-cases names itself).
_COMPONENT: Final = r"[A-Za-z0-9]+(?:(?:[._]|__|-+)[A-Za-z0-9]+)*"
_TAG: Final = r"[A-Za-z0-9_]+(?:(?:[.]|-+)[A-Za-z0-9_]+)*"
# RE2-compatible (Kubernetes validates CRD patterns with Go's regexp): no look-arounds.
MODEL_REFERENCE_PATTERN: Final = (
    rf"^(?:{_COMPONENT}(?::[0-9]{{1,5}})?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    rf"(?::{_TAG})?(?:@sha256:[a-f0-9]{{64}})?$"
)
MODEL_REFERENCE_MAX_LENGTH: Final = 512

_HEX: Final = frozenset("0123456789abcdef")
_DIGEST_PREFIX: Final = "sha256:"

IdResolver = Callable[[str], str | None]
"""Maps a short ID (12 hex), a full ID (64 hex) or ``sha256:<hex>`` to a stored model's full
ID, or None when no local model matches (model-runner's ``resolveID`` needs its store)."""


def looks_like_id(text: str) -> bool:
    """12 or 64 lower-case hex characters: a (short) model ID."""
    return len(text) in (12, 64) and set(text) <= _HEX


def looks_like_digest(text: str) -> bool:
    """``sha256:`` followed by exactly 64 lower-case hex characters."""
    hex_part = text.removeprefix(_DIGEST_PREFIX)
    return text.startswith(_DIGEST_PREFIX) and len(hex_part) == 64 and set(hex_part) <= _HEX


def normalize_reference(reference: str, *, resolve_id: IdResolver | None = None) -> str:
    """model-runner's ``normalizeModelName``.

    IDs and digests are returned unchanged unless ``resolve_id`` maps them to a stored model's
    full ID (the runner does that against its store).
    """
    reference = reference.strip()
    if not reference:
        return reference
    if reference.startswith("hf.co/"):
        reference = "huggingface.co/" + reference[len("hf.co/") :]
    if looks_like_id(reference) or looks_like_digest(reference):
        resolved = resolve_id(reference) if resolve_id is not None else None
        return resolved or reference
    last_slash = reference.rfind("/")
    last_colon = reference.rfind(":")
    name, tag = reference, DEFAULT_TAG
    if last_colon > last_slash:
        name = reference[:last_colon]
        tag = reference[last_colon + 1 :] or DEFAULT_TAG
    first_slash = name.find("/")
    has_registry = first_slash > 0 and "." in name[:first_slash]
    if not has_registry and "/" not in name:
        name = f"{DEFAULT_ORG}/{name}"
    return f"{name.lower()}:{tag}"


def qualified_tag(reference: str, *, default_registry: str = DEFAULT_DOMAIN) -> str:
    """The fully qualified form model-runner's store keeps and returns for a reference.

    ``ai/qwen3`` -> ``docker.io/ai/qwen3:latest``; ``index.docker.io/ai/x:1`` ->
    ``docker.io/ai/x:1``; ``hf.co/org/m:Q4_K_M`` -> ``huggingface.co/org/m:Q4_K_M``. IDs and
    digest references (``name@sha256:...``) are returned as normalised. A runner started with
    ``DEFAULT_REGISTRY`` (a mirror) puts that host where no domain is written:
    ``ai/qwen3`` -> ``mirror:5000/ai/qwen3:latest`` with ``default_registry="mirror:5000"``.
    """
    normalized = normalize_reference(reference)
    if not normalized or "@" in normalized or looks_like_id(normalized):
        return normalized
    if looks_like_digest(normalized):
        return normalized
    last_colon = normalized.rfind(":")
    name, tag = normalized[:last_colon], normalized[last_colon + 1 :]
    first, _, rest = name.partition("/")
    has_domain = bool(rest) and ("." in first or ":" in first or first == "localhost")
    if has_domain:
        domain, path = first, rest
        explicit_org = "/" in rest
    else:
        domain, path = default_registry, name
        explicit_org = bool(rest)
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if not explicit_org and path.startswith("library/"):
        path = f"{DEFAULT_ORG}/{path[len('library/') :]}"
    return f"{domain}/{path}:{tag}"


def references_equal(first: str, second: str, *, default_registry: str = DEFAULT_DOMAIN) -> bool:
    """Whether two references address the same model in model-runner's store."""
    return qualified_tag(first, default_registry=default_registry) == qualified_tag(
        second, default_registry=default_registry
    )


def tag_matches_reference(
    store_tag: str, reference: str, *, default_registry: str = DEFAULT_DOMAIN
) -> bool:
    """Whether a tag returned by the runner (``docker.io/ai/qwen3:latest``) is ``reference``."""
    return references_equal(store_tag, reference, default_registry=default_registry)


def display_name(reference: str) -> str:
    """The short form the docker CLI prints: no ``docker.io/``, no ``ai/``, no ``:latest``."""
    text = qualified_tag(reference)
    text = text.removeprefix(f"{DEFAULT_DOMAIN}/").removeprefix(f"{DEFAULT_ORG}/")
    return text.removesuffix(f":{DEFAULT_TAG}")
