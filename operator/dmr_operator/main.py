"""``dmr-operator run``: operator settings, startup/cleanup, login, and the kopf entry point.

Settings that differ from kopf's defaults are set once here, each with its reason. The handler
modules are imported for their decorators; the controllers they feed are created at startup and
kept in kopf's ``memo``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import httpx
import kopf

from dmr_operator import __version__, constants, metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.controllers import agents, dmrmodels

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What ``dmr-operator run`` was asked for; shared with the startup handler."""

    kubeconfig: str | None = None
    verify_interval: float = 60.0
    allowed_runner_hosts: tuple[str, ...] = ()
    metrics_port: int | None = None
    namespaces: tuple[str, ...] = ()


OPTIONS = RunOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: all namespaces)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces (default)"
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only operator"
    )
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="KopfPeering object shared with standby replicas (only one replica acts)",
    )
    parser.add_argument("--priority", type=int, default=0, help="peering priority")
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="plain")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--allowed-runner-hosts",
        default=os.environ.get("DMR_ALLOWED_RUNNER_HOSTS", ""),
        help="comma-separated hosts (host or host:port) DMRModel runners.url may name",
    )
    parser.add_argument(
        "--verify-interval",
        type=float,
        default=float(os.environ.get("DMR_VERIFY_INTERVAL", "60")),
        help="seconds between read-backs of an idle runner (one GET per runner)",
    )


def run_command(args: argparse.Namespace) -> int:
    global OPTIONS  # noqa: PLW0603 - kopf's startup handler reads the parsed options
    OPTIONS = RunOptions(
        kubeconfig=args.kubeconfig,
        verify_interval=args.verify_interval,
        allowed_runner_hosts=tuple(
            h.strip() for h in str(args.allowed_runner_hosts).split(",") if h.strip()
        ),
        metrics_port=args.metrics_port,
        namespaces=tuple(args.namespace),
    )
    kopf.configure(
        verbose=args.verbose,
        log_format={
            "plain": kopf.LogFormat.PLAIN,
            "full": kopf.LogFormat.FULL,
            "json": kopf.LogFormat.JSON,
        }[args.log_format],
    )
    if not args.verbose:
        # One line per runner request and per watch event drowns what a person needs to see;
        # --verbose brings them back.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from dmr_operator import handlers  # noqa: F401 - registers the kopf handlers

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    namespaces = list(args.namespace)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
    )
    return 0


def connection_info(*, logger: Any, settings: kopf.OperatorSettings | None = None) -> Any:
    """kopf-style credentials from ``--kubeconfig`` when given, else kopf's own discovery."""
    if OPTIONS.kubeconfig:
        import kubernetes

        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=OPTIONS.kubeconfig, client_configuration=configuration
        )
        header = configuration.get_api_key_with_prefix(
            "BearerToken"
        ) or configuration.get_api_key_with_prefix("authorization")
        token = header.split(" ", 1)[-1] if header else None
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            token=token,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
            username=configuration.username or None,
            password=configuration.password or None,
        )
    return kopf.login_via_client(logger=logger, settings=settings or kopf.OperatorSettings())


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    return connection_info(logger=kwargs["logger"], settings=kwargs.get("settings"))


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    # Our own names instead of kopf.zalando.org/*: fixed before the first release, since renaming
    # a finalizer later strands objects.
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.GROUP, key="last-handled-configuration"
    )
    # Our controllers post the Events a person needs; kopf's per-handler INFO events would add
    # a write per handler run for nothing.
    settings.posting.level = logging.WARNING
    # Recycle silent watch streams (nolar/kopf#698): a half-open connection otherwise stalls the
    # operator without an error.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 310
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # Deletion of a DMRModel retries quickly while runners answer; the cleanup itself is bounded.
    settings.execution.default_backoff = 5

    async def credentials() -> Mapping[str, Any]:
        info = await asyncio.to_thread(connection_info, logger=logger, settings=settings)
        return dataclasses.asdict(info)

    memo.http = httpx.AsyncClient(
        timeout=httpx.Timeout(15.0, connect=3.0),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        headers={"User-Agent": f"dmr-operator/{__version__}"},
        event_hooks={"response": [metrics.record_runner_response]},
        trust_env=False,
    )
    memo.kube = kube_client.KubeClient(credentials)
    memo.dmrmodels = dmrmodels.DMRModelController(
        http=memo.http,
        kube=memo.kube,
        settings=dmrmodels.ControllerSettings(
            verify_interval=OPTIONS.verify_interval,
            allowed_runner_hosts=OPTIONS.allowed_runner_hosts,
        ),
    )
    await memo.dmrmodels.seed(OPTIONS.namespaces)
    memo.dmrmodels.start()
    memo.agents = agents.AgentController(kube=memo.kube, dmrmodels=memo.dmrmodels)
    memo.agents.start()
    logger.info("dmr-operator %s started", __version__)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "agents", None) is not None:
        await memo.agents.stop()
    controller = getattr(memo, "dmrmodels", None)
    if controller is not None:
        await controller.stop()
    if getattr(memo, "http", None) is not None:
        await memo.http.aclose()
    if getattr(memo, "kube", None) is not None:
        await memo.kube.close()
