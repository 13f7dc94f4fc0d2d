"""Generated CRDs: not stale, structural, and the schema carries model-runner's rules."""

from __future__ import annotations

from pathlib import Path

import yaml

from dmr_operator.api import crdgen

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_up_to_date() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, content in crdgen.generated_files_with_docs(ROOT).items()
        if not path.exists() or path.read_text() != content
    ]
    assert not stale, f"regenerate with `dmr-operator crds`: {stale}"


def walk(node: object, path: str = "") -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(walk(value, f"{path}[{index}]"))
    return found


def test_schemas_are_structural() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for where, node in walk(schema):
            assert "$ref" not in node and "anyOf" not in node and "title" not in node, (path, where)
            if "properties" in node:
                assert "additionalProperties" not in node, (path, where)
                assert node.get("type") == "object", (path, where)


def test_every_field_has_a_description() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        schema = yaml.safe_load(path.read_text())["spec"]["versions"][0]["schema"][
            "openAPIV3Schema"
        ]
        for where, node in walk(schema["properties"]["spec"], ".spec"):
            for name, child in (node.get("properties") or {}).items():
                assert child.get("description"), f"{path.name}: {where}.{name} has no description"


def test_chart_copy_is_the_same_crd() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        template = (ROOT / "charts/dmr-operator/templates/crds" / path.name).read_text()
        lines = [
            line for line in template.splitlines() if "{{" not in line and "helm.sh/" not in line
        ]
        lines = [line for line in lines if line.strip() != "annotations:"]
        assert yaml.safe_load("\n".join(lines)) == yaml.safe_load(path.read_text())


def test_dmrmodel_printer_columns() -> None:
    crd = yaml.safe_load((ROOT / "crds/dmrmodels.dmr.dev.yaml").read_text())
    names = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert names == ["Model", "Backend", "Ctx", "KeepAlive", "Runners", "Placed", "Phase", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["dmrm"]
    assert crd["spec"]["names"]["categories"] == ["dmr"]
