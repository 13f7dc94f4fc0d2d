"""Async client for one model-runner, over a shared ``httpx.AsyncClient``.

The operator talks to many runner pods, so it owns one ``httpx.AsyncClient`` (connection pool,
limits) and builds a cheap ``ModelRunnerClient`` per runner address. Bodies and replies go
through ``dmr_operator.dmr.wire``; configuration is validated with model-runner's own rules before
any request is sent. model-runner answers errors in plain text with codes that need reading in
context (500 = validation failure on ``_configure``, 409 = busy runner or a delete that must be
forced, a pull that fails after its 200), so every call maps them to the small ``RunnerError``
hierarchy below (reference/model-runner-api.md §3, §7). Tests run it against
``dmr_operator.testing.emulator`` over real HTTP.
"""

from __future__ import annotations

import dataclasses
import html
import json
import ssl
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import httpx
import pydantic

import dmr_operator
from dmr_operator.dmr import validation, wire

# A Go nil slice is JSON null: a runner with no configs may answer either way.
_CONFIG_LISTING: Final = pydantic.TypeAdapter(list[wire.ModelConfigEntry] | None)

USER_AGENT: Final = f"dmr-operator/{dmr_operator.__version__}"
# Short connect timeout: an unreachable pod must not hold a reconcile for long.
DEFAULT_TIMEOUT: Final = httpx.Timeout(10.0, connect=2.0)
# Pulls stream for as long as the download takes; only silence between lines is an error.
DEFAULT_PULL_READ_TIMEOUT: Final = 120.0
# A preload blocks until the engine is up; model-runner itself gives up after 5 minutes.
DEFAULT_PRELOAD_TIMEOUT: Final = 330.0


# Connections to one runner: its configures in parallel, its pulls, a read-back, a size read.
CONNECTIONS_PER_RUNNER: Final = 16
# Runners whose connections are kept; beyond that the least recently used are closed.
KEPT_RUNNERS: Final = 4096


class PerRunnerTransport(httpx.AsyncBaseTransport):
    """A connection pool per runner (scheme, host, port) behind one ``httpx.AsyncClient``.

    One pool for all runners had two failures at 1,500 runner pods (bench/placement_scale.py):
    a few runners' long pull streams took every connection, so other runners' requests timed
    out waiting for one (``PoolTimeout``, shown as "runner unreachable"); and httpcore matches
    every waiting request against every connection each time one frees, CPU that grows with
    the square of the queue. Per runner, a busy runner only waits for itself, and no request
    ever waits on the pool's clock (the runner's own parallelism is bounded by its worker).
    """

    def __init__(self, *, limits_per_runner: int = CONNECTIONS_PER_RUNNER) -> None:
        self._limits = httpx.Limits(
            max_connections=limits_per_runner, max_keepalive_connections=limits_per_runner // 4
        )
        self._pools: dict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = {}
        # One TLS context for all: httpx builds one per transport otherwise (the CA bundle
        # loaded each time, most of a megabyte per runner; runners speak plain HTTP anyway).
        self._tls = ssl.create_default_context()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.pop(origin, None)
        if pool is None:
            pool = httpx.AsyncHTTPTransport(verify=self._tls, limits=self._limits, trust_env=False)
            if len(self._pools) >= KEPT_RUNNERS:
                oldest = next(iter(self._pools))
                await self._pools.pop(oldest).aclose()
        self._pools[origin] = pool  # most recently used last
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def runner_http_client(**kwargs: Any) -> httpx.AsyncClient:
    """The operator's one client for every runner: a pool per runner, no wait for a pool slot
    that could time out (a runner's in-flight requests are bounded by its worker)."""
    timeout: httpx.Timeout = kwargs.pop("timeout", DEFAULT_TIMEOUT)
    return httpx.AsyncClient(
        transport=PerRunnerTransport(),
        timeout=httpx.Timeout(
            connect=timeout.connect, read=timeout.read, write=timeout.write, pool=None
        ),
        trust_env=False,
        **kwargs,
    )


# The inference route (and the rest of a minimal body) that loads a model in each mode.
_PRELOAD_ROUTES: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "completion": ("v1/chat/completions", {"messages": []}),
    "embedding": ("v1/embeddings", {"input": ""}),
    "reranking": ("rerank", {"query": "", "documents": []}),
    "image-generation": ("v1/images/generations", {"prompt": ""}),
}


class RunnerError(Exception):
    """A failed model-runner call; ``message`` is the runner's plain text when it sent one."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code

    def __str__(self) -> str:
        if self.status_code is None:
            return self.message
        return f"{self.status_code}: {self.message}"


class RunnerUnreachable(RunnerError):
    """Connection refused, DNS failure, timeout: nothing usable came back."""


class BadRequest(RunnerError):
    """400: the runner could not decode the request (bad JSON type, unknown mode, keep_alive)."""


class NotFound(RunnerError):
    """404: unknown backend, model not in the store, or an unknown route."""


class RunnerBusy(RunnerError):
    """409 ``runner already active``: the model's runner is serving; retry later or unload."""


class ConfigRejected(RunnerError):
    """The configuration was refused by a model-runner rule (500 from the runner, or client-side
    before sending, then ``status_code`` is None)."""


class PullFailed(RunnerError):
    """A pull failed: an HTTP error before streaming (``status_code`` set) or a failure reported
    inside the 200 stream (error line, trailing plain-text line, or no success line)."""


class PullInterrupted(PullFailed):
    """The pull's stream broke off or went silent past the read timeout after the runner took
    the request: that pull failed, the runner itself may be fine (slow registry, big layer)."""


class DeleteConflict(RunnerError):
    """409 on delete: the model has several tags and must be deleted with ``force``."""


ModelInUse = DeleteConflict


class RunnerServerError(RunnerError):
    """Any other 5xx, or a reply that is not what model-runner sends."""


@dataclasses.dataclass(frozen=True)
class PullResult:
    message: str
    cached: bool


def _error_from_response(
    response: httpx.Response,
    *,
    on_conflict: type[RunnerError] = RunnerBusy,
    on_server_error: type[RunnerError] = RunnerServerError,
) -> RunnerError:
    message = response.text.strip()
    status = response.status_code
    error_type: type[RunnerError]
    if status == 400:
        error_type = BadRequest
    elif status == 404:
        error_type = NotFound
    elif status == 409:
        error_type = on_conflict
    elif status == 500:
        error_type = on_server_error
    elif status >= 500:
        error_type = RunnerServerError
    else:
        error_type = RunnerError
    return error_type(message, status_code=status)


def _model_path(reference: str) -> str:
    # References go raw into the path ("/models/ai/qwen3:latest"); only escape what must be.
    return "/models/" + urllib.parse.quote(reference, safe="/:@")


def _engine_prefix(backend: str | None) -> str:
    return f"/engines/{backend}" if backend else "/engines"


def _parse_pull_line(line: str) -> wire.PullProgress | None:
    """A progress line, or None for text that is not one (a plain-text error after the 200)."""
    for candidate in (line, html.unescape(line)):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            return wire.PullProgress.model_validate(data)
    return None


class ModelRunnerClient:
    """One runner at ``base_url`` (e.g. ``http://10.0.0.7:12434``)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"ModelRunnerClient({self.base_url!r})"

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Response:
        request_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        try:
            return await self._http.request(
                method,
                self.base_url + path,
                json=body,
                params=params,
                headers=request_headers,
                timeout=request_timeout if request_timeout is not None else DEFAULT_TIMEOUT,
            )
        except httpx.TransportError as error:
            raise RunnerUnreachable(f"{self.base_url}: {error!r}") from error

    async def _call(
        self,
        method: str,
        path: str,
        *,
        expected: Sequence[int] = (200,),
        on_conflict: type[RunnerError] = RunnerBusy,
        on_server_error: type[RunnerError] = RunnerServerError,
        **kwargs: Any,
    ) -> httpx.Response:
        response = await self._send(method, path, **kwargs)
        if response.status_code not in expected:
            raise _error_from_response(
                response, on_conflict=on_conflict, on_server_error=on_server_error
            )
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as error:
            raise RunnerServerError(
                f"not JSON: {response.text[:200]!r}", status_code=response.status_code
            ) from error

    # --- store ----------------------------------------------------------------------------

    async def list_models(self) -> list[wire.StoreModel]:
        response = await self._call("GET", "/models")
        return [wire.StoreModel.model_validate(item) for item in self._json(response) or []]

    async def get_model(self, reference: str, *, remote: bool = False) -> wire.StoreModel | None:
        """The stored model for ``reference`` (the runner also matches a bare name), or None.

        ``remote``: what the registry says of it (``?remote=true``: size and metadata of a model
        not pulled yet; no tags)."""
        try:
            params = {"remote": "true"} if remote else None
            response = await self._call("GET", _model_path(reference), params=params)
        except NotFound:
            return None
        return wire.StoreModel.model_validate(self._json(response))

    async def pull(
        self,
        reference: str,
        *,
        on_progress: Callable[[wire.PullProgress], None] | None = None,
        bearer_token: str | None = None,
        read_timeout: float = DEFAULT_PULL_READ_TIMEOUT,
    ) -> PullResult:
        """Pull ``reference``; success only on a ``type: success`` line in the stream."""
        body: dict[str, str] = {"from": reference}
        if bearer_token:
            body["bearer-token"] = bearer_token
        timeout = httpx.Timeout(
            connect=DEFAULT_TIMEOUT.connect, read=read_timeout, write=10.0, pool=10.0
        )
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        success: wire.PullProgress | None = None
        failure: str | None = None
        try:
            async with self._http.stream(
                "POST",
                self.base_url + "/models/create",
                json=body,
                headers=headers,
                timeout=timeout,
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise PullFailed(response.text.strip(), status_code=response.status_code)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    progress = _parse_pull_line(line)
                    if progress is None:
                        failure = failure or line.strip()
                        continue
                    if on_progress is not None:
                        on_progress(progress)
                    if progress.type == wire.PULL_ERROR:
                        failure = failure or progress.message or "pull failed"
                    elif progress.type == wire.PULL_SUCCESS:
                        success = progress
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise RunnerUnreachable(f"{self.base_url}: {error!r}") from error
        except httpx.TransportError as error:
            raise PullInterrupted(f"pull of {reference} interrupted: {error!r}") from error
        if failure is not None:
            raise PullFailed(failure)
        if success is None:
            raise PullFailed("pull stream ended without a success line")
        return PullResult(
            message=success.message, cached=success.message.startswith(wire.CACHED_PREFIX)
        )

    async def delete_model(self, reference: str, *, force: bool = False) -> list[wire.DeleteAction]:
        """Untag, or delete when it is the last tag (or ``force``); 409 -> DeleteConflict."""
        response = await self._call(
            "DELETE",
            _model_path(reference),
            params={"force": "true"} if force else None,
            on_conflict=DeleteConflict,
        )
        return [wire.DeleteAction.model_validate(item) for item in self._json(response) or []]

    # --- configuration ----------------------------------------------------------------------

    async def configure(self, backend: str | None, request: wire.ConfigureRequest) -> None:
        """Validate with the path backend's rules, then ``POST /engines/{backend}/_configure``.

        ``backend=None`` uses ``/engines/_configure`` (llama.cpp's allow-list applies).
        """
        try:
            request.validate_for(backend or validation.DEFAULT_BACKEND)
        except validation.RunnerValidationError as error:
            raise ConfigRejected(str(error)) from error
        await self._call(
            "POST",
            f"{_engine_prefix(backend)}/_configure",
            body=request.to_wire(),
            expected=(202,),
            on_server_error=ConfigRejected,
        )

    async def read_configs(self, model: str | None = None) -> list[wire.ModelConfigEntry]:
        """``GET /engines/_configure``: only configs of models present in the store."""
        response = await self._call(
            "GET", "/engines/_configure", params={"model": model} if model else None
        )
        try:
            # One validation pass over the raw bytes: this list grows with the models a runner
            # holds and is read at every verification.
            return _CONFIG_LISTING.validate_json(response.content or b"null") or []
        except pydantic.ValidationError as error:
            raise RunnerServerError(
                f"unexpected GET /engines/_configure answer: {error.errors()[0]['msg']}",
                status_code=response.status_code,
            ) from error

    # --- runners ------------------------------------------------------------------------------

    async def status(self) -> dict[str, str]:
        response = await self._call("GET", "/engines/status")
        return {str(key): str(value) for key, value in (self._json(response) or {}).items()}

    async def ps(self) -> list[wire.BackendStatus]:
        response = await self._call("GET", "/engines/ps")
        return [wire.BackendStatus.model_validate(item) for item in self._json(response) or []]

    async def df(self) -> wire.DiskUsage:
        response = await self._call("GET", "/engines/df")
        return wire.DiskUsage.model_validate(self._json(response))

    async def log_tail(self, lines: int = 8) -> list[str]:
        """The last lines of the runner's service and engine logs (``GET /logs``), for a person
        reading why an engine did not start; empty when the runner has no logs API."""
        try:
            response = await self._call("GET", "/logs", params={"no-engines": "false"})
        except RunnerError:
            return []
        return [line for line in response.text.splitlines() if line.strip()][-lines:]

    async def version(self) -> str:
        response = await self._call("GET", "/version")
        return str(self._json(response).get("version", ""))

    async def unload(
        self, *, backend: str | None, models: Sequence[str], unload_all: bool = False
    ) -> int:
        """``POST /engines/unload``; returns how many runners were stopped.

        With a ``backend`` the stored configs of those models on that backend are dropped too;
        with ``backend=None`` runners on every backend stop but configs stay (the next request
        reloads with them). Busy runners are never stopped.
        """
        body = {"all": unload_all, "backend": backend or "", "models": list(models)}
        response = await self._call("POST", "/engines/unload", body=body)
        return int(self._json(response).get("unloaded_runners", 0))

    async def unload_agent_style(self, model: str, *, backend: str | None = None) -> bool:
        """docker-agent's ``on_agent_switch: unload`` call, ``POST …/_unload {"model": …}``.

        Upstream model-runner has no such route (404 -> False); a patched runner may.
        """
        try:
            await self._call(
                "POST",
                f"{_engine_prefix(backend)}/_unload",
                body={"model": model},
                expected=(200, 202, 204),
            )
        except NotFound:
            return False
        return True

    async def preload(
        self,
        model: str,
        backend: str | None = None,
        *,
        mode: str = "completion",
        load_timeout: float = DEFAULT_PRELOAD_TIMEOUT,
    ) -> None:
        """Block until the model's runner for ``mode`` is loaded (``X-Preload-Only``: the
        route decides the mode, so an embedding model is warmed on its embeddings route);
        404 if not pulled."""
        route, body = _PRELOAD_ROUTES.get(mode, _PRELOAD_ROUTES["completion"])
        await self._call(
            "POST",
            f"{_engine_prefix(backend)}/{route}",
            body={"model": model, **body},
            headers={"X-Preload-Only": "true"},
            request_timeout=httpx.Timeout(load_timeout, connect=DEFAULT_TIMEOUT.connect),
        )
