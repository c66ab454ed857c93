"""The ASGI app: routes of every API, health and metrics, the playground page, and around them one middleware
that gives each request an id (in its logs and its ``X-Request-Id`` header), bounds its body, checks the API key
(the page's own files need none) and times it; every error is one JSON line (errors.ApiError), never a traceback."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdtrt.engine.version import VERSION
from sdtrt.serve import a1111, native, openai, playground
from sdtrt.serve.config import ServeConfig
from sdtrt.serve.errors import ApiError
from sdtrt.serve.logs import request_id
from sdtrt.serve.server import Server

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")  # answered without the API key: load balancers and orchestrators probe them
PROBE_PATHS = (*OPEN_PATHS, "/metrics", "/sdapi/v1/progress", "/v1/progress")  # polled: logged at debug level only
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an X-Request-Id a client may choose
HTTP_KINDS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def create_app(config: ServeConfig, server: Server | None = None) -> FastAPI:
    """The server's app; it loads the models when it starts (its lifespan) and stops their workers at the end."""
    server = Server(config) if server is None else server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="sdtrt", version=VERSION, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server
    app.include_router(native.make_router())
    app.include_router(openai.router)
    app.include_router(a1111.router)
    app.include_router(a1111.controlnet_router)
    playground.mount(app)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(RequestMiddleware, server=server)
    return app


async def healthz(http: HttpRequest) -> dict[str, Any]:
    """The process answers (and which process: a Ray replica is told apart by it)."""
    import os

    return {"status": "ok", "pid": os.getpid()}


async def readyz(http: HttpRequest) -> JSONResponse:
    """200 once every model is loaded and warmed up, else 503 with each model's state."""
    server: Server = http.app.state.server
    models = {
        name: "ready" if w.ready.is_set() else (f"failed: {w.client_text(w.failure)}" if w.failure else "loading")
        for name, w in server.workers.items()
    }
    return JSONResponse({"ready": server.ready, "models": models}, status_code=200 if server.ready else 503)


async def metrics(http: HttpRequest) -> Response:
    server: Server = http.app.state.server
    for name, worker in server.workers.items():
        server.metrics.queue_depth.labels(name).set(worker.depth)
    return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


# --------------------------------------------------------------------------------------------------
# Errors: one JSON line each, counted by kind


def _respond(http: HttpRequest, error: ApiError) -> JSONResponse:
    http.app.state.server.metrics.errors.labels(error.kind).inc()
    if error.kind == "internal":
        log.error("%s", error.message)
    else:
        log.info("%d %s: %s", error.status, error.kind, error.message)
    return error.response(request_id.get())


async def _api_error(http: HttpRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _respond(http, exc)


async def _validation_error(http: HttpRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return _respond(
            http, ApiError("invalid_input", f"the body is not valid JSON: {first.get('ctx', {}).get('error')}")
        )
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    route = http.scope.get("route")
    body = getattr(getattr(route, "body_field", None), "field_info", None)
    fields = getattr(getattr(body, "annotation", None), "model_fields", None)
    if first.get("type") == "extra_forbidden" and fields:  # a field the route's body does not have
        options = ", ".join(fields)
        return _respond(http, ApiError("invalid_input", f"{route.name} has no option {where!r} (options: {options})"))
    return _respond(http, ApiError("invalid_input", f"{where}: {first.get('msg', 'invalid')}"))


async def _http_error(http: HttpRequest, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = HTTP_KINDS.get(exc.status_code, "invalid_input" if exc.status_code < 500 else "internal")
    return _respond(http, ApiError(kind, str(exc.detail), dict(exc.headers or {})))  # 405's Allow


# --------------------------------------------------------------------------------------------------


class RequestMiddleware:
    """Request id, body limit, API key and latency of every HTTP request (plain ASGI: it streams nothing itself)."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        asked = headers.get("x-request-id", "")
        rid = asked if CLIENT_REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        start, status, started = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            error = self._refusal(scope["path"], headers)
            if error is None:
                body, error = await self._read_body(receive)
            if error is not None:
                self.server.metrics.errors.labels(error.kind).inc()
                await error.response(rid)(scope, receive, send_with_id)
                return
            await self.app(scope, _replay(body, receive), send_with_id)
        except Exception as exc:  # a bug: the client gets one line and the request id, the log the traceback
            log.error("unexpected error", exc_info=exc)
            self.server.metrics.errors.labels("internal").inc()
            if not started:
                error = ApiError("internal", f"internal error (request {rid}); the server log has details")
                await error.response(rid)(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path, seconds = getattr(route, "path", "other"), time.perf_counter() - start
            self.server.metrics.request_seconds.labels(path, str(status)).observe(seconds)
            level = logging.DEBUG if scope["path"] in PROBE_PATHS else logging.INFO  # scraped every few seconds
            log.log(level, "%s %s %d in %.3f s", scope["method"], scope["path"], status, seconds)
            request_id.reset(token)

    def _refusal(self, path: str, headers: dict[str, str]) -> ApiError | None:
        key = self.server.config.api_key
        if key and path not in OPEN_PATHS and not playground.is_page(path):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ApiError(
                    "unauthorized",
                    "a valid API key is needed: Authorization: Bearer KEY",
                    {"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length", "")
        limit = self.server.config.limits.max_body_bytes
        if length.isdecimal() and int(length) > limit:
            return _too_large(limit)
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes, ApiError | None]:
        """The whole body, read before the app runs (so a chunked body over the limit is refused too)."""
        limit = self.server.config.limits.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", ApiError("cancelled", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _too_large(limit: int) -> ApiError:
    return ApiError("too_large", f"the request body is above this server's limit of {limit} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then the client's later messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
