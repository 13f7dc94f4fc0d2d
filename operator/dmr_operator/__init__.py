"""dmr-operator: Docker Model Runner models and docker-agent agents as Kubernetes resources.

Layers, one direction of dependency: ``handlers`` (thin kopf adapters) -> ``reconcile`` (pure
desired state, status and conditions) -> ``api`` (pydantic models, the CRD source) and ``dmr``
(model-runner's own rules: references, flag validation, wire shapes); ``clients`` are the only
modules that do I/O. ``testing`` holds the control plane, node simulator and model-runner emulator
used by the tests and the local sandbox.
"""

__version__ = "0.1.0"
