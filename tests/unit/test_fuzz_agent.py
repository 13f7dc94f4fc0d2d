"""Property tests (hypothesis) of the Agent validators and renderers: problems are values.

``reconcile.agent_config.validate_agent_config``, ``reconcile.agent.resolve_models``,
``render_agent_config`` and ``reconcile.agent_workload.env_problems`` run on whatever a user put
in an Agent; none of them may raise. Near-valid configurations (docker-agent's shape with hostile
values) and arbitrary JSON both go through. Neighbours: test_agent_rendering.py (examples),
test_fuzz_dmrmodel.py.
"""

from __future__ import annotations

from typing import Any

import pydantic
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import agent as agent_models
from dmr_operator.reconcile import agent_config, agent_workload

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

SERVED = [
    agent_models.ServedModel(
        name="qwen",
        model="ai/qwen3:14B",
        backend="llama.cpp",
        mode="completion",
        context_size=32768,
        thinking_budget=8192,
        ready=True,
        endpoint="http://pool-default.team.svc:80/v1",
        created="2026-01-01T00:00:00Z",
    ),
    agent_models.ServedModel(
        name="embed",
        model="ai/embeddinggemma:latest",
        backend="vllm",
        mode="embedding",
        context_size=None,
        thinking_budget=None,
        ready=False,
        endpoint=None,
        created="2026-01-02T00:00:00Z",
    ),
]

model_values = st.sampled_from(
    ["auto", "dmr/ai/qwen3:14B", "dmr/qwen3", "openai/gpt-4o", "dmr/", "fast,slow", "", "dmr/../x"]
) | st.text(max_size=15)
model_entries = st.fixed_dictionaries(
    {},
    optional={
        "provider": st.sampled_from(["dmr", "openai", "custom", ""]) | st.text(max_size=6),
        "model": model_values,
        "dmrModel": st.sampled_from(["qwen", "embed", "missing", ""]) | json_values,
        "base_url": st.sampled_from(["http://169.254.169.254/", "http://x/v1", ""]),
        "provider_opts": st.dictionaries(
            st.sampled_from(
                ["context_size", "runtime_flags", "keep_alive", "mode", "hf_overrides", "x"]
            ),
            json_values,
            max_size=3,
        ),
        "thinking_budget": st.sampled_from(["low", "high", "bogus", -1, 10**12]) | json_values,
    },
)
near_valid_configs = st.fixed_dictionaries(
    {
        "agents": st.dictionaries(
            st.sampled_from(["root", "helper", ""]) | st.text(max_size=6),
            st.fixed_dictionaries(
                {},
                optional={
                    "model": model_values | json_values,
                    "instruction": st.text(max_size=20),
                    "sub_agents": st.lists(st.text(max_size=6), max_size=2) | json_values,
                    "hooks": json_values,
                    "bogus_key": json_values,
                },
            )
            | json_values,
            max_size=3,
        )
    },
    optional={
        "models": st.dictionaries(st.text(max_size=6), model_entries | json_values, max_size=3),
        "providers": json_values,
        "rag": json_values,
        "version": st.sampled_from(["2", "3", 2]) | json_values,
        "unknown_top": json_values,
    },
)


def _exercise(config: Any) -> None:
    problems = agent_config.validate_agent_config(config)
    assert all(isinstance(p, str) and p for p in problems)
    if not isinstance(config, dict):
        assert problems
        return
    for default_model in (None, "qwen"):
        for require_ready in (True, False):
            resolution = agent_models.resolve_models(
                config, SERVED, default_model=default_model, require_ready=require_ready
            )
            agent_config.ignored_option_warnings(resolution)
            rendered = agent_config.render_agent_config(config, resolution)
            assert isinstance(yaml.safe_load(rendered), dict)


@FUZZ
@given(config=json_values)
def test_arbitrary_config_never_raises(config: Any) -> None:
    _exercise(config)


@FUZZ
@given(config=near_valid_configs)
def test_near_valid_config_never_raises(config: dict[str, Any]) -> None:
    _exercise(config)


@FUZZ
@given(
    env=st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["OPENAI_API_KEY", "TOKEN", "PASSWORD", "HOME"])},
            optional={"value": st.text(max_size=10), "valueFrom": json_values},
        ),
        max_size=4,
    ),
    config=near_valid_configs,
)
def test_inline_secret_values_come_back_as_problems(env: list[dict[str, Any]], config: Any) -> None:
    try:
        spec = agent_api.AgentSpec.model_validate({"config": config, "env": env})
    except pydantic.ValidationError:
        return  # refused at the schema: a value, not a crash
    problems = agent_workload.env_problems(spec)
    secret_literals = [
        v for v in env if v.get("value") and v["name"] in ("OPENAI_API_KEY", "TOKEN", "PASSWORD")
    ]
    # The config may hold literal secrets of its own (its problems say "config.<path>").
    env_side = [p for p in problems if p.startswith("env[")]
    assert len(env_side) == len(secret_literals)
    assert all(p.startswith("config.") for p in problems if p not in env_side)
