"""The CRD reference in Markdown (docs/crd-reference.md), from the same models as the CRDs.

Every spec and status field with its type, default, constraints and description; the description
already names the model-runner wire key in brackets. ``dmr-operator crds`` writes it next to the
CRDs and the staleness test covers it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from dmr_operator.api import crdgen

_CONSTRAINTS = (
    ("minimum", ">="),
    ("maximum", "<="),
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("maxItems", "max items"),
    ("pattern", "pattern"),
)


def render_reference(models: list[type[BaseModel]] | None = None) -> str:
    lines = [
        "# CRD reference",
        "",
        "Generated from the pydantic models in `operator/dmr_operator/api/v1alpha1/` by",
        "`dmr-operator crds`; do not edit. `kubectl explain dmrmodel.spec` shows the same text.",
        "Names in [brackets] are the model-runner `_configure` wire keys a field maps to.",
        "",
    ]
    for model in models or crdgen.served_kinds():
        schema = crdgen.structural_schema(model)
        facts: Mapping[str, Any] = model.CRD  # type: ignore[attr-defined]
        lines += [
            f"## {facts['kind']} (`{facts['plural']}.dmr.dev`, v1alpha1)",
            "",
            (model.__doc__ or "").strip(),
            "",
        ]
        short = ", ".join(facts.get("short_names", []))
        if short:
            lines += [f"Short names: `{short}`. Category: `dmr` (`kubectl get dmr`).", ""]
        for part in ("spec", "status"):
            lines += [
                f"### {facts['kind']}.{part}",
                "",
                "| field | type | default | constraints | description |",
                "|---|---|---|---|---|",
            ]
            section = schema["properties"][part]
            lines += [_row(path, node, required) for path, node, required in _fields(section)]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _fields(
    node: Mapping[str, Any], prefix: str = ""
) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    required = set(node.get("required") or ())
    for name, child in (node.get("properties") or {}).items():
        path = f"{prefix}{name}"
        yield path, child, name in required
        if child.get("type") == "object" and "properties" in child:
            yield from _fields(child, f"{path}.")
        items = child.get("items")
        if child.get("type") == "array" and isinstance(items, Mapping) and "properties" in items:
            yield from _fields(items, f"{path}[].")


def _row(path: str, node: Mapping[str, Any], required: bool) -> str:
    kind = _type(node)
    default = f"`{node['default']}`" if "default" in node else ("required" if required else "")
    constraints = [
        f"{label} `{node[key]}`" if len(str(node[key])) <= 60 else f"{label} (see the CRD)"
        for key, label in _CONSTRAINTS
        if key in node
    ]
    if "enum" in node:
        constraints.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    description = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
    cells = [f"`{path}`", kind, default, "; ".join(constraints).replace("|", "\\|"), description]
    return "| " + " | ".join(cells) + " |"


def _type(node: Mapping[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"array of {_type(node.get('items') or {})}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    return kind
