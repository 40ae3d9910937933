"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a `kiln.LLM`.

    app = build_app(LLM("smollm2-135m"), api_key="secret")   # or: kiln serve smollm2-135m
    serve(llm, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming with SSE or not),
GET /v1/models, GET /health, GET /metrics (Prometheus). With an API key, every route but
/health needs `Authorization: Bearer <key>`. The engine runs in one background thread
(runtime/server_engine.py); handlers only tokenize, submit and format.

Every mistake a client can make is a 4xx with an OpenAI-style error body, and the server keeps
serving: bad JSON or fields (400), unknown model (404), a body over `max_body_bytes` (413), a
prompt or max_tokens the context cannot hold (400). A client that disconnects aborts its
request, which frees its KV blocks. A failed engine step fails the requests in flight (500, or
an error event in a stream) and the engine thread goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import KilnError
from kiln.runtime.metrics import CONTENT_TYPE, ServerMetrics
from kiln.runtime.openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest, invalid_request,
                                          model_not_found, parse_request, server_error)
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server_engine import EngineFailure, EngineLoop
from kiln.runtime.server_responses import ChatRenderer, CompletionRenderer, Renderer, event_stream, full_response

if TYPE_CHECKING:
    from kiln.llm import LLM

log = logging.getLogger("kiln.server")
MAX_BODY_BYTES = 1 << 20
CLIENT_CLOSED = 499  # the status logged for a request whose client left before the response


def build_app(llm: LLM, *, model_name: str | None = None, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app serving `llm`. Its engine thread starts and stops with the app's lifespan,
    so run it under uvicorn (or another ASGI server with lifespan support); one app at a time
    may serve a given `llm`, since the engine is single-threaded."""
    model_name = model_name or str(llm.artifact.manifest["model"]["source"])
    metrics = ServerMetrics(lambda: engine_loop.stats)  # read at scrape time, once engine_loop exists
    engine_loop = EngineLoop(llm.engine, on_finished=metrics.observe_finished)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.close()

    app = FastAPI(title="kiln", lifespan=lifespan)
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise model_not_found(name)

    def decode_token(token_id: int) -> str:
        return llm.tokenizer.decode([token_id], skip_special_tokens=False)

    async def respond(request: Request, renderer: Renderer, prompts: list[list[int]], params: SamplingParams,
                      stream: bool, include_usage: bool, arrival: float) -> Response:
        submission = await engine_loop.submit(renderer.request_id, prompts, params, arrival)
        prompt_tokens = sum(len(p) for p in prompts)
        if stream:
            events = event_stream(submission, renderer, num_prompts=len(prompts), n=params.n,
                                  prompt_tokens=prompt_tokens, include_usage=include_usage)
            return _EventStreamResponse(events, on_close=submission.abort)
        try:
            body = await _unless_disconnected(request, full_response(submission, renderer, params.n, prompt_tokens))
        finally:
            submission.abort()
        return Response(status_code=CLIENT_CLOSED) if body is None else JSONResponse(body)

    @app.get("/health")
    async def health() -> Response:
        if engine_loop.is_alive:
            return Response(status_code=200)
        return JSONResponse(server_error("the engine thread stopped; restart the server").body(), status_code=503)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "kiln",
                "max_model_len": llm.executor.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_request(CompletionRequest, await _read_json(request, max_body_bytes))
        check_model(body.model)
        params = body.sampling_params()
        prompts = [llm.encode(p) for p in body.prompts()]
        renderer = CompletionRenderer(f"cmpl-{uuid.uuid4().hex}", model_name, decode_token)
        return await respond(request, renderer, prompts, params, bool(body.stream), body.include_usage, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_request(ChatCompletionRequest, await _read_json(request, max_body_bytes))
        check_model(body.model)
        params = body.sampling_params()
        prompt = llm.chat_prompt(body.messages)
        renderer = ChatRenderer(f"chatcmpl-{uuid.uuid4().hex}", model_name, decode_token)
        return await respond(request, renderer, [prompt], params, bool(body.stream), body.include_usage, arrival)

    return app


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Serve `llm` until interrupted (Ctrl-C stops it gracefully)."""
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    app = build_app(llm, model_name=model_name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _read_json(request: Request, limit: int):
    """The decoded JSON body; 413 past `limit` bytes (checked while reading), 400 if not JSON."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes; send a shorter prompt",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid_request(f"the request body is not valid JSON ({e}); send a JSON object") from None


async def _unless_disconnected(request: Request, work: Awaitable[dict]) -> dict | None:
    """`work`'s result, or None (with `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStreamResponse(StreamingResponse):
    """An SSE response that calls `on_close` however it ends: finished, client gone, or the
    server stopping (Starlette cancels a stream whose client disconnected)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


class _APIKeyMiddleware:
    """401 for any HTTP request but GET /health without `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = APIError(401, "missing or incorrect API key; send the header `Authorization: Bearer <key>`",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def answer(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return answer(e)

    async def kiln_error(request: Request, e: KilnError) -> JSONResponse:
        return answer(invalid_request(str(e)))

    async def engine_failure(request: Request, e: EngineFailure) -> JSONResponse:
        return answer(server_error(str(e)))

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return answer(APIError(e.status_code, f"{e.detail}: {hint}", code=e.status_code))

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return answer(server_error(f"internal error ({type(e).__name__}: {e})"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(KilnError, kiln_error)
    app.add_exception_handler(EngineFailure, engine_failure)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
