"""How one request is sampled and when it stops.

`SamplingParams` validates itself on construction: a bad value raises `KilnError` naming the
field and its allowed range, so a server can answer 400 with that message as is.
"""

import math
from dataclasses import dataclass, field

from kiln.errors import KilnError

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
GREEDY_EPS = 1e-5  # a temperature below this samples greedily (dividing by it would overflow)


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: "json_object" (any JSON object) or "json_schema" (`schema`, the
    JSON text of a JSON schema), as compact JSON (runtime/structured_output.py). `origin`: the
    request field the schema came from, which errors name."""

    kind: str
    schema: str | None = None
    origin: str = field(default="response_format", compare=False)

    def __post_init__(self):
        if self.kind not in ("json_object", "json_schema") or (self.kind == "json_schema") != (self.schema is not None):
            raise KilnError(f"structured output is a json_object or a json_schema with its schema, got {self}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request (OpenAI / vLLM names and meanings).

    n: number of independent completions of the prompt, >= 1.
    temperature: 0 (or < 1e-5) is greedy; otherwise logits are divided by it, in [0, 100].
    top_k: keep the k most likely tokens; 0 or -1 disables.
    top_p: keep the smallest set of most likely tokens whose probability sums to >= top_p, (0, 1].
    min_p: drop tokens whose probability is below min_p * (probability of the top token), [0, 1].
    repetition_penalty: HF-style, on prompt and output tokens (> 0; 1 disables).
    presence_penalty / frequency_penalty: OpenAI-style, on output tokens, [-2, 2].
    seed: makes the request's samples reproducible whatever else is in the batch.
    max_tokens: generated tokens at most (None: up to the context length).
    min_tokens: EOS and stop_token_ids are masked until this many tokens are generated.
    stop: strings that end the output (the output ends before the stop string).
    stop_token_ids: token ids that end the output (kept in token_ids, not in the text).
    ignore_eos: keep generating past EOS.
    logprobs: None, or the number N of top alternatives (0..20) to return with each token's logprob.
    skip_special_tokens: leave special tokens out of the text.
    structured_output: None, or the JSON the output must be (tokens outside it are masked).
    cache_ttl: None, or seconds after the request finishes during which the KV cache's host tier
        keeps its blocks (an agent's prefix kept warm across a pause; needs the host tier).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None
    cache_ttl: float | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check_int(self, "n", lo=1)
        _check_float(self, "temperature", "in [0, 100]", lambda v: 0.0 <= v <= 100.0)
        _check_int(self, "top_k", lo=0, hint="0 or -1 disables it")
        _check_float(self, "top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_float(self, "min_p", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_float(self, "repetition_penalty", "> 0 (1 disables it)", lambda v: v > 0.0)
        _check_float(self, "presence_penalty", "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        _check_float(self, "frequency_penalty", "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        if self.seed is not None:
            _check_int(self, "seed", lo=0, hi=2**63 - 1)
        if self.max_tokens is not None:
            _check_int(self, "max_tokens", lo=1)
        _check_int(self, "min_tokens", lo=0, hi=self.max_tokens)
        if self.logprobs is not None:
            _check_int(self, "logprobs", lo=0, hi=MAX_LOGPROBS)
        if self.cache_ttl is not None:
            _check_float(self, "cache_ttl", "of seconds > 0", lambda v: v > 0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise KilnError(f"SamplingParams.{name} must be true or false, got {getattr(self, name)!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise KilnError(f"SamplingParams.stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise KilnError(
                f"SamplingParams.stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(params: SamplingParams, name: str, *, lo: int, hi: int | None = None, hint: str = ""):
    value = getattr(params, name)
    if _is_int(value) and value >= lo and (hi is None or value <= hi):
        return
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    raise KilnError(f"SamplingParams.{name} must be {allowed}{'; ' + hint if hint else ''}, got {value!r}")


def _check_float(params: SamplingParams, name: str, allowed: str, ok) -> None:
    value = getattr(params, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value):
        return
    raise KilnError(f"SamplingParams.{name} must be a number {allowed}, got {value!r}")
