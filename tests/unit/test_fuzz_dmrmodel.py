"""Property tests (hypothesis) of DMRModel parsing and rendering: bad input comes back as values.

``reconcile.dmrmodel.target_from_object`` must never raise, whatever the object holds (the
operator calls it on every watch event), and every target it calls valid must render a
``_configure`` body that model-runner's own rules (``wire.ConfigureRequest.validate_for``) accept:
the operator may only send what the runner would take. Neighbours: test_dmrmodel_reconcile.py
(examples), test_fuzz_agent.py, test_fuzz_ssrf.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmr_operator.dmr import validation, wire
from dmr_operator.reconcile import dmrmodel

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

hostile_strings = st.sampled_from(
    [
        "--model=/etc/passwd",
        "--api-key",
        "--api-key=x",
        "../../etc/shadow",
        "a\\b",
        "--temp=-1",
        "--temp=-0.5",
        "-",
        "",
        " ",
        "\x00",
        "$(reboot)",
        "`id`",
        "--host=0.0.0.0",
        "x" * 5000,
        "--ctx-size",
        "8192",
        "--temp",
        "0.7",
        "--max-num-seqs",
        "--jinja",
        "'unterminated",
    ]
)
model_refs = st.sampled_from(
    [
        "ai/qwen3:14B",
        "qwen3",
        "hf.co/org/repo:Q4_K_M",
        "registry.example.com/x/y:tag",
        "ai/smollm2@sha256:" + "a" * 64,
        "",
        "UPPER/Case",
        "a" * 300,
        "../../etc/passwd",
        "http://169.254.169.254/latest",
        ":",
        "@",
    ]
) | st.text(max_size=30)
hf_keys = st.sampled_from(
    ["rope_scaling", "a.b", "__import__", "__class__", "_ok", "1abc", "", "max_position"]
) | st.text(max_size=8)
hf_overrides = st.recursive(
    json_scalars, lambda children: st.dictionaries(hf_keys, children, max_size=3), max_leaves=8
)

near_valid_specs = st.fixed_dictionaries(
    {"model": model_refs},
    optional={
        "backend": st.sampled_from(["llama.cpp", "vllm", "mlx", "sglang", "diffusers", "bogus"]),
        "mode": st.sampled_from(["completion", "embedding", "reranking", "image-generation", "x"]),
        "contextSize": st.integers(min_value=-(2**40), max_value=2**40) | st.sampled_from([0, -1]),
        "keepAlive": st.sampled_from(
            ["-1", "0", "5m", "1h30m", "-5m", "forever", "1.5h", "", "9" * 30]
        )
        | st.text(max_size=10),
        "runtimeFlags": st.lists(hostile_strings | st.text(max_size=12), max_size=6),
        "rawRuntimeFlags": st.lists(hostile_strings, max_size=5).map(" ".join)
        | st.text(max_size=30),
        "thinkingBudget": st.integers(min_value=-(2**40), max_value=2**40)
        | st.sampled_from(["low", "medium", "high", "none", "max", "bogus", "", "-1"]),
        "speculative": st.fixed_dictionaries(
            {"draftModel": model_refs},
            optional={
                "numTokens": st.integers(min_value=-(2**40), max_value=2**40),
                "minAcceptanceRate": st.floats(allow_nan=True),
            },
        ),
        "vllm": st.fixed_dictionaries(
            {},
            optional={
                "gpuMemoryUtilization": st.floats(allow_nan=True, allow_infinity=True),
                "hfOverrides": hf_overrides,
            },
        ),
        "runners": st.fixed_dictionaries(
            {},
            optional={
                "url": st.sampled_from(
                    [
                        "http://169.254.169.254/",
                        "http://runner.example:12434",
                        "http://127.0.0.1:12434",
                        "file:///etc/passwd",
                        "http://user:pw@runner.example/",
                    ]
                ),
                "poolSelector": st.fixed_dictionaries(
                    {},
                    optional={
                        "matchLabels": st.dictionaries(
                            st.text(max_size=8), st.text(max_size=8), max_size=2
                        )
                    },
                ),
            },
        ),
        "pullPolicy": st.sampled_from(["IfNotPresent", "Always", "Never", "Sometimes"]),
        "deletionPolicy": st.sampled_from(["Unload", "Delete", "Retain", "Shred"]),
        "busyPolicy": st.sampled_from(["WaitIdle", "Unload", "Panic"]),
        "unknownField": json_values,
    },
)


def _object(spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "m", "uid": "u-1", "generation": 1},
        "spec": spec,
    }


def _backends_for(target: dmrmodel.ModelTarget) -> list[str]:
    """The backend the operator would configure: the spec's, or either default by format."""
    assert target.spec is not None
    if target.spec.backend:
        return [target.spec.backend]
    return [dmrmodel.resolve_backend(target.spec, fmt) for fmt in ("gguf", "safetensors")]


def _check_renders(target: dmrmodel.ModelTarget) -> None:
    assert target.spec is not None and target.normalized
    for backend in _backends_for(target):
        body = dmrmodel.configure_request(target, backend)
        request = wire.ConfigureRequest.model_validate(body)
        if target.spec.backend is None and (
            target.spec.runtime_flags or target.spec.raw_runtime_flags
        ):
            # Flags are checked against the allow-list of the backend the runner picks for the
            # model's format, known only after the pull: a refusal then is a ConfigRejected
            # status, not a crash. Everything else must pass whatever the backend.
            try:
                request.validate_for(backend)
            except validation.RunnerValidationError as error:
                assert "flag" in str(error).lower(), error
            continue
        request.validate_for(backend)


@FUZZ
@given(spec=json_values)
def test_arbitrary_spec_never_raises(spec: Any) -> None:
    target = dmrmodel.target_from_object(_object(spec))
    assert target.valid or target.problems
    if target.valid:
        _check_renders(target)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["metadata", "spec", "status", "kind"]), json_values))
def test_arbitrary_object_never_raises(body: dict[str, Any]) -> None:
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        body["metadata"] = {}
    try:
        dmrmodel.target_from_object(body)
    except (TypeError, ValueError) as error:
        # generation is an integer in every object the API server serves; a non-number there
        # is outside what a watch can deliver, everything else must be absorbed
        assert "generation" in repr(body["metadata"]) and "int" in str(error), error


@FUZZ
@given(spec=near_valid_specs)
def test_near_valid_spec_is_target_or_problem_and_valid_ones_render(spec: dict[str, Any]) -> None:
    target = dmrmodel.target_from_object(_object(spec), allowed_runner_hosts=("runner.example",))
    if not target.valid:
        assert target.problems and all(isinstance(p, str) and p for p in target.problems)
        return
    _check_renders(target)
    url = (spec.get("runners") or {}).get("url")
    if url:
        assert "runner.example" in url and "@" not in url
