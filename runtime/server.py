"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a `kiln.LLM`.

    app = build_app(LLM("smollm2-135m"), api_key="secret")   # or: kiln serve smollm2-135m
    serve(llm, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming with SSE or not; chat
with tools, whose calls `tool_call_parser` reads, see runtime/tool_calls.py),
GET /v1/models, GET /health, GET /metrics (Prometheus). With an API key, every route but
/health needs `Authorization: Bearer <key>`. The engine runs in one background thread
(runtime/server_engine.py); handlers parse, submit and format, and tokenize in worker threads
(`_encode`), so that a long prompt does not stall the other connections.

Every mistake a client can make is a 4xx with an OpenAI-style error body, and the server keeps
serving: a body that is not JSON, nests deeper than the limit, or has bad fields (400), not sent
as application/json (415), an unknown model (404), a body over the byte limit (413), more prompts
or prompt tokens than a request may have, or a prompt or max_tokens the context cannot hold
(400); `RequestLimits` holds the limits. A client that disconnects aborts its request, which
frees its KV blocks. A failed engine step fails the requests in flight (500, or an error event
in a stream) and the engine thread goes on.

Shutdown (`serve`: SIGTERM or Ctrl-C) drains: new requests get 503, those in progress may finish
for `drain_timeout` seconds, then each one left ends with an error (an error event and
`data: [DONE]` in a stream, a 503 otherwise) and its engine requests are aborted.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.runtime.metrics import CONTENT_TYPE, ServerMetrics
from kiln.runtime.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    decode_json,
    invalid_request,
    model_not_found,
    parse_request,
    server_error,
    shutting_down,
)
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server_engine import EngineFailure, EngineLoop
from kiln.runtime.server_responses import ChatRenderer, CompletionRenderer, Renderer, event_stream, full_response
from kiln.runtime.tool_calls import keeps_special_tokens, parser_named

if TYPE_CHECKING:
    from kiln.llm import LLM

log = logging.getLogger("kiln.server")
DEFAULT_LIMITS = RequestLimits()
CLIENT_CLOSED = 499  # the status logged for a request whose client left before the response
DRAIN_TIMEOUT_S = 30.0  # how long a shutdown lets the requests in progress finish
FLUSH_S = 5.0  # after the drain, how long the requests ended with an error have to send it
POLL_S = 0.05


def build_app(llm: LLM, *, model_name: str | None = None, api_key: str | None = None,
              limits: RequestLimits = DEFAULT_LIMITS, tool_call_parser: str | None = None) -> FastAPI:
    """A FastAPI app serving `llm`. Its engine thread starts and stops with the app's lifespan,
    so run it under uvicorn (or another ASGI server with lifespan support); one app at a time
    may serve a given `llm`, since the engine is single-threaded. `await app.state.drain(timeout)`
    stops it gracefully (`serve` calls it on SIGTERM). `tool_call_parser`: the format of the
    model's tool calls (`tool_calls.PARSERS`; None: found in its chat template, if it shows one)."""
    model_name = model_name or str(llm.artifact.manifest["model"]["source"])
    auto_parser = parser_named(tool_call_parser, llm.chat_template.source if llm.chat_template else None)
    engine_loop: EngineLoop
    metrics = ServerMetrics(lambda: engine_loop.stats)  # read at scrape time, once engine_loop exists
    engine_loop = EngineLoop(llm.engine, on_finished=metrics.observe_finished)
    admission = _Admission()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.close()
            stats = engine_loop.stats
            log.info("engine stopped; %d of %d KV-cache blocks free", stats.kv_blocks_free, stats.kv_blocks_total)

    app = FastAPI(title="kiln", lifespan=lifespan)
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    app.add_middleware(_AdmissionMiddleware, admission=admission)

    async def drain(timeout: float) -> None:
        """Refuse new requests (503) and let those in progress finish for up to `timeout` seconds;
        then end the rest with a 503 error (in a stream: an error event, then `data: [DONE]`) and
        abort their engine requests, which frees their KV blocks."""
        admission.close()
        log.info("shutting down: new requests get 503; %d in progress may finish within %g s",
                 admission.in_flight, timeout)
        if await admission.wait_idle(timeout):
            return
        log.warning("ending the %d requests still in progress after %g s", admission.in_flight, timeout)
        engine_loop.stop_serving(shutting_down(
            f"the server shut down before this request finished (it waited {timeout:g} s for it); retry it"))
        await admission.wait_idle(FLUSH_S)

    app.state.drain = drain

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
        body = parse_request(CompletionRequest, await _read_json(request, limits))
        check_model(body.model)
        params = body.sampling_params()
        texts_or_ids = body.prompts()
        limits.check_prompt_count(len(texts_or_ids))
        prompts = await asyncio.to_thread(_encode, llm.tokenizer, texts_or_ids)
        limits.check_prompt_tokens(prompts, "prompt")
        renderer = CompletionRenderer(f"cmpl-{uuid.uuid4().hex}", model_name, decode_token)
        return await respond(request, renderer, prompts, params, bool(body.stream), body.include_usage, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        body = parse_request(ChatCompletionRequest, await _read_json(request, limits))
        check_model(body.model)
        params = body.sampling_params()
        tool_use = body.tool_use()
        prompt = await asyncio.to_thread(_chat_prompt, llm, body.chat_messages(), tool_use.tools if tool_use else None)
        limits.check_prompt_tokens([prompt], "messages")
        parser = tool_use.parser(auto_parser) if tool_use else None
        if parser is not None and keeps_special_tokens(parser, llm.tokenizer):
            params = replace(params, skip_special_tokens=False)
        renderer = ChatRenderer(f"chatcmpl-{uuid.uuid4().hex}", model_name, decode_token, parser)
        return await respond(request, renderer, [prompt], params, bool(body.stream), body.include_usage, arrival)

    return app


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info", limits: RequestLimits = DEFAULT_LIMITS,
          drain_timeout: float = DRAIN_TIMEOUT_S, tool_call_parser: str | None = None) -> None:
    """Serve `llm` until SIGTERM or Ctrl-C, then drain (see `build_app`'s `drain`): requests in
    progress get up to `drain_timeout` seconds to finish. A second signal skips the drain (uvicorn
    then cuts what is left after 5 s), a third exits at once. Returns normally after a signal, so
    `kiln serve` exits 0."""
    if not drain_timeout >= 0:
        raise KilnError(f"drain_timeout must be >= 0 seconds, got {drain_timeout!r}")
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    app = build_app(llm, model_name=model_name, api_key=api_key, limits=limits, tool_call_parser=tool_call_parser)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    _DrainingServer(config, drain=lambda: app.state.drain(drain_timeout)).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or Ctrl-C runs `drain()` before uvicorn's own
    shutdown (which then finds nothing left to wait for). Unlike uvicorn, it does not re-raise
    the signal once stopped."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Coroutine[Any, Any, None]]):
        super().__init__(config)
        self._drain = drain
        self._drain_requested = False
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        """The signal handler: only sets flags, which `on_tick` (every 0.1 s) acts on."""
        if not self._drain_requested:
            self._drain_requested = True
        elif not self.should_exit:
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """True when the server should stop: the drain finished, or uvicorn's own reasons."""
        if self._drain_requested and self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        if self._draining is not None and self._draining.done():
            return True
        return await super().on_tick(counter)


def _encode(tokenizer: Tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    """`LLM.encode` of each prompt (texts tokenized, token-id lists as given), with the texts in one
    `encode_batch` call: unlike `encode`, it releases the GIL, so in a worker thread a long text
    does not stall the event loop."""
    encoded = iter(tokenizer.encode_batch([p for p in prompts if isinstance(p, str)]))
    return [next(encoded).ids if isinstance(p, str) else list(p) for p in prompts]


def _chat_prompt(llm: LLM, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """`LLM.chat_prompt` (with `tools` for the template), tokenized with `encode_batch` (see `_encode`)."""
    if llm.chat_template is None:
        raise KilnError("this model has no chat template; use /v1/completions with a plain prompt")
    [encoding] = llm.tokenizer.encode_batch([llm.chat_template.render(messages, tools=tools)], add_special_tokens=False)
    return encoding.ids


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _read_json(request: Request, limits: RequestLimits):
    """The decoded JSON body (`decode_json`, in a worker thread). 415 unless sent as
    application/json (or with no Content-Type), 413 past `limits.max_body_bytes` (checked while
    reading), 400 if not JSON or nested deeper than `limits.max_json_depth`."""
    content_type = request.headers.get("content-type")
    if content_type is not None and content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be JSON, sent with `Content-Type: application/json` "
                            f"(got `{content_type[:100]}`)", code="unsupported_media_type")
    limit = limits.max_body_bytes
    too_large = APIError(413, f"the request body is larger than {limit} bytes (the server's max_body_bytes); "
                              "send a shorter prompt", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return await asyncio.to_thread(decode_json, bytes(body), limits.max_json_depth)


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

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self._events.aclose()


class _Admission:
    """Counts the HTTP requests in progress; once closed, new ones are refused."""

    def __init__(self):
        self.is_open = True
        self.in_flight = 0

    def close(self) -> None:
        self.is_open = False

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in progress, False if some still are after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True


class _AdmissionMiddleware:
    """Counts every HTTP request in `admission` while it runs; 503 once `admission` is closed."""

    def __init__(self, app, admission: _Admission):
        self.app = app
        self._admission = admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._admission.is_open:
            error = shutting_down("the server is shutting down and takes no new requests; "
                                  "retry on another server or once this one restarts")
            await JSONResponse(error.body(), status_code=503, headers={"Connection": "close"})(scope, receive, send)
            return
        self._admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._admission.in_flight -= 1


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
        return answer(invalid_request(str(e), e.param))

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
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # typed for Exception only
    app.add_exception_handler(Exception, unexpected)
