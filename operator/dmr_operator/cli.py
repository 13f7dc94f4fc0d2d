"""The ``dmr-operator`` command line: one subcommand per job, each importing only what it needs.

``run`` starts the operator; ``crds`` writes the generated CustomResourceDefinitions;
``emulator`` serves a model-runner emulator; ``controlplane`` builds or starts the local
Kubernetes control plane used by the tests; ``sandbox`` runs everything together locally.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, one-line help). Each module owns its arguments through an
# ``add_arguments(parser)`` function next to the entry point, so this file never grows logic.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("dmr_operator.main", "run_command", "run the operator against a cluster"),
    "crds": ("dmr_operator.api.crdgen", "crds_command", "write the generated CRDs"),
    "emulator": (
        "dmr_operator.testing.emulator",
        "emulator_command",
        "serve a model-runner emulator",
    ),
    "controlplane": (
        "dmr_operator.testing.controlplane",
        "controlplane_command",
        "build, cache or start the local control plane (etcd + kube-apiserver ...)",
    ),
    "peers": (
        "dmr_operator.testing.realpeers",
        "peers_command",
        "build or find the real peers of the real tier (model-runner)",
    ),
    "sandbox": ("dmr_operator.sandbox", "sandbox_command", "run a local demo cluster end to end"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmr-operator", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, _, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a subcommand whose module does not exist yet in this build
            continue
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = getattr(
            module, "add_arguments", None
        )
        if add_arguments is not None:
            add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name, _ = SUBCOMMANDS[args.command]
    command: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(module_name), function_name
    )
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
