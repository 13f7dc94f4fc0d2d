"""Building blocks shared by the v1alpha1 kinds: the camelCase base model and status conditions.

Kubernetes' API conventions (camelCase JSON, ``conditions`` with ``type/status/reason/message/
lastTransitionTime/observedGeneration``) are expressed once here so every kind looks the same to
``kubectl``, Argo CD and Flux.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    """Base of every API model: Python snake_case attributes, camelCase on the wire.

    ``extra="forbid"`` mirrors the structural schema: a field the CRD does not know is an error in
    code paths that build objects, rather than silently dropped.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )

    def to_api(self) -> dict[str, object]:
        """The object as the API server stores it: camelCase keys, unset fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def admission_rules(*rules: tuple[str, str, str]) -> ConfigDict:
    """A model's config carrying CEL rules the apiserver checks at admission (``kubectl apply``
    refuses the object with the message), for what an OpenAPI schema cannot say: rules across
    fields. Each is (rule, message, fieldPath relative to the object). The code keeps its own
    checks of the same rules (clusters that skip them, objects made before)."""
    validations: list[JsonValue] = [
        {"rule": rule, "message": message, "fieldPath": field_path}
        for rule, message, field_path in rules
    ]
    return ConfigDict(
        **CamelModel.model_config, json_schema_extra={"x-kubernetes-validations": validations}
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(CamelModel):
    """One observation of the object's state, in the standard Kubernetes condition shape."""

    type: str = Field(description="Condition type, e.g. Ready, Pulled, Configured.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        description="A CamelCase word from a fixed vocabulary saying why (see the README's "
        "troubleshooting table).",
    )
    message: str = Field(default="", description="What a person should know, in one sentence.")
    last_transition_time: str | None = Field(
        default=None, description="When status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this condition was computed for."
    )


class LocalObjectReference(CamelModel):
    """A reference to an object of a known kind in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the object.")
