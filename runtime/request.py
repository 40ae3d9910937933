"""A sequence as the scheduler sees it, and what the engine returns for a request.

A request with `SamplingParams.n == k` becomes k `Sequence`s that share the prompt; the engine
groups their `CompletionOutput`s back into one `RequestOutput`.
"""

import enum
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kiln.runtime.sampling_params import SamplingParams

SeqId = tuple[str, int]  # (request_id, index among the request's n completions)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion being generated: its tokens and how many of them are in the KV cache.

    token_ids = prompt + generated tokens. `num_computed_tokens` catches up to `num_tokens`:
    prefill, chunked prefill, decode and recompute after preemption are all the same motion.
    """

    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "params", "max_tokens", "num_computed_tokens", "status",
                 "finish_reason", "stop_reason", "arrival_time", "first_token_time", "finish_time", "generator",
                 "wait_for", "grammar")  # read by every step's per-sequence loops: no instance dict to look through

    def __init__(self, seq_id: SeqId, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival_time: float):
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens resolved against the context length
        self.num_computed_tokens = 0
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.generator: torch.Generator | None = None  # made by the sampler on first use if seeded
        self.wait_for: Sequence | None = None  # a sibling whose prompt KV this one will reuse
        self.grammar = None  # structured output: its grammar matcher (runtime/structured_output.py)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def seed(self) -> int | None:
        """Sibling k of a seeded request uses seed + k, so the n completions differ."""
        return None if self.params.seed is None else self.params.seed + self.seq_id[1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, computed={self.num_computed_tokens}"
                f"/{self.num_tokens}, prompt={self.num_prompt_tokens})")


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probability of a generated token and of the N most likely tokens at that step,
    from the log-softmax of the model's unmodified logits (before penalties, temperature, ...)."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class CompletionOutput:
    """One of a request's n completions after a step: cumulative text, token ids and logprobs,
    plus the delta since its previous output. Read-only. The token ids and logprobs are read
    from the sequence's append-only lists when asked for, so an output costs the same to build
    however long the completion is (the engine makes one per request per step)."""

    __slots__ = ("index", "text", "delta_text", "finish_reason", "stop_reason",
                 "_all_token_ids", "_first", "_sent", "_end", "_all_logprobs")

    def __init__(self, index: int, text: str, delta_text: str, finish_reason: str | None,
                 stop_reason: int | str | None, all_token_ids: list[int], first: int, sent: int, end: int,
                 all_logprobs: list[TokenLogprobs] | None):
        """Generated token i is all_token_ids[first + i] (and all_logprobs[i] when kept); this
        output holds tokens [0, end), of which [sent, end) are new."""
        self.index = index
        self.text = text
        self.delta_text = delta_text
        self.finish_reason = finish_reason  # "stop" | "length" | "abort" | None
        self.stop_reason = stop_reason  # the stop token id or stop string that ended it
        self._all_token_ids, self._first, self._sent, self._end = all_token_ids, first, sent, end
        self._all_logprobs = all_logprobs

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._all_token_ids[self._first:self._first + self._end])

    @property
    def delta_token_ids(self) -> tuple[int, ...]:
        return tuple(self._all_token_ids[self._first + self._sent:self._first + self._end])

    @property
    def logprobs(self) -> tuple[TokenLogprobs, ...] | None:
        """One per generated token when requested, else None."""
        return None if self._all_logprobs is None else tuple(self._all_logprobs[:self._end])

    @property
    def delta_logprobs(self) -> tuple[TokenLogprobs, ...] | None:
        return None if self._all_logprobs is None else tuple(self._all_logprobs[self._sent:self._end])

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"delta_text={self.delta_text!r}, finish_reason={self.finish_reason!r}, "
                f"stop_reason={self.stop_reason!r})")


class RequestMetrics(NamedTuple):
    """Timestamps on `time.monotonic()`'s clock; TTFT = first_token_time - arrival_time, etc."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_generation_tokens: int


class RequestOutput(NamedTuple):
    """A request after a step (immutable; a named tuple, the cheapest to make)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]  # every completion, ordered by index
    finished: bool  # all n completions finished
    metrics: RequestMetrics
