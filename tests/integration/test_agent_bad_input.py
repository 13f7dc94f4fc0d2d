"""Bad Agents: rejected at admission with the field named, or held with ConfigValid=False and the
reason (InvalidConfig, SecretInline) in status — no children are created for them, and no
literal secret ever reaches a ConfigMap. Together with test_dmrmodel_bad_input.py this is the
bad-input corpus (more than 60 hostile or malformed manifests)."""

from __future__ import annotations

from typing import Any

import kubernetes

from dmr_operator.testing import cluster
from dmr_operator.testing.waiting import wait_for

PLURAL = "agents"
GOOD = {"agents": {"root": {"model": "auto", "instruction": "help"}}}

CASES: list[tuple[str, Any, str, str]] = [
    ("replicas-negative", {"config": GOOD, "replicas": -1}, "admission", "spec.replicas"),
    ("mode-unknown", {"config": GOOD, "runner": {"mode": "Both"}}, "admission", "spec.runner.mode"),
    (
        "pool-with-gpus",
        {"config": GOOD, "runner": {"mode": "Pool", "gpus": {"count": 1}}},
        "admission",
        "gpus, resources and storage.size are for the sidecar model-runner",
    ),
    ("config-string", {"config": "agents: {}"}, "admission", "spec.config"),
    ("no-config", {"replicas": 1}, "admission", "spec.config"),
    (
        "gpu-vendor",
        {
            "config": GOOD,
            "runner": {"mode": "Sidecar", "gpus": {"resource": "intel.com/gpu", "count": 1}},
        },
        "admission",
        "resource",
    ),
    (
        "gpu-count",
        {"config": GOOD, "runner": {"mode": "Sidecar", "gpus": {"count": 0}}},
        "admission",
        "count",
    ),
    (
        "node-selector-int",
        {"config": GOOD, "nodeSelector": {"gpu": 1}},
        "admission",
        "nodeSelector",
    ),
    (
        "env-inline-secret",
        {"config": GOOD, "env": [{"name": "OPENAI_API_KEY", "value": "sk-live-123"}]},
        "SecretInline",
        "valueFrom.secretKeyRef",
    ),
    (
        "config-inline-token",
        {
            "config": {
                "agents": {
                    "root": {
                        "model": "auto",
                        "toolsets": [
                            {"type": "mcp", "command": "gh", "env": {"GITHUB_TOKEN": "ghp_123"}}
                        ],
                    }
                }
            }
        },
        "SecretInline",
        "GITHUB_TOKEN",
    ),
    (
        "provider-api-key",
        {"config": {**GOOD, "providers": {"p": {"provider": "openai", "api_key": "sk-123"}}}},
        "SecretInline",
        "api_key",
    ),
    (
        "unknown-top-key",
        {"config": {**GOOD, "bogus": 1}},
        "InvalidConfig",
        "unknown top-level key 'bogus'",
    ),
    ("no-agents", {"config": {"models": {}}}, "InvalidConfig", "config.agents"),
    (
        "agent-unknown-key",
        {"config": {"agents": {"root": {"model": "auto", "frobnicate": True}}}},
        "InvalidConfig",
        "frobnicate",
    ),
    (
        "keepalive-number",
        {
            "config": {
                "agents": {"root": {"model": "m"}},
                "models": {
                    "m": {
                        "provider": "dmr",
                        "model": "ai/smollm2",
                        "provider_opts": {"keep_alive": 5},
                    }
                },
            }
        },
        "InvalidConfig",
        "keep_alive must be a string",
    ),
    (
        "handoff-missing",
        {"config": {"agents": {"root": {"model": "auto", "handoffs": ["nobody"]}}}},
        "InvalidConfig",
        "nobody",
    ),
]


def test_bad_agents_are_refused_and_leak_nothing(
    api_client: Any, namespace: str, operator: Any
) -> None:
    assert len(CASES) >= 15  # with the 54 DMRModel cases: a corpus of more than 60
    objects = cluster.CustomObjects(api_client, namespace)
    held = []
    for name, spec, where, fragment in CASES:
        try:
            objects.create(
                PLURAL,
                {
                    "apiVersion": "dmr.dev/v1alpha1",
                    "kind": "Agent",
                    "metadata": {"name": name},
                    "spec": spec,
                },
            )
        except kubernetes.client.ApiException as error:
            assert where == "admission", (
                f"{name}: rejected at admission, expected {where}: {error.body}"
            )
            assert fragment in error.body, f"{name}: {fragment!r} not in {error.body}"
            continue
        assert where != "admission", f"{name}: admitted, but the schema should have refused it"
        held.append((name, where, fragment))

    for name, reason, fragment in held:

        def refused(name: str = name) -> dict[str, Any] | None:
            conditions = objects.status(PLURAL, name).get("conditions") or []
            valid = next((c for c in conditions if c["type"] == "ConfigValid"), None)
            return valid if valid and valid["status"] == "False" else None

        valid = wait_for(refused, timeout=15, message=f"{name}: ConfigValid=False")
        assert valid["reason"] == reason, (name, valid)
        assert fragment in valid["message"], (name, fragment, valid["message"])

    core: Any = kubernetes.client.CoreV1Api(api_client)
    for config_map in core.list_namespaced_config_map(namespace).items:
        for text in (config_map.data or {}).values():
            for secret in ("sk-live-123", "ghp_123", "sk-123"):
                assert secret not in text, (
                    f"{secret} leaked into ConfigMap {config_map.metadata.name}"
                )
    assert "Traceback" not in operator.log()
