"""``dmr-operator run``: operator settings, startup/cleanup, login, and the kopf entry point.

Settings that differ from kopf's defaults are set once here, each with its reason. The handler
modules are imported for their decorators; the controllers they feed are created at startup and
kept in kopf's ``memo``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx
import kopf

from dmr_operator import __version__, constants, metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.controllers import agents, dmrmodels, leadership
from dmr_operator.reconcile import compatibility
from dmr_operator.reconcile import leadership as leadership_rules

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
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
    election = parser.add_argument_group(
        "leader election", "with several replicas, only the holder of a Lease acts"
    )
    election.add_argument(
        "--leader-elect",
        action="store_true",
        help="wait for the leader-election Lease before acting (needed with replicas > 1)",
    )
    election.add_argument(
        "--leader-election-id",
        default="dmr-operator",
        help="name of the Lease (default: %(default)s)",
    )
    election.add_argument(
        "--leader-election-namespace",
        default=None,
        help="namespace of the Lease (default: $POD_NAMESPACE, else the pod's own namespace)",
    )
    election.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a silent leader keeps the Lease; renew deadline and retry period scale "
        "with it (default: %(default)s)",
    )
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

    timings = leadership_rules.LeaseTimings.for_duration(args.lease_duration)
    if problems := timings.problems():
        logger.error("--lease-duration: %s", "; ".join(problems))
        return 2
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    try:
        return asyncio.run(serve(args, timings))
    except KeyboardInterrupt:
        return 130


async def serve(args: argparse.Namespace, timings: leadership_rules.LeaseTimings) -> int:
    """Run kopf, after winning the leader election when ``--leader-elect`` asks for one.

    Replicas coordinate through a Lease rather than kopf's peering: a standby starts no
    watch and calls no runner (a kopf standby may handle events before it learns it is one),
    and a released or expired lease is taken over within seconds instead of a minute.
    """
    memo = kopf.Memo()
    namespaces = list(args.namespace)
    if problem := await _cluster_problem():
        logger.error("refusing to start: %s", problem)
        return 1

    async def operator() -> None:
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            liveness_endpoint=args.liveness,
            memo=memo,
        )

    if not args.leader_elect:
        metrics.LEADER.set(1)
        await operator()
        return 0
    kube = kube_client.KubeClient(kube_credentials)
    elector = leadership.LeaderElector(
        kube,
        namespace=args.leader_election_namespace or own_namespace(),
        name=args.leader_election_id,
        identity=own_identity(),
        timings=timings,
    )
    try:
        async with standby_probe(args.liveness):
            await elector.acquire()
        holding = asyncio.create_task(elector.hold(), name="leader-election lease renewal")
        running = asyncio.create_task(operator(), name="kopf operator")
        await asyncio.wait({holding, running}, return_when=asyncio.FIRST_COMPLETED)
        if not holding.done():
            holding.cancel()
            await elector.release()
            running.result()
            return 0
        # Leadership is gone (or renewing broke): stop acting at once, before a standby starts.
        await _halt(memo)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        error = holding.exception()
        logger.error("exiting: %s", error)
        return 1
    finally:
        await kube.close()


async def _cluster_problem() -> str | None:
    """Why this cluster cannot be served (too old), asked before any watch or runner call."""
    kube = kube_client.KubeClient(kube_credentials)
    try:
        info = await kube.request("GET", "/version")
    except kube_client.KubeError as error:
        return f"GET /version failed: {error}"
    finally:
        await kube.close()
    return compatibility.version_problem(info or {})


async def _halt(memo: Any) -> None:
    """Stop the controllers' own tasks (runner workers, status writer, Agent queue) now."""
    stops = [
        c.stop() for c in (getattr(memo, "agents", None), getattr(memo, "dmrmodels", None)) if c
    ]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*stops, return_exceptions=True)


def own_namespace() -> str:
    """The operator pod's namespace: $POD_NAMESPACE, the service account's, else ``default``."""
    if namespace := os.environ.get("POD_NAMESPACE"):
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def own_identity() -> str:
    """Who holds the lease: the pod name (a restarted container takes its own lease back at
    once, its old process being gone), else host and a random suffix (unique per process)."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def standby_probe(liveness: str | None) -> AsyncIterator[None]:
    """Answer the liveness URL while standing by, so the kubelet does not restart a standby;
    kopf serves it from the moment this replica leads."""
    if not liveness:
        yield
        return
    url = urllib.parse.urlsplit(liveness)

    async def healthy(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"standby": True})

    app = aiohttp.web.Application()
    app.router.add_get(url.path or "/", healthy)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, url.hostname, url.port or 80, reuse_address=True)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()


async def kube_credentials(settings: kopf.OperatorSettings | None = None) -> Mapping[str, Any]:
    """Credentials for the operator's own client, the same kopf logs in with (read in a thread:
    loading a kubeconfig blocks)."""
    info = await asyncio.to_thread(connection_info, logger=logger, settings=settings)
    return dataclasses.asdict(info)


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


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps no "last handled configuration" of our objects.

    kopf needs it to compute diffs for ``on.create``/``on.update`` handlers; this operator has
    none (controllers compare generations and what they applied), so the annotation kopf would
    patch onto every DMRModel and Agent was one API write per object, a quarter of all writes at
    scale, for nothing. Every watch event then looks like a creation to kopf, with no handler.
    """

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    # Our own names instead of kopf.zalando.org/*: fixed before the first release, since renaming
    # a finalizer later strands objects.
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
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

    memo.http = modelrunner.runner_http_client(
        timeout=httpx.Timeout(15.0, connect=3.0),
        headers={"User-Agent": f"dmr-operator/{__version__}"},
        event_hooks={"response": [metrics.record_runner_response]},
    )
    memo.kube = kube_client.KubeClient(functools.partial(kube_credentials, settings))
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
