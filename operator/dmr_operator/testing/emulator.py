"""A model-runner emulator over real HTTP (aiohttp), faithful to reference/model-runner-api.md.

It reproduces what a client can get wrong: plain-text errors with model-runner's codes, 404 for
wrong methods and trailing slashes, NDJSON pull progress (HTML-escaped unless ``Accept:
application/json``), failures after the 200, ``_configure`` validation (500), busy runners (409),
configs lost on restart, keep-alive expiry, ``/engines/ps`` and the ``GET /engines/_configure``
echo. State and rules live in ``emulator_state`` and ``dmr_operator.dmr``. The node simulator
runs one per runner pod through the PodProcess protocol (``start(host, port)``/``stop()``; a
start after a stop is a restarted process that keeps its model store). Tests drive the knobs
(attributes and methods below) and read ``requests``. ``dmr-operator emulator`` serves one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from dmr_operator import constants
from dmr_operator.dmr import golang, references, validation, wire
from dmr_operator.testing import emulator_state
from dmr_operator.testing.emulator_state import (
    DEFAULT_CATALOGUE,
    CatalogueModel,
    ConfigError,
    DecodeError,
    Loader,
    ModelStore,
    Runner,
    StoreConflict,
)

__all__ = [
    "DEFAULT_CATALOGUE",
    "CatalogueModel",
    "ModelRunnerEmulator",
    "PullFailure",
    "RecordedRequest",
    "add_arguments",
    "emulator_command",
]

log = logging.getLogger(__name__)

MAX_BODY: Final = 10 * 1024 * 1024
MAX_CONCURRENT_PULLS: Final = 2
TEXT_PLAIN: Final = "text/plain; charset=utf-8"
DEFAULT_BACKEND_STATUS: Final[Mapping[str, str]] = {
    "llama.cpp": "Running: llama.cpp emulated",
    "vllm": "Running: vllm emulated",
    "mlx": "Not Installed: only supported on Apple Silicon",
    "sglang": "Not Installed: package not installed",
    "diffusers": "Running: diffusers emulated",
}
# /engines/status of the published images (real-peers.md M3; `latest` as the real server here
# reports it). DEFAULT_BACKEND_STATUS, every engine running, stays the emulator's default.
IMAGE_BACKEND_STATUS: Final[Mapping[str, Mapping[str, str]]] = {
    "latest": {
        "diffusers": "Not Installed",
        "llama.cpp": "Running: llama.cpp emulated",
        "mlx": "Not Installed: only supported on Apple Silicon",
        "sglang": "Not Installed: package not installed",
        "vllm": "Not Installed: binary not found",
    },
    "latest-vllm-cuda": {
        "diffusers": "Not Installed",
        "llama.cpp": "Running: llama.cpp emulated",
        "mlx": "Not Installed: only supported on Apple Silicon",
        "sglang": "Not Installed: package not installed",
        "vllm": "Running: vllm emulated",
    },
    # Built with -tags=novllm: no vllm entry at all.
    "latest-sglang-cuda": {
        "diffusers": "Not Installed",
        "llama.cpp": "Running: llama.cpp emulated",
        "mlx": "Not Installed: only supported on Apple Silicon",
        "sglang": "Running: sglang emulated",
    },
}
_INFERENCE_ROUTES: Final[Mapping[str, str]] = {
    "v1/chat/completions": "completion",
    "v1/completions": "completion",
    "v1/messages": "completion",
    "v1/messages/count_tokens": "completion",
    "v1/embeddings": "embedding",
    "rerank": "reranking",
    "score": "reranking",
    "v1/images/generations": "image-generation",
}
_EMBEDDING_DIMENSIONS: Final = 8

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int
    time: float


@dataclasses.dataclass
class PullFailure:
    """How a pull of one reference fails after its 200 (model-runner does both forms)."""

    message: str = "writing image to store: connection reset by peer"
    after_lines: int = 1
    error_line: bool = True
    trailing_text: bool = True


def go_json(data: Any) -> str:
    """Go's ``json.Encoder`` output: compact, UTF-8, ``<>&`` escaped, trailing newline."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text + "\n"


def go_html_escape(text: str) -> str:
    """``html.EscapeString``: only ``< > & ' "``, with Go's entity spellings."""
    for char, entity in (("&", "&amp;"), ("'", "&#39;"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, entity)
    return text.replace('"', "&#34;")


def text_error(status: int, message: str) -> web.Response:
    """Go's ``http.Error``."""
    return web.Response(
        status=status,
        text=message + "\n",
        headers={"Content-Type": TEXT_PLAIN, "X-Content-Type-Options": "nosniff"},
    )


def json_response(data: Any, *, status: int = 200) -> web.Response:
    # body=, not text=: the real server sends "application/json" with no charset parameter.
    return web.Response(
        status=status, body=go_json(data).encode(), headers={"Content-Type": "application/json"}
    )


def _model_not_found(reference: str) -> str:
    return (
        f"error while getting model: get model '{golang.quote(reference)}': "
        f"{emulator_state.MODEL_NOT_FOUND}"
    )


def _clean_path(path: str) -> str:
    # model-runner cleans only paths containing "//" (Go's path.Clean, trailing slash dropped).
    if "//" not in path:
        return path
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


class ModelRunnerEmulator:
    """One emulated model-runner process; see the module docstring.

    Knobs (safe to set from another thread): ``latency`` (seconds added to every reply),
    ``pull_line_delay`` (seconds between pull progress lines), ``pull_steps_per_layer``,
    ``load_delay`` (seconds a runner takes to load), ``inference_delay``, ``time_scale``
    (multiplies keep_alive durations: 0.001 turns 5m into 0.3s), ``configure_failure`` (a message:
    every ``_configure`` answers 500 with it), ``backend_status``, ``version``; methods
    ``fail_pull``, ``hold_runner``, ``stop_listening``/``start_listening``.
    """

    def __init__(self, catalogue: Mapping[str, CatalogueModel] | None = None) -> None:
        source = DEFAULT_CATALOGUE if catalogue is None else catalogue
        self.catalogue: dict[str, CatalogueModel] = {
            references.qualified_tag(model.reference): model for model in source.values()
        }
        self.store = ModelStore()
        self.loader = Loader(self.store)
        self.requests: list[RecordedRequest] = []
        self.latency = 0.0
        self.pull_line_delay = 0.0
        self.pull_steps_per_layer = 3
        self.load_delay = 0.0
        self.inference_delay = 0.0
        self.time_scale = 1.0
        self.idle_check_interval = 0.05
        self.configure_failure: str | None = None
        self.backend_status: dict[str, str] = dict(DEFAULT_BACKEND_STATUS)
        self.version = "v0.0.0-emulator"
        self.pull_failures: dict[str, PullFailure] = {}
        self.host: str | None = None
        self.port: int | None = None
        self.starts = 0
        self._lock = threading.RLock()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pull_slots: asyncio.Semaphore | None = None
        # Pull requests received and not finished (waiting for a slot included), and the most
        # seen at once: a client that respects the runner's 2 slots never exceeds 2.
        self.pulls_in_flight = 0
        self.max_pulls_in_flight = 0
        self.ollama_replaces_config = True
        # Runner slots: min(NumCPU, 8) in model-runner; past them the LRU idle runner is evicted.
        self.runner_slots = 8
        # model-runner gives up the background preload after _configure after a minute.
        self.preload_timeout = 60.0
        # After a start, every backend reports a bare "Not Installed" until its install check
        # has run (the real server: about 0.2 s). 0: answers are settled at once.
        self.install_delay = 0.0
        self._started_at = 0.0

    # --- lifecycle (PodProcess protocol) ---------------------------------------------------------

    @property
    def url(self) -> str:
        if self.host is None or self.port is None:
            raise RuntimeError("emulator not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start listening; after a ``stop()`` this is a restarted process (store kept)."""
        if self._runner is not None:
            raise RuntimeError("emulator already running")
        with self._lock:
            self.loader = Loader(self.store)
        self._pull_slots = asyncio.Semaphore(MAX_CONCURRENT_PULLS)
        app = web.Application(client_max_size=MAX_BODY + 1)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self.host = host
        self.port = port
        await self.start_listening()
        self.starts += 1
        self._started_at = time.monotonic()
        self._spawn(self._expire_idle_runners())

    async def stop(self) -> None:
        """Stop the process: connections close, in-memory configs and runners are gone."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None
        with self._lock:
            self.loader = Loader(self.store)

    async def __aenter__(self) -> ModelRunnerEmulator:
        await self.start(self.host or "127.0.0.1", self.port or 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop_listening(self) -> None:
        """Simulate an unreachable runner without losing state: the port is closed and open
        connections are dropped (clients keep pooled connections alive otherwise)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in list(self._runner.server.connections):
                connection.force_close()

    async def start_listening(self) -> None:
        if self._runner is None or self._site is not None:
            return
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = int(self._runner.addresses[0][1])

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        async def run() -> None:
            await coroutine

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- knobs --------------------------------------------------------------------------------

    def fail_pull(self, reference: str, failure: PullFailure | None = None) -> None:
        """Make pulls of ``reference`` fail after the 200 (None: a default ``PullFailure``)."""
        with self._lock:
            self.pull_failures[references.qualified_tag(reference)] = failure or PullFailure()

    def clear_pull_failures(self) -> None:
        with self._lock:
            self.pull_failures.clear()

    def hold_runner(
        self,
        model: str,
        *,
        seconds: float,
        backend: str = validation.DEFAULT_BACKEND,
        mode: str = validation.DEFAULT_MODE,
    ) -> None:
        """Keep the model's runner serving for ``seconds`` (created loaded if absent), so a
        ``_configure`` with a different config answers 409 meanwhile."""
        with self._lock:
            local = self.store.get_local(model)
            model_id = local.digest if local is not None else model
            if local is not None:
                backend = validation.default_backend_for_format(
                    local.source.format, path_backend=backend
                )
            key = self._runner_key(backend, model_id, mode)
            runner = self.loader.runners.get(key)
            if runner is None:
                runner = Runner(key=key, model_ref=model, loading=False)
                runner.ready.set()
                self.loader.runners[key] = runner
            runner.held_until = time.time() + seconds
            runner.last_used = runner.held_until

    def use_image(self, flavour: str) -> None:
        """Report the backends of a published image flavour (``IMAGE_BACKEND_STATUS``)."""
        self.backend_status = dict(IMAGE_BACKEND_STATUS[flavour])

    def preload_store(self, *refs: str) -> None:
        """Put catalogue models in the store as if pulled earlier (survives restarts)."""
        with self._lock:
            for ref in refs:
                self.store.add(
                    self.catalogue[references.qualified_tag(ref)], self.store.tag_for(ref)
                )

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.method == method and r.path == path]

    # --- dispatch -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read() if request.can_read_body else b""
        if self.latency:
            await asyncio.sleep(self.latency)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = _clean_path(request.path)
        response: web.StreamResponse
        if len(raw) > MAX_BODY:
            response = text_error(400, "request too large")
        else:
            response = await self._route(request, path, raw)
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=body,
                status=response.status,
                time=time.time(),
            )
        )
        return response

    async def _route(self, request: web.Request, path: str, raw: bytes) -> web.StreamResponse:
        if request.method == "HEAD":
            # Go's mux answers HEAD on every GET route (headers only; aiohttp drops the body).
            request = request.clone(method="GET")
        if request.method == "OPTIONS" and request.headers.get("Origin"):
            # CORS preflight from an origin the runner was not told to allow.
            return text_error(403, "Origin not allowed")
        method = request.method
        if path == "/engines":
            # Go's ServeMux redirects to the subtree pattern (307 since Go 1.22-era muxes).
            return web.Response(
                status=307,
                text='<a href="/engines/">Temporary Redirect</a>.\n\n',
                headers={"Location": "/engines/", "Content-Type": "text/html; charset=utf-8"},
            )
        if method == "POST" and path in ("/api/chat", "/api/generate"):
            return await self._ollama(request, path, raw)
        if path == "/":
            return web.Response(text="Docker Model Runner is running")
        if path == "/version":
            return json_response({"version": self.version})
        if path == "/metrics":
            if method != "GET":
                return text_error(405, "Method Not Allowed")
            return web.Response(
                text="# No active runners\n",
                headers={"Content-Type": "text/plain; version=0.0.4"},
            )
        if path in ("/models", "/models/") or path.startswith("/models/"):
            return await self._route_models(request, path, raw)
        if path.startswith("/v1/") or path in ("/rerank", "/score"):
            path = "/engines" + path
        if path.startswith("/engines/"):
            return await self._route_engines(request, path.removeprefix("/engines/"), raw)
        return text_error(404, "404 page not found")

    async def _route_models(
        self, request: web.Request, path: str, raw: bytes
    ) -> web.StreamResponse:
        method = request.method
        if path == "/models":
            if method == "GET":
                with self._lock:
                    return json_response([model.to_json() for model in self.store.models])
            return text_error(404, "not found")
        rest = path.removeprefix("/models/")
        if method == "POST" and rest == "create":
            return await self._pull(request, raw)
        if method == "DELETE" and rest == "purge":
            with self._lock:
                self.store.models.clear()
            return web.Response()
        if method == "GET":
            return self._get_model(rest, remote=_parse_bool(request.query.get("remote")))
        if method == "DELETE":
            return self._delete_model(rest, force=_parse_bool(request.query.get("force")))
        if method == "POST":
            name, _, action = rest.rpartition("/")
            if action == "tag" and name:
                return self._tag_model(name, request.query)
            return text_error(404, f"unknown action {golang.quote(action)}")
        return text_error(404, "not found")

    async def _route_engines(
        self, request: web.Request, rest: str, raw: bytes
    ) -> web.StreamResponse:
        method = request.method
        literal: dict[tuple[str, str], Callable[[], web.StreamResponse]] = {
            ("GET", "status"): self._backend_statuses,
            ("GET", "ps"): self._ps,
            ("GET", "df"): lambda: json_response(
                {"models_disk_usage": self.store.disk_usage(), "default_backend_disk_usage": 0}
            ),
            ("POST", "unload"): lambda: self._unload(raw),
            ("GET", "_configure"): lambda: self._read_configs(request.query.get("model")),
            ("GET", "requests"): lambda: json_response([]),
            ("POST", "install-backend"): lambda: self._install_backend(raw),
            ("POST", "uninstall-backend"): lambda: self._install_backend(raw),
            ("GET", "v1/models"): self._openai_models,
        }
        if (method, rest) in literal:
            return literal[(method, rest)]()
        if method == "POST" and rest == "_configure":
            return await self._configure("", raw)
        if method == "POST" and rest in _INFERENCE_ROUTES:
            return await self._inference(request, "", _INFERENCE_ROUTES[rest], raw)
        if method == "GET" and rest.startswith("v1/models/"):
            return self._openai_model(rest.removeprefix("v1/models/"))
        backend, _, sub = rest.partition("/")
        if backend and sub:
            if method == "POST" and sub == "_configure":
                return await self._configure(backend, raw)
            if method == "POST" and sub in _INFERENCE_ROUTES:
                return await self._inference(request, backend, _INFERENCE_ROUTES[sub], raw)
            if method == "GET" and sub == "v1/models":
                return self._openai_models()
            if method == "GET" and sub.startswith("v1/models/"):
                return self._openai_model(sub.removeprefix("v1/models/"))
        return text_error(404, "not found")

    # --- store routes -------------------------------------------------------------------------

    def _get_model(self, reference: str, *, remote: bool) -> web.Response:
        with self._lock:
            if remote:
                source = self._catalogue_entry(reference)
                if source is None:
                    return text_error(404, emulator_state.MODEL_NOT_FOUND)
                stored = emulator_state.StoredModel(source.digest, [], source)
                return json_response(stored.to_json(with_tags=False))
            model = self.store.get_local(reference) or self.store.find_by_partial_name(reference)
            if model is None:
                return text_error(404, emulator_state.MODEL_NOT_FOUND)
            return json_response(model.to_json())

    def _delete_model(self, reference: str, *, force: bool) -> web.Response:
        with self._lock:
            try:
                actions = self.store.delete(reference, force=force)
            except KeyError:
                return text_error(
                    404, f"error while deleting model: {emulator_state.MODEL_NOT_FOUND}"
                )
            except StoreConflict as conflict:
                return text_error(409, f"error while deleting model: {conflict}")
        return json_response(actions)

    def _tag_model(self, reference: str, query: Mapping[str, str]) -> web.Response:
        repo, tag = query.get("repo", ""), query.get("tag", "")
        if not repo or not tag:
            return text_error(400, "missing repo or tag query parameter")
        with self._lock:
            model = self.store.get_local(reference)
            if model is None:
                return text_error(404, emulator_state.MODEL_NOT_FOUND)
            target = f"{repo}:{tag}"
            self.store.add(model.source, self.store.tag_for(target))
        return json_response(
            {"message": f"Model tagged successfully with {target}", "target": target},
            status=201,
        )

    def _catalogue_entry(self, reference: str) -> CatalogueModel | None:
        return self.catalogue.get(references.qualified_tag(reference))

    async def _pull(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        try:
            data = json.loads(raw)
            reference = data.get("from") if isinstance(data, dict) else None
            if not isinstance(reference, str):
                raise ValueError
        except ValueError:
            return text_error(400, "invalid request body")
        tag = references.qualified_tag(reference)
        if not tag or not _plausible_reference(tag):
            return text_error(400, "Invalid model reference")
        source = self._catalogue_entry(reference)
        is_hugging_face = tag.startswith("huggingface.co/")
        if source is None and not is_hugging_face:
            return text_error(404, "Model not found")
        assert self._pull_slots is not None
        self.pulls_in_flight += 1
        self.max_pulls_in_flight = max(self.max_pulls_in_flight, self.pulls_in_flight)
        try:
            return await self._pull_in_slot(request, reference, tag, source, is_hugging_face)
        finally:
            self.pulls_in_flight -= 1

    async def _pull_in_slot(
        self,
        request: web.Request,
        reference: str,
        tag: str,
        source: CatalogueModel | None,
        is_hugging_face: bool,
    ) -> web.StreamResponse:
        assert self._pull_slots is not None
        async with self._pull_slots:
            is_json = request.headers.get("Accept") == "application/json"
            response = web.StreamResponse(
                status=200,
                headers={
                    "Cache-Control": "no-cache",
                    "Connection": "keep-alive",
                    "Content-Type": "application/json" if is_json else "text/plain",
                },
            )
            response.enable_chunked_encoding()
            await response.prepare(request)

            async def emit(kind: str, message: str, **extra: Any) -> None:
                line = go_json({"type": kind, "message": message, **extra, "mode": "pull"})
                await response.write((line if is_json else go_html_escape(line)).encode())

            if is_hugging_face:
                await emit(
                    "progress", "Fetching file list...", total=0, layer={"size": 0, "current": 0}
                )
                if source is None:
                    # Hugging Face errors arrive after the first line: 200 + plain text.
                    await response.write(b"Model not found\n")
                    await response.write_eof()
                    return response
            assert source is not None
            with self._lock:
                cached = self.store.by_digest(source.digest) is not None
                failure = self.pull_failures.get(tag)
                stored_tag = self.store.tag_for(reference)
            if cached:
                with self._lock:
                    self.store.add(source, stored_tag)
                await emit(
                    "success",
                    f"Using cached model: {source.size_label}",
                    total=0,
                    layer={"size": 0, "current": 0},
                )
                await response.write_eof()
                return response
            lines = 0
            layer_size = max(1, source.size // source.layers)
            for layer in range(source.layers):
                layer_id = emulator_state.fake_digest(f"{source.digest}/layer/{layer}")
                for step in range(1, self.pull_steps_per_layer + 1):
                    if failure is not None and lines >= failure.after_lines:
                        if failure.error_line:
                            await emit(
                                "error",
                                f"Error: {failure.message}",
                                total=0,
                                layer={"size": 0, "current": 0},
                            )
                        if failure.trailing_text:
                            text = f"error while pulling model: {failure.message}\n"
                            await response.write(text.encode())
                        await response.write_eof()
                        return response
                    if self.pull_line_delay:
                        await asyncio.sleep(self.pull_line_delay)
                    current = layer_size * step // self.pull_steps_per_layer
                    await emit(
                        "progress",
                        f"Downloaded: {current / 1024 / 1024:.2f} MB",
                        total=source.size,
                        layer={"id": layer_id, "size": layer_size, "current": current},
                    )
                    lines += 1
            with self._lock:
                self.store.add(source, stored_tag)
            await emit(
                "success", "Model pulled successfully", total=0, layer={"size": 0, "current": 0}
            )
            await response.write_eof()
            return response

    # --- engine routes ------------------------------------------------------------------------

    def _ps(self) -> web.Response:
        with self._lock:
            return json_response(self.loader.status())

    def _unload(self, raw: bytes) -> web.Response:
        try:
            data = json.loads(raw)
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise DecodeError
            unload_all = data.get("all") or False
            backend = data.get("backend") or ""
            models = data.get("models") or []
            if (
                not isinstance(unload_all, bool)
                or not isinstance(backend, str)
                or not isinstance(models, list)
                or not all(isinstance(model, str) for model in models)
            ):
                raise DecodeError
        except ValueError:
            return text_error(400, "invalid request")
        with self._lock:
            count = self.loader.unload(unload_all=unload_all, backend=backend, models=models)
        return json_response({"unloaded_runners": count})

    def _install_backend(self, raw: bytes) -> web.Response:
        try:
            backend = json.loads(raw).get("backend")
        except (ValueError, AttributeError):
            backend = None
        if not backend:
            return text_error(400, "invalid request: backend is required")
        if backend not in validation.BACKENDS:
            return text_error(404, validation.BACKEND_NOT_FOUND)
        return web.Response()

    def _read_configs(self, model: str | None) -> web.Response:
        with self._lock:
            return json_response(self.loader.config_entries(model))

    def _openai_models(self) -> web.Response:
        with self._lock:
            data = [model.to_openai() for model in self.store.models]
        return json_response({"object": "list", "data": data})

    def _openai_model(self, reference: str) -> web.Response:
        with self._lock:
            model = self.store.get_local(reference)
            if model is None:
                return text_error(404, _model_not_found(reference))
            return json_response(model.to_openai())

    async def _configure(self, path_backend: str, raw: bytes) -> web.Response:
        backend = path_backend or validation.DEFAULT_BACKEND
        if backend not in validation.BACKENDS:
            return text_error(404, validation.BACKEND_NOT_FOUND)
        try:
            request = emulator_state.decode_configure_request(json.loads(raw))
        except (ValueError, DecodeError):
            return text_error(400, "invalid request")
        if self.configure_failure is not None:
            return text_error(500, self.configure_failure)
        try:
            with self._lock:
                selected = self.loader.configure(backend, request)
        except ConfigError as error:
            return text_error(error.status, error.message)
        self._spawn(self._preload(selected, request.model))
        return web.Response(status=202)

    async def _preload(self, backend: str, model: str) -> None:
        """model-runner's background preload after ``_configure`` (always completion mode),
        given up after ``preload_timeout``: a runner still loading then is terminated."""
        try:
            runner = await asyncio.wait_for(
                self._acquire_runner(backend, model, "completion"),
                timeout=self.preload_timeout * self.time_scale,
            )
        except TimeoutError:
            with self._lock:
                for key, loading in list(self.loader.runners.items()):
                    if loading.loading and loading.model_ref == model:
                        del self.loader.runners[key]
            return
        except _InferenceError:
            return
        self._release(runner)

    def _backend_statuses(self) -> web.Response:
        if time.monotonic() - self._started_at < self.install_delay:
            return json_response(dict.fromkeys(self.backend_status, "Not Installed"))
        return json_response(dict(self.backend_status))

    # --- the Ollama API -----------------------------------------------------------------------

    async def _ollama(self, request: web.Request, path: str, raw: bytes) -> web.StreamResponse:
        """``/api/chat`` and ``/api/generate``: ``num_ctx``, ``keep_alive`` or a boolean ``think``
        make the runner store a new configuration for the model that *replaces* the one it had
        (only those fields, the rest gone), before it answers. ``ollama_replaces_config=False``
        turns that off for tests that want an Ollama client without the side effect."""
        try:
            body, model = _model_request(raw)
        except ValueError:
            return text_error(400, "invalid request")
        if self.ollama_replaces_config:
            replacement = ollama_configuration(model, body)
            if replacement is not None:
                with self._lock, contextlib.suppress(ConfigError):
                    self.loader.configure(validation.DEFAULT_BACKEND, replacement)
        try:
            runner = await self._acquire_runner("", model, "completion")
        except _InferenceError as error:
            return text_error(error.status, error.message)
        try:
            created = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            answer: dict[str, Any] = {"model": model, "created_at": created}
            if path == "/api/chat":
                answer["message"] = {"role": "assistant", "content": "Hello from the emulator."}
            else:
                answer["response"] = "Hello from the emulator."
            answer["done"] = True
            return json_response(answer)
        finally:
            self._release(runner)

    # --- inference ------------------------------------------------------------------------------

    def _runner_key(self, backend: str, model_id: str, mode: str) -> emulator_state.RunnerKey:
        config = self.loader.config_for(backend, model_id, mode)
        draft_id = ""
        if config is not None and config.speculative and config.speculative.draft_model:
            draft_id = self.store.resolve_model_id(config.speculative.draft_model)
        return (backend, model_id, draft_id, mode)

    async def _acquire_runner(self, path_backend: str, model: str, mode: str) -> Runner:
        """Find or load the runner for a request and take a reference on it."""
        backend = path_backend or validation.DEFAULT_BACKEND
        if backend not in validation.BACKENDS:
            raise _InferenceError(404, validation.BACKEND_NOT_FOUND)
        with self._lock:
            local = self.store.get_local(model)
            if local is None:
                raise _InferenceError(404, _model_not_found(model))
            backend = validation.default_backend_for_format(
                local.source.format, path_backend=backend
            )
            status = self.backend_status.get(backend, "")
            if not status.startswith("Running"):
                detail = status.partition(": ")[2] or status
                raise _InferenceError(503, f"backend installation failed: {detail}")
            config = self.loader.config_for(backend, local.digest, mode)
            self._check_engine_start(backend, config)
            key = self._runner_key(backend, local.digest, mode)
            runner = self.loader.runners.get(key)
        created = False
        while runner is None:
            with self._lock:
                runner = self.loader.runners.get(key)
                if runner is None and self.loader.evict_for_a_new_runner(self.runner_slots):
                    runner = Runner(key=key, model_ref=model, loading=True)
                    self.loader.runners[key] = runner
                    created = True
            if runner is None:  # every slot busy: the request waits, as in model-runner
                await asyncio.sleep(0.05)
        with self._lock:
            runner.references += 1
        if created:
            if self.load_delay:
                await asyncio.sleep(self.load_delay)
            runner.loading = False
            runner.ready.set()
        # Concurrent requests for a model that is loading wait for that one load.
        await runner.ready.wait()
        return runner

    def _check_engine_start(self, backend: str, config: wire.BackendConfiguration | None) -> None:
        if config is None:
            return
        if backend == "vllm" and config.vllm is not None:
            utilization = config.vllm.gpu_memory_utilization
            if utilization is not None:
                try:
                    validation.validate_gpu_memory_utilization(utilization)
                except validation.RunnerValidationError as error:
                    raise _InferenceError(500, f"unable to load runner: {error}") from None
        draft = config.speculative.draft_model if config.speculative else None
        if draft and self.store.get_local(draft) is None:
            raise _InferenceError(
                500, f"unable to load runner: draft model {golang.quote(draft)}: model not found"
            )

    def _release(self, runner: Runner) -> None:
        with self._lock:
            runner.references = max(0, runner.references - 1)
            runner.last_used = max(time.time(), runner.held_until)

    async def _inference(
        self, request: web.Request, path_backend: str, mode: str, raw: bytes
    ) -> web.StreamResponse:
        backend = path_backend or validation.DEFAULT_BACKEND
        if backend not in validation.BACKENDS:
            return text_error(404, validation.BACKEND_NOT_FOUND)
        try:
            body, model = _model_request(raw)
        except ValueError:
            return text_error(400, "invalid request")
        if not model:
            return text_error(400, "model is required")
        try:
            runner = await self._acquire_runner(path_backend, model, mode)
        except _InferenceError as error:
            return text_error(error.status, error.message)
        try:
            if request.headers.get("X-Preload-Only") == "true":
                return web.Response()
            if self.inference_delay:
                await asyncio.sleep(self.inference_delay)
            return await _canned_reply(request, request.path, body, model)
        finally:
            self._release(runner)

    async def _expire_idle_runners(self) -> None:
        while True:
            await asyncio.sleep(self.idle_check_interval)
            with self._lock:
                self.loader.expire_idle(time_scale=self.time_scale)


def ollama_configuration(model: str, body: Mapping[str, Any]) -> wire.ConfigureRequest | None:
    """The configuration an Ollama ``/api/chat`` or ``/api/generate`` body makes model-runner
    store (upstream ``pkg/ollama``: ``options.num_ctx``, ``keep_alive`` (also inside
    ``options``), boolean ``think`` as reasoning budget -1/0), or None when it names none."""
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    assert isinstance(options, dict)
    keep_alive = body.get("keep_alive") if isinstance(body.get("keep_alive"), str) else ""
    if not keep_alive and isinstance(options.get("keep_alive"), str):
        keep_alive = options["keep_alive"]
    context = options.get("num_ctx")
    think = body.get("think")
    fields: dict[str, Any] = {"model": model}
    if isinstance(context, int | float) and not isinstance(context, bool):
        fields["context-size"] = int(context)
    if isinstance(think, bool):
        fields["llamacpp"] = {"reasoning-budget": -1 if think else 0}
    if keep_alive:
        try:
            validation.parse_keep_alive(keep_alive)
            fields["keep_alive"] = keep_alive
        except validation.RunnerValidationError:
            pass  # upstream logs the bad value and configures without it
    if len(fields) == 1:
        return None
    return emulator_state.decode_configure_request(fields)


class _InferenceError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _model_request(raw: bytes) -> tuple[dict[str, Any], str]:
    """An inference request's JSON object and its ``model``; ValueError as Go's decoder fails."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError
    return body, _string_or_empty(body.get("model"))


def _string_or_empty(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError
    return value


def _parse_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool; a bare ``?force`` (empty value) counts as true."""
    if value is None:
        return False
    return value in ("", "1", "t", "T", "true", "TRUE", "True")


def _plausible_reference(tag: str) -> bool:
    return re.fullmatch(references.MODEL_REFERENCE_PATTERN, tag) is not None


def _fake_vector(seed: str) -> list[float]:
    digest = emulator_state.fake_digest(seed).removeprefix("sha256:")
    return [int(digest[i : i + 4], 16) / 65535 for i in range(0, 4 * _EMBEDDING_DIMENSIONS, 4)]


async def _canned_reply(
    request: web.Request, path: str, body: Mapping[str, Any], model: str
) -> web.StreamResponse:
    created = int(time.time())
    content = f"Hello from the model-runner emulator ({model})."
    if path.endswith("/embeddings"):
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        return json_response(
            {
                "object": "list",
                "model": model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": _fake_vector(str(item))}
                    for i, item in enumerate(items)
                ],
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )
    if path.endswith(("/rerank", "/score")):
        documents = body.get("documents") or []
        results = [
            {"index": i, "relevance_score": _fake_vector(str(doc))[0]}
            for i, doc in enumerate(documents)
        ]
        results.sort(key=lambda item: -float(item["relevance_score"]))
        return json_response({"model": model, "results": results})
    if path.endswith("/images/generations"):
        return json_response({"created": created, "data": [{"b64_json": ""}]})
    if path.endswith("/messages/count_tokens"):
        return json_response({"input_tokens": 8})
    if path.endswith("/messages"):
        return json_response(
            {
                "id": "msg_emulator",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": content}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 8, "output_tokens": 8},
            }
        )
    completion_id = f"chatcmpl-emulator-{created}"
    is_chat = path.endswith("/chat/completions")
    if body.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = content.split(" ")
        chunks: list[dict[str, Any]] = []
        for index, word in enumerate(words):
            piece = word if index == 0 else " " + word
            choice: dict[str, Any] = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if is_chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            chunks.append(choice)
        chunks.append(
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if is_chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        kind = "chat.completion.chunk" if is_chat else "text_completion"
        for choice in chunks:
            event = {
                "id": completion_id,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    usage = {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
    if is_chat:
        message = {"role": "assistant", "content": content}
        return json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )
    return json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": content, "finish_reason": "stop"}],
            "usage": usage,
        }
    )


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=constants.RUNNER_PORT, help="TCP port")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="REF",
        help="catalogue model to have in the store at start (repeatable)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply keep_alive durations (0.01: 5m idle expiry after 3s)",
    )
    parser.add_argument(
        "--pull-line-delay", type=float, default=0.05, help="seconds between pull progress lines"
    )
    parser.add_argument("--load-delay", type=float, default=0.2, help="seconds to load a runner")


async def _serve(args: argparse.Namespace) -> None:
    emulator = ModelRunnerEmulator()
    emulator.time_scale = args.time_scale
    emulator.pull_line_delay = args.pull_line_delay
    emulator.load_delay = args.load_delay
    emulator.preload_store(*args.preload)
    await emulator.start(args.host, args.port)
    log.info("model-runner emulator listening on %s", emulator.url)
    print(f"model-runner emulator listening on {emulator.url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    try:
        await stopping.wait()
    finally:
        await emulator.stop()


def emulator_command(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dmr_operator.testing.emulator")
    add_arguments(parser)
    return emulator_command(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
