"""Agent model resolution, docker-agent YAML rendering, validation, hashing and status.

Golden file: tests/unit/golden/agent-rendered.yaml. After an intended change of the rendering,
regenerate it with ``UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_agent_rendering.py`` and
review the diff like code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import agent as agent_models
from dmr_operator.reconcile import agent_config, agent_status

GOLDEN = Path(__file__).parent / "golden" / "agent-rendered.yaml"
POOL = "http://dmr-default.team.svc:80/v1"

QWEN = agent_models.ServedModel(
    name="qwen",
    model="ai/qwen3:14B",
    backend="llama.cpp",
    mode="completion",
    context_size=32768,
    thinking_budget=8192,
    ready=True,
    endpoint=POOL,
    created="2026-01-01T00:00:00Z",
)
CODER = agent_models.ServedModel(
    name="coder",
    model="huggingface.co/qwen/qwen2.5-coder-7b-instruct:latest",
    backend="vllm",
    mode="completion",
    context_size=16384,
    thinking_budget=2048,
    ready=True,
    endpoint="http://dmr-vllm.team.svc:80/v1",
    created="2026-01-02T00:00:00Z",
)
EMBED = agent_models.ServedModel(
    name="gemma-embed",
    model="ai/embeddinggemma:latest",
    backend="llama.cpp",
    mode="embedding",
    context_size=None,
    thinking_budget=None,
    ready=True,
    endpoint=POOL,
    created="2026-01-03T00:00:00Z",
)
RERANKER = agent_models.ServedModel(
    name="reranker",
    model="huggingface.co/ggml-org/qwen3-reranker-0.6b-q8_0-gguf:latest",
    backend="llama.cpp",
    mode="reranking",
    context_size=8192,
    thinking_budget=None,
    ready=True,
    endpoint=POOL,
    created="2026-01-04T00:00:00Z",
)
CATALOGUE = [RERANKER, EMBED, CODER, QWEN]


def two_agent_config() -> dict[str, Any]:
    """Handoffs, a model by dmrModel, one inline dmr/…, one auto, RAG with embed + rerank."""
    return {
        "agents": {
            "root": {
                "model": "local",
                "description": "Plans and delegates",
                "instruction": "You coordinate.",
                "handoffs": ["reviewer"],
                "fallback": {"models": ["cloud"]},
                "toolsets": [{"type": "rag", "ref": "docs"}, {"type": "filesystem"}],
                "hooks": {"on_agent_switch": [{"type": "builtin", "command": "unload"}]},
            },
            "reviewer": {
                "model": "dmr/hf.co/Qwen/Qwen2.5-Coder-7B-Instruct",
                "instruction": "You review code.",
                "handoffs": ["root", "helper"],
            },
            "helper": {"instruction": "You answer quick questions.", "model": "auto"},
        },
        "models": {
            "local": {"dmrModel": "qwen", "max_tokens": 4096, "temperature": 0.2},
            "reranker": {
                "provider": "dmr",
                "model": "hf.co/ggml-org/qwen3-reranker-0.6b-q8_0-gguf",
            },
            "cloud": {"provider": "openai", "model": "gpt-4o", "max_tokens": 2048},
        },
        "rag": {
            "docs": {
                "docs": ["/work/docs"],
                "strategies": [
                    {
                        "type": "chunked-embeddings",
                        "embedding_model": "dmr/ai/embeddinggemma",
                        "database": "/data/docs.db",
                        "limit": 20,
                    },
                    {"type": "bm25", "database": "/data/bm25.db"},
                ],
                "results": {"reranking": {"model": "reranker", "threshold": 0.5}, "limit": 5},
            }
        },
        "metadata": {"author": "team", "x-custom": {"kept": True}},
    }


def render(config: dict[str, Any], served: list[agent_models.ServedModel] = CATALOGUE) -> str:
    resolution = agent_models.resolve_models(config, served, default_model=None)
    return agent_config.render_agent_config(config, resolution)


def test_golden_two_agent_config() -> None:
    config = two_agent_config()
    rendered = render(config)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text()


def test_rendered_config_passes_docker_agent_load_rules() -> None:
    config = two_agent_config()
    rendered = yaml.safe_load(render(config))
    assert agent_config.validate_agent_config(rendered) == []
    models = rendered["models"]
    for alias in ("local", "reranker", "coder", "gemma-embed", "qwen"):
        entry = models[alias]
        assert "dmrModel" not in entry
        assert entry["provider"] == "dmr"
        assert entry["base_url"].endswith("/v1")
    # Every model reference of the rendered file is a models: alias (nothing left to discover).
    refs = [agent["model"] for agent in rendered["agents"].values()]
    refs += rendered["agents"]["root"]["fallback"]["models"]
    refs.append(rendered["rag"]["docs"]["strategies"][0]["embedding_model"])
    refs.append(rendered["rag"]["docs"]["results"]["reranking"]["model"])
    assert all(ref in models for ref in refs), refs


def test_everything_else_passes_through_untouched() -> None:
    config = two_agent_config()
    rendered = yaml.safe_load(render(config))
    assert rendered["metadata"] == config["metadata"]
    assert rendered["models"]["cloud"] == config["models"]["cloud"]
    assert rendered["agents"]["root"]["hooks"] == config["agents"]["root"]["hooks"]
    assert rendered["rag"]["docs"]["strategies"][1] == config["rag"]["docs"]["strategies"][1]
    assert rendered["models"]["local"]["temperature"] == 0.2


def test_rendering_is_deterministic_and_does_not_mutate_input() -> None:
    config = two_agent_config()
    before = yaml.safe_dump(config)
    assert render(config) == render(two_agent_config())
    assert yaml.safe_dump(config) == before


def test_vllm_thinking_budget_goes_per_request() -> None:
    rendered = yaml.safe_load(render(two_agent_config()))
    assert rendered["models"]["coder"]["provider_opts"] == {
        "context_size": 16384,
        "extra_body": {"thinking_token_budget": 2048},
    }
    # llama.cpp budgets are configured on the runner by the DMRModel, not per request.
    assert "extra_body" not in rendered["models"]["local"]["provider_opts"]


def test_disabled_vllm_thinking_also_turns_templates_off() -> None:
    served = [dataclasses.replace(CODER, thinking_budget=0)]
    config = {
        "agents": {"root": {"model": "c"}},
        "models": {
            "c": {
                "dmrModel": "coder",
                "provider_opts": {"extra_body": {"chat_template_kwargs": {"x": 1}, "top_k": 5}},
            }
        },
    }
    rendered = yaml.safe_load(render(config, served))
    assert rendered["models"]["c"]["provider_opts"]["extra_body"] == {
        "chat_template_kwargs": {"x": 1, "enable_thinking": False},
        "top_k": 5,
        "thinking_token_budget": 0,
    }


def test_engine_options_are_dropped_and_reported() -> None:
    config = {
        "agents": {"root": {"model": "m"}},
        "models": {
            "m": {
                "dmrModel": "qwen",
                "provider_opts": {"keep_alive": "30m", "context_size": 4096, "supports_pdf": True},
            }
        },
    }
    resolution = agent_models.resolve_models(config, CATALOGUE, default_model=None)
    rendered = yaml.safe_load(agent_config.render_agent_config(config, resolution))
    assert rendered["models"]["m"]["provider_opts"] == {"supports_pdf": True, "context_size": 32768}
    (warning,) = agent_config.ignored_option_warnings(resolution)
    assert "context_size, keep_alive" in warning and "qwen" in warning


def test_sidecar_mode_points_every_dmr_model_at_the_local_runner() -> None:
    config = two_agent_config()
    resolution = agent_models.resolve_models(
        config, CATALOGUE, default_model=None, require_ready=False
    )
    rendered = yaml.safe_load(
        agent_config.render_agent_config(
            config, resolution, base_url_override=agent_config.SIDECAR_BASE_URL
        )
    )
    urls = {m.get("base_url") for m in rendered["models"].values() if m["provider"] == "dmr"}
    assert urls == {"http://127.0.0.1:12434/v1"}


# --- resolution -----------------------------------------------------------------------------


def by_alias(resolution: agent_models.Resolution) -> dict[str, agent_models.ResolvedModel]:
    return {m.alias: m for m in resolution.models}


def test_resolution_lists_every_dmr_model() -> None:
    resolution = agent_models.resolve_models(two_agent_config(), CATALOGUE, default_model=None)
    served = {alias: m.served.name for alias, m in by_alias(resolution).items() if m.served}
    assert served == {
        "local": "qwen",
        "reranker": "reranker",
        "coder": "coder",
        "gemma-embed": "gemma-embed",
        "qwen": "qwen",
    }
    assert resolution.all_ready


def test_missing_dmrmodel_is_a_problem_not_an_exception() -> None:
    config = {"agents": {"root": {"model": "m"}}, "models": {"m": {"dmrModel": "nope"}}}
    resolution = agent_models.resolve_models(config, CATALOGUE, default_model=None)
    model = by_alias(resolution)["m"]
    assert model.problem == agent_models.Problem.DMRMODEL_NOT_FOUND
    assert "'nope'" in model.message
    assert not resolution.all_ready
    rendered = yaml.safe_load(agent_config.render_agent_config(config, resolution))
    assert rendered["models"]["m"] == {}  # dmrModel removed: docker-agent rejects unknown keys


def test_mode_mismatch_for_embedding_model_used_by_an_agent() -> None:
    config = {"agents": {"root": {"model": "dmr/ai/embeddinggemma"}}}
    resolution = agent_models.resolve_models(config, CATALOGUE, default_model=None)
    (model,) = resolution.models
    assert model.problem == agent_models.Problem.MODE_MISMATCH
    assert "gemma-embed" in model.message


def test_inline_reference_matches_by_normalised_reference() -> None:
    config = {"agents": {"root": {"model": "dmr/QWEN3:14B"}}}  # ai/ and lower-case name
    served = [dataclasses.replace(QWEN, model="ai/qwen3:14B")]
    resolution = agent_models.resolve_models(config, served, default_model=None)
    assert resolution.rewrites == ((("agents", "root", "model"), "qwen"),)


def test_auto_prefers_the_default_model_when_ready() -> None:
    config: dict[str, Any] = {"agents": {"root": {}}}
    resolution = agent_models.resolve_models(
        config, CATALOGUE, default_model="dmr/hf.co/qwen/qwen2.5-coder-7b-instruct"
    )
    assert resolution.rewrites == ((("agents", "root", "model"), "coder"),)


def test_auto_falls_back_to_oldest_ready_completion_model() -> None:
    config: dict[str, Any] = {"agents": {"root": {"model": "auto"}}}
    not_ready_default = [dataclasses.replace(CODER, ready=False), QWEN, EMBED]
    resolution = agent_models.resolve_models(
        config, not_ready_default, default_model="hf.co/qwen/qwen2.5-coder-7b-instruct"
    )
    assert resolution.rewrites == ((("agents", "root", "model"), "qwen"),)


def test_auto_with_nothing_ready_says_so() -> None:
    config: dict[str, Any] = {"agents": {"root": {}}}
    resolution = agent_models.resolve_models(
        config, [dataclasses.replace(QWEN, ready=False), EMBED], default_model=None
    )
    (model,) = resolution.models
    assert model.problem == agent_models.Problem.NO_MODEL_AVAILABLE
    # Sidecar mode configures the models itself: pool readiness does not matter.
    sidecar = agent_models.resolve_models(
        config, [dataclasses.replace(QWEN, ready=False)], default_model=None, require_ready=False
    )
    assert sidecar.rewrites == ((("agents", "root", "model"), "qwen"),)


def test_operator_alias_never_collides_with_a_user_alias() -> None:
    config = {
        "agents": {"root": {"model": "dmr/ai/qwen3:14B"}},
        "models": {"qwen": {"provider": "openai", "model": "gpt-4o"}},
    }
    resolution = agent_models.resolve_models(config, CATALOGUE, default_model=None)
    assert resolution.rewrites == ((("agents", "root", "model"), "qwen-dmr"),)


def test_provider_entry_of_type_dmr_counts_as_dmr() -> None:
    config = {
        "agents": {"root": {"model": "m"}},
        "providers": {"mine": {"provider": "dmr", "base_url": "http://elsewhere/engines/v1"}},
        "models": {"m": {"provider": "mine", "model": "ai/qwen3:14B"}},
    }
    rendered = yaml.safe_load(render(config))
    assert rendered["models"]["m"]["provider"] == "dmr"
    assert rendered["models"]["m"]["base_url"] == POOL


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"agents": {"root": {"model": "x/y"}}, "extra": 1}, "unknown top-level key 'extra'"),
        ({"agents": {"root": {"modle": "x/y"}}}, "unknown key 'modle'"),
        ({"agents": {}}, "at least one agent"),
        ({"agents": {"root": {"model": "nope"}}}, "neither a models: alias"),
        ({"agents": {"root": {"handoffs": ["ghost"]}}}, "no agent named 'ghost'"),
        (
            {
                "agents": {"root": {"model": "m"}},
                "models": {
                    "m": {"provider": "dmr", "model": "ai/x", "provider_opts": {"keep_alive": 300}}
                },
            },
            "keep_alive must be a string",
        ),
        (
            {
                "agents": {"root": {"model": "m"}},
                "models": {"m": {"dmrModel": "q", "provider_opts": {"keep_alive": "5 minutes"}}},
            },
            "invalid keep_alive duration",
        ),
        (
            {
                "agents": {"root": {"model": "m"}},
                "models": {"m": {"dmrModel": "q", "thinking_budget": "huge"}},
            },
            "thinking_budget",
        ),
        (
            {
                "agents": {"root": {"model": "m"}},
                "models": {
                    "m": {
                        "dmrModel": "q",
                        "provider_opts": {
                            "runtime_flags": ["--threads", "8"],
                            "raw_runtime_flags": "-t 8",
                        },
                    }
                },
            },
            "cannot set both runtime_flags and raw_runtime_flags",
        ),
    ],
)
def test_validation_problems(config: dict[str, Any], expected: str) -> None:
    problems = agent_config.validate_agent_config(config)
    assert any(expected in problem for problem in problems), problems


def test_non_dmr_provider_opts_are_not_judged_by_dmr_rules() -> None:
    config = {
        "agents": {"root": {"model": "m"}},
        "models": {
            "m": {"provider": "openai", "model": "gpt-4o", "provider_opts": {"keep_alive": 1}}
        },
    }
    assert agent_config.validate_agent_config(config) == []


# --- config hash ------------------------------------------------------------------------------


def spec_of(config: dict[str, Any], **fields: Any) -> agent_api.AgentSpec:
    return agent_api.AgentSpec.model_validate({"config": config, **fields})


def test_hash_changes_when_a_dmrmodel_context_size_changes() -> None:
    config = two_agent_config()
    spec = spec_of(config)
    before = agent_config.config_hash(rendered_config=render(config), spec=spec)
    bigger = [dataclasses.replace(QWEN, context_size=65536), CODER, EMBED, RERANKER]
    after = agent_config.config_hash(rendered_config=render(config, bigger), spec=spec)
    assert before != after
    assert before == agent_config.config_hash(rendered_config=render(config), spec=spec)


def test_hash_follows_image_and_env_but_not_replicas() -> None:
    config = two_agent_config()
    rendered = render(config)
    base = agent_config.config_hash(rendered_config=rendered, spec=spec_of(config))
    scaled = agent_config.config_hash(rendered_config=rendered, spec=spec_of(config, replicas=5))
    image = agent_config.config_hash(
        rendered_config=rendered, spec=spec_of(config, image="docker/docker-agent:edge")
    )
    env = agent_config.config_hash(
        rendered_config=rendered, spec=spec_of(config, env=[{"name": "A", "value": "1"}])
    )
    assert base == scaled
    assert len({base, image, env}) == 3


# --- status -----------------------------------------------------------------------------------


def status_for(
    config: dict[str, Any],
    *,
    served: list[agent_models.ServedModel] = CATALOGUE,
    spec_fields: dict[str, Any] | None = None,
    replicas: int = 1,
    ready_replicas: int = 1,
    pods: list[agent_status.PodFacts] | None = None,
    sharing: list[str] | None = None,
    env_problems: list[str] | None = None,
) -> dict[str, Any]:
    spec = spec_of(config, **(spec_fields or {}))
    resolution = agent_models.resolve_models(config, served, default_model=None)
    return agent_status.agent_status(
        spec=spec,
        generation=3,
        resolution=resolution,
        config_problems=agent_config.validate_agent_config(config),
        env_problems=env_problems or [],
        replicas=replicas,
        ready_replicas=ready_replicas,
        pods=pods or [],
        agents_sharing_runners=sharing or [],
        config_hash="abc",
        previous_conditions=None,
        now="2026-01-05T00:00:00Z",
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_status_ready() -> None:
    status = status_for(two_agent_config())
    assert status["phase"] == "Ready"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "ModelsReady": "True",
        "ConfigValid": "True",
        "Available": "True",
        "Ready": "True",
    }
    assert status["readyModels"] == "5/5"
    assert status["readyOfDesired"] == "1/1"
    assert {m["alias"]: m["dmrModel"] for m in status["models"]}["local"] == "qwen"
    assert status["observedGeneration"] == 3


def test_status_names_the_missing_dmrmodel() -> None:
    served = [m for m in CATALOGUE if m.name != "reranker"]
    status = status_for(two_agent_config(), served=served, replicas=0, ready_replicas=0)
    models_ready = condition(status, "ModelsReady")
    assert models_ready["reason"] == "DMRModelNotFound"
    assert "hf.co/ggml-org/qwen3-reranker" in models_ready["message"]
    assert status["phase"] == "Pending"
    assert condition(status, "Available")["reason"] == "WaitingForModels"


def test_status_waits_for_models_that_are_not_ready() -> None:
    served = [dataclasses.replace(QWEN, ready=False), CODER, EMBED, RERANKER]
    status = status_for(two_agent_config(), served=served, replicas=0, ready_replicas=0)
    assert condition(status, "ModelsReady")["reason"] == "ModelsNotReady"
    assert "qwen" in condition(status, "ModelsReady")["message"]


def test_status_inline_secret_fails_config() -> None:
    status = status_for(two_agent_config(), env_problems=["env[0] API_KEY: literal value"])
    assert condition(status, "ConfigValid")["reason"] == "SecretInline"
    assert status["phase"] == "Failed"


def test_status_unschedulable_gpu_pod() -> None:
    pods = [
        agent_status.PodFacts(name="a-0", phase="Running", ready=True),
        agent_status.PodFacts(name="a-1", phase="Running", ready=True),
        agent_status.PodFacts(
            name="a-2",
            phase="Pending",
            ready=False,
            unschedulable_message="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        ),
    ]
    status = status_for(
        two_agent_config(),
        spec_fields={"replicas": 3, "runner": {"mode": "Sidecar", "gpus": {"count": 1}}},
        replicas=3,
        ready_replicas=2,
        pods=pods,
    )
    assert status["phase"] == "Degraded"
    available = condition(status, "Available")
    assert available["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in available["message"]
    assert any("a-2 cannot be scheduled" in w for w in status["warnings"])


def test_unload_hook_on_shared_runners_is_flagged() -> None:
    alone = status_for(two_agent_config())
    assert not any("unload" in w for w in alone["warnings"])
    shared = status_for(two_agent_config(), sharing=["other"])
    (warning,) = [w for w in shared["warnings"] if "unload" in w]
    assert "Agent other" in warning and "root" in warning
    replicated = status_for(two_agent_config(), spec_fields={"replicas": 2})
    assert any("2 replicas" in w for w in replicated["warnings"])


def test_status_conditions_keep_transition_times() -> None:
    first = status_for(two_agent_config())
    config = two_agent_config()
    spec = spec_of(config)
    again = agent_status.agent_status(
        spec=spec,
        generation=3,
        resolution=agent_models.resolve_models(config, CATALOGUE, default_model=None),
        config_problems=[],
        env_problems=[],
        replicas=1,
        ready_replicas=1,
        pods=[],
        agents_sharing_runners=[],
        config_hash="abc",
        previous_conditions=first["conditions"],
        now="2026-02-01T00:00:00Z",
    )
    assert again == first
