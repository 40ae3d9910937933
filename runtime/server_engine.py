"""The one thread that owns the `LLMEngine` while the server runs.

The engine is single-threaded. Request handlers (on the asyncio event loop) never call it:
they send commands through a thread-safe queue (add a request, abort one) and read
`RequestOutput`s from a per-request asyncio queue that the engine thread feeds with
`call_soon_threadsafe`. Between steps the thread applies every pending command, then runs one
`engine.step()` and routes the outputs.

Failures stay per request: `add_request` rejecting a prompt answers only that submission
(a `KilnError`, a 400); an exception inside `step()` fails every request in flight with an
`EngineFailure` (the step's state is unknown, so all of them are aborted and their KV blocks
freed), and the loop goes on serving new requests.

`stop_serving(error)` (a shutdown) aborts every request in flight the same way, answering each
with `error`, and answers every later submission with it too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.request import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.stats import EngineStats

log = logging.getLogger("kiln.server")
IDLE_WAIT_S = 0.5  # how long an idle engine thread waits for a command before re-checking `closed`


class EngineFailure(Exception):
    """The engine raised while running this request; the request was aborted."""


class _Accepted:
    """The first item of a submission's queue when every prompt was added."""


@dataclass(frozen=True)
class _Add:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    arrival_time: float
    sink: Callable[[object], None]


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class _StopServing:
    error: Exception


class Submission:
    """A handler's view of its engine requests (one per prompt, ids `<request_id>-<i>`)."""

    def __init__(self, engine_loop: EngineLoop, request_ids: list[str], outputs: asyncio.Queue):
        self._engine_loop = engine_loop
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._outputs = outputs
        self._unfinished = set(request_ids)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, until every prompt finished.
        Raises EngineFailure if a step failed, or the error given to `EngineLoop.stop_serving`."""
        while self._unfinished:
            item = await self._outputs.get()
            if isinstance(item, Exception):
                self._unfinished.clear()
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield self._index[item.request_id], item

    def abort(self) -> None:
        """Stop the unfinished requests (their KV blocks return to the pool); safe to repeat."""
        if self._unfinished:
            self._engine_loop.send(_Abort(sorted(self._unfinished)))
            self._unfinished.clear()


class EngineLoop:
    """Runs `engine` in a background thread between `start()` and `close()`.

    `on_finished(output)` is called on the engine thread for every finished request (aborted
    ones included), e.g. to record latency metrics."""

    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] = lambda output: None):
        self._engine = engine
        self._on_finished = on_finished
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable[[object], None]] = {}
        self._refusal: Exception | None = None  # set by stop_serving: the answer to every new request
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self.stats: EngineStats = engine.stats()  # refreshed by the engine thread after every step

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._commands.put(None)  # wakes an idle thread
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def send(self, command: _Add | _Abort | _StopServing) -> None:
        self._commands.put(command)

    def stop_serving(self, error: Exception) -> None:
        """Abort every request in flight (freeing its KV blocks), answering it with `error`, and
        answer every later submission with `error` too."""
        self.send(_StopServing(error))

    async def submit(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                     arrival_time: float | None = None) -> Submission:
        """Add one engine request per prompt. Raises KilnError (naming the prompt when there
        are several) if the engine rejects any of them, then none of them runs; after
        `stop_serving(error)`, raises `error`."""
        if not self.is_alive:
            raise EngineFailure("the engine thread is not running; restart the server")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        sink = _threadsafe_sink(loop, outputs)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.send(_Add(request_ids, prompts, params, arrival, sink))
        first = await outputs.get()
        if isinstance(first, Exception):
            raise first
        return Submission(self, request_ids, outputs)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._apply_commands(wait=not self._engine.has_unfinished_requests())
                if self._engine.has_unfinished_requests():
                    self._route(self._engine.step())
                self.stats = self._engine.stats()
            except Exception as e:  # a failed step must not stop the server
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(EngineFailure(f"the engine failed while running this request "
                                             f"({type(e).__name__}: {e}); it was aborted, retry it"))

    def _apply_commands(self, wait: bool) -> None:
        """Apply every queued command; when `wait`, block (briefly) for the first one."""
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if wait else self._commands.get_nowait()
            while True:
                if isinstance(command, _Add):
                    self._add(command)
                elif isinstance(command, _Abort):
                    for request_id in command.request_ids:
                        self._engine.abort(request_id)
                elif isinstance(command, _StopServing):
                    self._refusal = command.error
                    self._fail_all(command.error)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _add(self, command: _Add) -> None:
        if self._refusal is not None:
            command.sink(self._refusal)
            return
        added: list[str] = []
        for i, (request_id, prompt) in enumerate(zip(command.request_ids, command.prompts)):
            try:
                self._engine.add_request(request_id, prompt, command.params, command.arrival_time)
            except Exception as e:  # whatever add_request raises, the handler must hear of it
                for done in added:  # all or nothing; their "abort" outputs have no sink and vanish
                    self._engine.abort(done)
                prefix = f"prompt {i}: " if len(command.prompts) > 1 else ""
                if isinstance(e, KilnError):
                    command.sink(KilnError(prefix + str(e), param=e.param))
                else:
                    log.exception("add_request failed")
                    failure = f"{prefix}the engine could not add this request ({type(e).__name__}: {e})"
                    command.sink(EngineFailure(failure))
                return
            added.append(request_id)
        for request_id in added:
            self._sinks[request_id] = command.sink
        command.sink(_Accepted())

    def _route(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            sink = self._sinks.pop(output.request_id, None) if output.finished else self._sinks.get(output.request_id)
            if sink is not None:
                sink(output)
            if output.finished:
                self._on_finished(output)

    def _fail_all(self, failure: Exception) -> None:
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            try:
                self._engine.abort(request_id)
            except Exception:  # the engine state may be broken; still answer the client
                log.exception("aborting %s after a failed step", request_id)
            sink(failure)


def _threadsafe_sink(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue) -> Callable[[object], None]:
    """A callable for the engine thread that puts an item on `outputs` inside `loop`."""

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            pass

    return put
