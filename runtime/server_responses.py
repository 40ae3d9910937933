"""Engine outputs as OpenAI responses: whole bodies, and server-sent-event streams of chunks.

A request with P prompts and n completions each has P * n choices; choice `p * n + i` is
completion i of prompt p. A stream sends, per choice, a chunk whenever the choice gained
tokens or finished (chat streams open with one `role` chunk per choice), then a usage chunk
when `stream_options.include_usage`, then `data: [DONE]`. An engine failure (or a shutdown)
mid-stream becomes an `{"error": ...}` event before `[DONE]`.

A chat response whose request has tools reads each choice's text for tool calls (its parser,
runtime/tool_calls.py): the message gets `tool_calls` and finish_reason "tool_calls" (unless the
choice ran out of tokens); a stream sends content until a call may begin, and the calls, whole,
in the choice's last chunk.
"""

from __future__ import annotations

import abc
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from kiln.runtime.openai_protocol import APIError, server_error
from kiln.runtime.request import CompletionOutput, TokenLogprobs
from kiln.runtime.server_engine import EngineFailure, Submission
from kiln.runtime.tool_calls import CallStream, ParsedOutput, ToolCall, ToolCallParser

DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # stands for -inf, which JSON cannot carry


@dataclass(frozen=True)
class Choice:
    """A choice's text from character `text_offset` on, the tokens that produced it, and how it
    finished (None while it runs)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    text_offset: int
    finish_reason: str | None
    stop_reason: int | str | None


def whole_choice(index: int, c: CompletionOutput) -> Choice:
    return Choice(index, c.text, c.token_ids, c.logprobs, 0, c.finish_reason, c.stop_reason)


def delta_choice(index: int, c: CompletionOutput) -> Choice:
    return Choice(index, c.delta_text, c.delta_token_ids, c.delta_logprobs, len(c.text) - len(c.delta_text),
                  c.finish_reason, c.stop_reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class Renderer(abc.ABC):
    """The bodies of one response (one id, creation time and model name). Subclasses give the
    object names and the shape of a choice."""

    response_object = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, decode_token: Callable[[int], str]):
        self.request_id, self.model, self.decode_token = request_id, model, decode_token
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, choices: list[Choice], usage_: dict) -> dict:
        return {**self._envelope(self.response_object, [self.choice(c, streaming=False) for c in choices]),
                "usage": usage_}

    def chunk(self, choice: Choice, include_usage: bool) -> dict:
        body = self._envelope(self.chunk_object, [self.choice(choice, streaming=True)])
        return {**body, "usage": None} if include_usage else body

    def opening_chunks(self, num_choices: int, include_usage: bool) -> list[dict]:
        return []

    def usage_chunk(self, usage_: dict) -> dict:
        return {**self._envelope(self.chunk_object, []), "usage": usage_}

    @abc.abstractmethod
    def choice(self, choice: Choice, streaming: bool) -> dict:
        """One choice of a response (streaming: of a chunk), in the endpoint's own format."""


class CompletionRenderer(Renderer):
    response_object = chunk_object = "text_completion"

    def choice(self, choice: Choice, streaming: bool) -> dict:
        logprobs = None if choice.logprobs is None else self._logprobs(choice.logprobs, choice.text_offset)
        return {"index": choice.index, "text": choice.text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}

    def _logprobs(self, logprobs: tuple[TokenLogprobs, ...], text_offset: int) -> dict:
        """The legacy completions format: parallel lists over the tokens."""
        tokens = [self.decode_token(t.token_id) for t in logprobs]
        offsets, offset = [], text_offset
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = [{self.decode_token(i): _finite(lp) for i, lp in zip(t.top_token_ids, t.top_logprobs)} for t in logprobs]
        return {"tokens": tokens, "token_logprobs": [_finite(t.logprob) for t in logprobs],
                "top_logprobs": top, "text_offset": offsets}


class ChatRenderer(Renderer):
    """`tool_parser`: reads the choices' tool calls (None: the text is all content)."""

    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, decode_token: Callable[[int], str],
                 tool_parser: ToolCallParser | None = None):
        super().__init__(request_id, model, decode_token)
        self._tool_parser = tool_parser
        self._streams: dict[int, CallStream] = {}  # choice index -> its stream's state

    def opening_chunks(self, num_choices: int, include_usage: bool) -> list[dict]:
        """One chunk per choice that gives the assistant role, as OpenAI streams begin."""
        opening = []
        for index in range(num_choices):
            body = self._envelope(self.chunk_object, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}])
            opening.append({**body, "usage": None} if include_usage else body)
        return opening

    def choice(self, choice: Choice, streaming: bool) -> dict:
        logprobs = None if choice.logprobs is None else {"content": [self._token(t) for t in choice.logprobs]}
        output = self._read(choice, streaming)
        message: dict = {"content": output.content} if streaming else {"role": "assistant", "content": output.content}
        if output.calls:
            message["tool_calls"] = [_tool_call(i, call, streaming) for i, call in enumerate(output.calls)]
        finish_reason = "tool_calls" if output.calls and choice.finish_reason == "stop" else choice.finish_reason
        return {"index": choice.index, "delta" if streaming else "message": message, "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": choice.stop_reason}

    def _read(self, choice: Choice, streaming: bool) -> ParsedOutput:
        """The choice's content (streaming: what may be sent now) and its tool calls (streaming:
        once it finished)."""
        if self._tool_parser is None:
            return ParsedOutput(choice.text)
        if not streaming:
            return self._tool_parser.parse(choice.text)
        stream = self._streams.setdefault(choice.index, CallStream(self._tool_parser))
        content = stream.feed(choice.text)
        if choice.finish_reason is None:
            return ParsedOutput(content)
        rest = stream.finish()
        return ParsedOutput(content + (rest.content or ""), rest.calls)

    def _token(self, t: TokenLogprobs) -> dict:
        top = [self._entry(i, lp) for i, lp in zip(t.top_token_ids, t.top_logprobs)]
        return {**self._entry(t.token_id, t.logprob), "top_logprobs": top}

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.decode_token(token_id)
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def _tool_call(index: int, call: ToolCall, streaming: bool) -> dict:
    """A tool call as OpenAI gives it (in a stream's delta, with its index among the choice's calls)."""
    body = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": index, **body} if streaming else body


async def full_response(submission: Submission, renderer: Renderer, n: int, prompt_tokens: int) -> dict:
    """The whole response once every prompt finished. Raises EngineFailure, or the APIError that
    ended the submission (a shutdown)."""
    finals = {}
    async for prompt_index, output in submission.outputs():
        if output.finished:
            finals[prompt_index] = output
    choices = [whole_choice(p * n + c.index, c) for p, output in sorted(finals.items()) for c in output.outputs]
    return renderer.response(choices, usage(prompt_tokens, sum(len(c.token_ids) for c in choices)))


async def event_stream(submission: Submission, renderer: Renderer, *, num_prompts: int, n: int, prompt_tokens: int,
                       include_usage: bool) -> AsyncGenerator[str, None]:
    """The SSE events of a streamed response, `data: [DONE]` last."""
    for chunk in renderer.opening_chunks(num_prompts * n, include_usage):
        yield sse(chunk)
    finished: set[int] = set()
    completion_tokens = 0
    try:
        async for prompt_index, output in submission.outputs():
            for c in output.outputs:
                index = prompt_index * n + c.index
                if index in finished or not (c.delta_text or c.delta_token_ids or c.finish_reason):
                    continue
                if c.finish_reason is not None:
                    finished.add(index)
                completion_tokens += len(c.delta_token_ids)
                yield sse(renderer.chunk(delta_choice(index, c), include_usage))
    except (EngineFailure, APIError) as e:
        yield sse((e if isinstance(e, APIError) else server_error(str(e))).body())
        yield DONE
        return
    if include_usage:
        yield sse(renderer.usage_chunk(usage(prompt_tokens, completion_tokens)))
    yield DONE
