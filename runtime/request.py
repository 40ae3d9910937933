"""A sequence as the scheduler sees it, and what the engine returns for a request.

A request with `SamplingParams.n == k` becomes k `Sequence`s that share the prompt; the engine
groups their `CompletionOutput`s back into one `RequestOutput`.
"""

import enum
from dataclasses import dataclass

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
        self.wait_for: "Sequence | None" = None  # a sibling whose prompt KV this one will reuse

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


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's n completions, cumulative, plus the delta since its previous output."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    delta_text: str
    delta_token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: tuple[TokenLogprobs, ...] | None  # one per generated token when requested
    delta_logprobs: tuple[TokenLogprobs, ...] | None


@dataclass(frozen=True)
class RequestMetrics:
    """Timestamps on `time.monotonic()`'s clock; TTFT = first_token_time - arrival_time, etc."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]  # every completion, ordered by index
    finished: bool  # all n completions finished
    metrics: RequestMetrics
