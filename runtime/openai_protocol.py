"""The OpenAI request schema the server accepts, and its error format.

Requests are validated strictly (pydantic strict mode, unknown fields rejected) so a typo such
as `max_token` or a string where a number belongs is a 400 that names the field, not a silent
default. A field sent as `null` means "the default". Range checks are `SamplingParams`'s own,
so the server and the Python API accept exactly the same values.

Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from kiln.runtime.sampling_params import SamplingParams

MAX_N = 16  # completions per prompt; larger n would crowd out every other request


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams from the fields that were given; KilnError for an out-of-range value."""
        if self.n is not None and self.n > MAX_N:
            raise invalid_request(f"n must be at most {MAX_N}, got {self.n}; send several requests instead", "n")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed with stream: true", "stream_options")
        fields = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=self.seed,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                      ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs)
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
            return [self.prompt]
        return list(self.prompt)

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Without max_completion_tokens (or the older max_tokens) the
    reply may use the rest of the context. logprobs: true adds each token's logprob, with
    `top_logprobs` alternatives."""

    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs)


def parse_request(model: type[_SamplingRequest], data) -> _SamplingRequest:
    """`data` (decoded JSON) as `model`; APIError 400 naming the first offending field."""
    if not isinstance(data, dict):
        raise invalid_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(model, e) from None


def _validation_error(model: type[_SamplingRequest], error: ValidationError) -> APIError:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        supported = ", ".join(sorted(model.model_fields))
        return invalid_request(f"unknown or unsupported field `{'.'.join(loc)}`; remove it (supported: {supported})",
                               field)
    if first["type"] == "missing":
        return invalid_request(f"`{'.'.join(loc)}` is required", field)
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return invalid_request(f"invalid `{field}`: {first['msg']} (got {got})", field)
