"""The OpenAI request schema the server accepts, and its error format.

Requests are validated strictly (pydantic strict mode, unknown fields rejected) so a typo such
as `max_token` or a string where a number belongs is a 400 that names the field, not a silent
default. A field sent as `null` means "the default". Range checks are `SamplingParams`'s own,
so the server and the Python API accept exactly the same values.

The body is checked before it is parsed: `decode_json` refuses JSON nested deeper than a limit
(found without recursion), non-JSON constants (NaN, Infinity) and unpaired UTF-16 surrogate
escapes, which no tokenizer or response can carry. What one request may ask of the server
(body size, nesting, prompts, prompt tokens) is a `RequestLimits`.

Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams, StructuredOutput
from kiln.runtime.tool_calls import ToolUse

MAX_N = 16  # completions per prompt; larger n would crowd out every other request
MAX_STOP = 16  # stop strings per request; each is checked after every generated token
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server; past a limit it answers 4xx, naming the limit.

    max_body_bytes: the request body, in bytes (413).
    max_json_depth: how deep arrays and objects may nest in the body (400; checked before parsing).
    max_prompts: prompts in one /v1/completions request (its `prompt` list) (400).
    max_prompt_tokens: prompt tokens of one request, all its prompts together (400).
    """

    max_body_bytes: int = 1 << 20
    max_json_depth: int = 64
    max_prompts: int = 64
    max_prompt_tokens: int = 131072

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KilnError(f"server limit {name} must be a positive integer, got {value!r}")

    def check_prompt_count(self, count: int) -> None:
        if count > self.max_prompts:
            raise invalid_request(f"`prompt` is a list of {count} prompts; a request may have at most "
                                  f"{self.max_prompts} (the server's max_prompts): send several requests", "prompt")

    def check_prompt_tokens(self, prompts: list[list[int]], param: str) -> None:
        total = sum(len(p) for p in prompts)
        if total > self.max_prompt_tokens:
            raise invalid_request(f"this request has {total} prompt tokens; a request may have at most "
                                  f"{self.max_prompt_tokens} (the server's max_prompt_tokens): shorten the prompt "
                                  "or send several requests", param)


class APIError(Exception):
    """An error the server answers with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist; GET /v1/models lists the served model.",
                    param="model", code="model_not_found")


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def shutting_down(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="server_shutting_down")


_BRACKET_STEP = np.zeros(256, np.int8)  # byte -> +1 for [ {, -1 for ] }, 0 otherwise
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text `raw`, found without parsing it (so
    without recursion): escapes are cut out, so that every quote left opens or closes a string,
    then a running count of the brackets outside strings. Exact for valid JSON; for malformed
    JSON at least as deep as a parser gets before it fails. numpy runs the counts (without the GIL)."""
    text = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    outside_strings = (np.cumsum(text == ord('"'), dtype=np.uint8) & 1) == 0  # only its parity matters
    return int(np.cumsum(_BRACKET_STEP[text] * outside_strings, dtype=np.int32).max(initial=0))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def decode_json(raw: bytes, max_depth: int):
    """The JSON value of a request body (UTF-8, a leading BOM allowed); APIError 400 if it is not
    JSON, nests deeper than `max_depth`, uses NaN/Infinity, or escapes an unpaired UTF-16
    surrogate (such as \\ud800)."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise invalid_request(f"the request body nests arrays and objects {depth} deep; the server accepts at most "
                              f"{max_depth} (its max_json_depth)")
    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # RecursionError: a max_depth near Python's recursion limit
        raise invalid_request(f"the request body is not valid JSON ({e}); send a JSON object") from None
    if b"\\u" in raw:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid_request("the request body escapes an unpaired UTF-16 surrogate (such as \\ud800); "
                                  "send valid Unicode text") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    """response_format.json_schema: the schema the output must follow (`strict` is accepted: the
    output always follows it)."""

    name: str
    schema_: dict | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise invalid_request('response_format of type "json_schema" needs json_schema.schema (a JSON schema '
                                  "object)", "response_format.json_schema")
        return StructuredOutput("json_schema", json.dumps(self.json_schema.schema_))


class _SamplingRequest(_Strict):
    """Fields both endpoints share: OpenAI's, then vLLM-style extensions (top_k ... min_tokens)."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, not used
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    response_format: ResponseFormat | None = None
    cache_ttl: float | None = None  # kiln's: seconds the KV host tier keeps this request's prefix

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _structured_output(self) -> StructuredOutput | None:
        return self.response_format.structured_output() if self.response_format else None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams from the fields that were given; KilnError for an out-of-range value."""
        if self.n is not None and self.n > MAX_N:
            raise invalid_request(f"n must be at most {MAX_N}, got {self.n}; send several requests instead", "n")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed with stream: true", "stream_options")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise invalid_request(f"stop has {len(self.stop)} strings; give at most {MAX_STOP}", "stop")
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=self.seed,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                      ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs, cache_ttl=self.cache_ttl,
                      structured_output=self._structured_output())
        given = {name: value for name, value in fields.items() if value is not None}
        return SamplingParams(max_tokens=max_tokens, **given)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a text, token ids, or a list of either (one choice
    group per prompt). `max_tokens` defaults to 16, as OpenAI's; `logprobs`: top-N (0..20)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: a text or a token-id list each."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [cast(str | list[int], self.prompt)]
        return list(cast(list[str] | list[list[int]], self.prompt))

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Function(_Strict):
    """tools[i].function. `parameters`: a JSON schema of "type": "object" (none: no arguments);
    `strict` is accepted (a call forced by tool_choice always follows the schema)."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _tool_name(cls, name: str) -> str:
        if not TOOL_NAME.fullmatch(name):
            raise PydanticCustomError("tool_name", "a function name is 1 to 64 letters, digits, _ or -")
        return name

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters: dict | None) -> dict | None:
        if parameters is not None and parameters.get("type") != "object":
            raise PydanticCustomError("object_schema", 'parameters must be a JSON schema with "type": "object"')
        return parameters


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    """The function an assistant message called; `arguments`: JSON text."""

    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_text(cls, arguments: str) -> str:
        try:
            json.loads(arguments)
        except (ValueError, RecursionError):
            raise PydanticCustomError("json_text", "arguments must be JSON text") from None
        return arguments


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    """One chat message: a role OpenAI defines, and a text or a list of text parts; an assistant
    message that calls tools has `tool_calls` (its content may then be null), a tool message the
    `tool_call_id` of the call it answers. Keys beyond these pass through to the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]  # validators read the fields above theirs
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)
    name: str | None = None
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, tool_calls: list[MessageToolCall] | None, info: ValidationInfo):
        if tool_calls is not None and info.data.get("role") != "assistant":
            raise PydanticCustomError("tool_calls", "only assistant messages have tool_calls")
        return tool_calls

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, tool_call_id: str | None, info: ValidationInfo):
        if tool_call_id is None and info.data.get("role") == "tool":
            raise PydanticCustomError("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        return tool_call_id

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_content(cls, content, validate, info: ValidationInfo):
        """One clear error instead of one per member of the union; null only beside tool_calls."""
        if content is None and info.data.get("role") == "assistant" and info.data.get("tool_calls"):
            return None
        try:
            if content is not None:
                return validate(content)
        except ValidationError:
            pass
        raise PydanticCustomError("text_content", 'must be a string or a list of {"type": "text", "text": ...} parts '
                                  "(null only in an assistant message with tool_calls); images are not supported")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Without max_completion_tokens (or the older max_tokens) the
    reply may use the rest of the context. logprobs: true adds each token's logprob, with
    `top_logprobs` alternatives. `tools` with `tool_choice` (default "auto" when there are tools):
    see `tool_use`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs)

    def _structured_output(self) -> StructuredOutput | None:
        use = self.tool_use()
        forced = use.grammar() if use else None
        if forced and self.response_format and self.response_format.type != "text":
            raise invalid_request("response_format cannot be combined with tool_choice \"required\" or a named "
                                  "function: the tool call's schema already decides the output", "response_format")
        return forced or super()._structured_output()

    def tool_use(self) -> ToolUse | None:
        """What the tools ask (None without tools, or with tool_choice "none": the template is then
        given no tools and the output is not read for calls). APIError 400 for duplicate function
        names, tool_choice without tools, or a tool_choice naming a function that is not a tool."""
        names = [tool.function.name for tool in self.tools or ()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise invalid_request(f"tools has several functions named {', '.join(duplicates)}; give each a "
                                  "unique name", "tools")
        if self.tool_choice is not None and not self.tools:
            raise invalid_request("tool_choice needs tools: send the functions the model may call", "tool_choice")
        choice = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else \
            self.tool_choice or "auto"
        if isinstance(self.tool_choice, NamedToolChoice) and choice not in names:
            raise invalid_request(f"tool_choice names the function {choice!r}, which is not among tools "
                                  f"({', '.join(names)})", "tool_choice")
        if not self.tools or choice == "none":
            return None
        return ToolUse([tool.model_dump(exclude_none=True) for tool in self.tools], choice,
                       parallel=self.parallel_tool_calls is not False)

    def chat_messages(self) -> list[dict]:
        """The messages as plain dicts for the chat template (unset keys left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


def parse_request(model: type[_SamplingRequest], data) -> _SamplingRequest:
    """`data` (decoded JSON) as `model`; APIError 400 naming the first offending field."""
    if not isinstance(data, dict):
        got = json.dumps(data)
        raise invalid_request(f"the request body must be a JSON object, got {got if len(got) <= 40 else got[:37] + '...'}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(model, e) from None


def _validation_error(model: type[_SamplingRequest], error: ValidationError) -> APIError:
    """400 for the first error; `param` is the top-level field, the message names the full path."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    path = _path(first["loc"], keep_last=first["type"] == "extra_forbidden")
    if first["type"] == "extra_forbidden":
        supported = f" (supported: {', '.join(sorted(model.model_fields))})" if len(first["loc"]) == 1 else ""
        return invalid_request(f"unknown or unsupported field `{path}`; remove it{supported}", field)
    if first["type"] == "missing":
        return invalid_request(f"`{path}` is required", field)
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return invalid_request(f"invalid `{path}`: {first['msg']} (got {got})", field)


_FIELD_NAMES = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions, Tool, Function,
                                MessageToolCall, CalledFunction, NamedToolChoice) for name in m.model_fields}


def _path(loc: tuple, keep_last: bool) -> str:
    """A pydantic error location as `messages[0].role`, without the names pydantic gives the
    members of a union (`prompt.str`); `keep_last` keeps the last part whatever it is (the name
    of an unknown field)."""
    kept = [part for i, part in enumerate(loc)
            if isinstance(part, int) or part in _FIELD_NAMES or (keep_last and i == len(loc) - 1)]
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in kept).lstrip(".")
