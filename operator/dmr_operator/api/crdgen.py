"""Generate CustomResourceDefinitions from the pydantic models (``dmr-operator crds``).

The models in ``api.v1alpha1`` are the only place the schema is written. This module turns
pydantic's JSON Schema into a Kubernetes *structural* schema: ``$ref`` inlined, ``title`` dropped,
``Optional`` unwrapped, free-form objects marked ``x-kubernetes-preserve-unknown-fields``, and
int-or-string fields marked as such. It writes ``crds/<plural>.<group>.yaml`` and the chart's copy
under ``charts/dmr-operator/templates/crds/`` (templates, not the chart's ``crds/`` folder,
because Helm never upgrades files there). A unit test fails when the files are stale.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dmr_operator import constants

# Keys of JSON Schema that a Kubernetes structural schema does not accept or that only add noise.
_DROPPED_KEYS = frozenset({"title", "$defs", "discriminator", "examples"})

_CHART_CRD_HEADER = "{{- if .Values.crds.install }}\n"
_CHART_CRD_FOOTER = "{{- end }}\n"
# The chart's helper adds its standard labels and, with crds.keep, helm.sh/resource-policy.
_CHART_CRD_METADATA = '  {{- include "dmr-operator.crdMetadata" . | nindent 2 }}\n'


def served_kinds() -> list[type[BaseModel]]:
    """The top-level models that become CRDs, in a stable order."""
    from dmr_operator.api.v1alpha1 import agent, dmrmodel

    return [dmrmodel.DMRModel, agent.Agent]


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI v3 schema of ``model`` in the form the Kubernetes API server accepts."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions: Mapping[str, Any] = raw.get("$defs", {})
    schema: dict[str, Any] = _convert(raw, definitions)
    return schema


def _convert(node: Any, definitions: Mapping[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "anyOf" in node:
        node = _collapse_any_of(node)
    if "$ref" in node:
        target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
        # Keys written next to the $ref (a field's description) win over the definition's own.
        node = {**copy.deepcopy(target), **node}
    if node.get("additionalProperties") is False:
        # Structural schemas forbid properties + additionalProperties; the API server prunes
        # unknown fields instead (and kubectl's client-side validation reports them).
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("additionalProperties") is True or (
        node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
    ):
        node.pop("additionalProperties", None)
        node["type"] = "object"
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node["type"] = "object"
        node.pop("additionalProperties", None)
    converted = {
        key: (_convert(value, definitions) if key not in ("default", "enum") else value)
        for key, value in node.items()
        if key not in _DROPPED_KEYS
    }
    if "properties" in converted:
        converted["properties"] = {
            name: _convert(schema, definitions) for name, schema in node["properties"].items()
        }
    return converted


def _collapse_any_of(node: dict[str, Any]) -> dict[str, Any]:
    """Unwrap ``X | None`` and turn ``int | str`` into an int-or-string schema."""
    options = [option for option in node.pop("anyOf") if option.get("type") != "null"]
    if node.get("x-kubernetes-int-or-string"):
        return node
    if len(options) == 1:
        return {**options[0], **node}
    types = {option.get("type") for option in options}
    if types == {"integer", "string"}:
        return {**node, "x-kubernetes-int-or-string": True}
    raise ValueError(f"cannot express anyOf {options!r} in a structural schema")


def build_crd(model: type[BaseModel]) -> dict[str, Any]:
    """The CustomResourceDefinition for one top-level kind."""
    facts: Mapping[str, Any] = model.CRD  # type: ignore[attr-defined]
    schema = structural_schema(model)
    properties = schema["properties"]
    # apiVersion, kind and metadata are the API server's business; keep only spec and status.
    openapi = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": properties["spec"],
            "status": properties["status"],
        },
        "required": ["spec"],
    }
    plural = facts["plural"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{constants.GROUP}"},
        "spec": {
            "group": constants.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": facts["kind"],
                "listKind": f"{facts['kind']}List",
                "plural": plural,
                "singular": facts["singular"],
                "shortNames": list(facts.get("short_names", [])),
                "categories": list(facts.get("categories", [])),
            },
            "versions": [
                {
                    "name": constants.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(facts["printer_columns"]),
                    "schema": {"openAPIV3Schema": openapi},
                }
            ],
        },
    }


def render_yaml(crd: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(crd), sort_keys=False, width=100, allow_unicode=True)


def render_chart_template(crd: Mapping[str, Any]) -> str:
    """The chart's copy: the same CRD inside the ``crds.install`` switch, chart-labelled."""
    body = render_yaml(crd)
    name_line = f"  name: {crd['metadata']['name']}\n"
    body = body.replace(name_line, name_line + _CHART_CRD_METADATA, 1)
    return _CHART_CRD_HEADER + body + _CHART_CRD_FOOTER


def generated_files(root: Path) -> dict[Path, str]:
    """Every generated file under the repository root ``root`` with its content."""
    files: dict[Path, str] = {}
    for model in served_kinds():
        crd = build_crd(model)
        file_name = f"{crd['metadata']['name']}.yaml"
        files[root / "crds" / file_name] = render_yaml(crd)
        files[root / "charts" / "dmr-operator" / "templates" / "crds" / file_name] = (
            render_chart_template(crd)
        )
    return files


def generated_files_with_docs(root: Path) -> dict[Path, str]:
    from dmr_operator.api import reference

    return {
        **generated_files(root),
        root / "docs" / "crd-reference.md": reference.render_reference(),
    }


def write_files(files: Mapping[Path, str]) -> Iterable[Path]:
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            yield path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=Path.cwd(),
        help="repository root to write crds/ and the chart's templates/crds/ under (default: .)",
    )
    parser.add_argument(
        "--stdout", action="store_true", help="print the CRDs instead of writing files"
    )


def crds_command(args: argparse.Namespace) -> int:
    if args.stdout:
        print("---\n".join(render_yaml(build_crd(model)) for model in served_kinds()), end="")
        return 0
    for path in write_files(generated_files_with_docs(args.root)):
        print(f"wrote {path}")
    return 0
