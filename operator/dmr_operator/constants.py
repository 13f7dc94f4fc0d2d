"""Names shared by every layer: API group, versions, labels, annotations, finalizer, ports."""

from typing import Final

GROUP: Final = "dmr.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

DMRMODEL_KIND: Final = "DMRModel"
DMRMODEL_PLURAL: Final = "dmrmodels"
AGENT_KIND: Final = "Agent"
AGENT_PLURAL: Final = "agents"
CATEGORY: Final = "dmr"

# Label that makes a pod a model-runner pod of a pool (DESIGN.md "Runner pools").
POOL_LABEL: Final = f"{GROUP}/pool"
DEFAULT_POOL: Final = "default"
# Set on every object the operator creates for an Agent.
AGENT_LABEL: Final = f"{GROUP}/agent"
# Set on every object the operator creates for a DMRModel (its Service, with placement).
MODEL_LABEL: Final = f"{GROUP}/dmrmodel"
# placement.dmr.dev/<DMRModel>: "true" on the runner pods serving a placed model
# (reconcile.model_routing); only its own Service selects it.
PLACEMENT_LABEL_PREFIX: Final = "placement.dmr.dev/"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "dmr-operator"

# Renaming a finalizer strands existing objects: fixed before the first release.
FINALIZER: Final = f"{GROUP}/cleanup"
CONFIG_HASH_ANNOTATION: Final = f"{GROUP}/config-hash"

# model-runner's port inside its image (MODEL_RUNNER_PORT=12434) and the port name we look for.
RUNNER_PORT: Final = 12434
RUNNER_PORT_NAME: Final = "dmr"
RUNNER_CONTAINER: Final = "model-runner"
