"""LLMEngine: requests in, streamed outputs out, one model step per `step()`.

    engine = LLMEngine(executor, tokenizer, eos_token_ids=[2])
    engine.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.outputs[0].delta_text, end="")

A step: the scheduler picks token chunks under its budgets, they become one StepBatch, the
executor returns logits, sequences that caught up are sampled, the scheduler records the tokens
(and finishes on stop tokens / length), the detokenizer turns them into text (and finishes on
stop strings). Single-threaded: the server drives it from one loop.
"""

import operator
import time
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.runtime.detokenizer import IncrementalDetokenizer, TokenDecoder
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import CompletionOutput, RequestMetrics, RequestOutput, SeqId, Sequence, TokenLogprobs
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.stats import EngineStats, collect_stats
from kiln.runtime.step_batch import Executor, build_step_batch
from kiln.runtime.structured_output import Grammars


@dataclass(slots=True)
class _Completion:
    """Engine-side state of one sequence: its text and what was already streamed."""

    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    sent_text: int = 0
    sent_tokens: int = 0


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    completions: list[_Completion] = field(default_factory=list)


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer, *, eos_token_ids, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 state_snapshot_interval: int | None = None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise KilnError(f"{name} must be an integer >= 1, got {value!r}")
        self.executor = executor
        self.tokenizer = tokenizer
        self.decoder = TokenDecoder(tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_prefix_caching = enable_prefix_caching
        self.kv = KVCacheManager(executor.num_blocks, executor.block_size, enable_prefix_caching,
                                 groups=getattr(executor, "cache_groups", None),
                                 state_slots=getattr(executor, "num_state_slots", 0),
                                 snapshot_interval=state_snapshot_interval,
                                 host_blocks=getattr(executor, "num_host_blocks", 0))
        # the longest sequence the KV cache holds, its prompt prefilled in chunks of the token budget
        self.kv_capacity_tokens = self.kv.capacity_tokens(chunk=max_num_batched_tokens)
        self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   eos_token_ids=self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)
        self.grammars: Grammars | None = None
        self._requests: dict[str, _Request] = {}
        self._aborted_outputs: list[RequestOutput] = []

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. `arrival_time` is on time.monotonic()'s clock (default: now)."""
        params = params or SamplingParams()
        if not isinstance(request_id, str) or request_id in self._requests:
            raise KilnError(f"request id {request_id!r} is not a string or is already in use; pick a unique one")
        try:
            prompt = [operator.index(t) for t in prompt_token_ids]
        except TypeError as e:
            raise KilnError(f"prompt_token_ids must be a list of integer token ids ({e})") from e
        self._check_tokens(prompt, params)
        if params.cache_ttl is not None and self.kv.host is None:
            raise KilnError("cache_ttl keeps a prefix in the KV cache's host tier, and this engine has none: start it "
                            "with --host-cache-gb (host_cache_memory), or leave cache_ttl out", param="cache_ttl")
        max_tokens = self._resolve_max_tokens(len(prompt), params)
        grammars = [self._grammars().matcher(params.structured_output) for _ in range(params.n)] \
            if params.structured_output is not None else None
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = _Request(request_id, tuple(prompt))
        for index in range(params.n):
            seq = Sequence((request_id, index), prompt, params, max_tokens, arrival)
            seq.grammar = grammars[index] if grammars else None
            if self.enable_prefix_caching and index > 0:
                seq.wait_for = request.completions[0].seq
            detokenizer = IncrementalDetokenizer(self.decoder, prompt, params)
            logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
            request.completions.append(_Completion(index, seq, detokenizer, logprobs))
            self.scheduler.add(seq)
        self._requests[request_id] = request

    def _grammars(self) -> Grammars:
        """The structured-output grammar compiler, built on the first constrained request."""
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.executor.vocab_size, self.eos_token_ids)
        return self.grammars

    def _check_tokens(self, prompt: list[int], params: SamplingParams) -> None:
        vocab = self.executor.vocab_size
        if not prompt:
            raise KilnError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise KilnError(f"prompt token ids must be in [0, {vocab}); tokenize with the model's tokenizer")
        if any(t >= vocab for t in params.stop_token_ids):
            raise KilnError(f"stop_token_ids must be below the vocabulary size {vocab}, got {params.stop_token_ids}")

    def _resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """params.max_tokens, or all the room left in the context; KilnError when it cannot fit."""
        max_model_len = self.executor.max_model_len
        kv_tokens = self.kv_capacity_tokens
        if prompt_len >= max_model_len:
            raise KilnError(f"the prompt has {prompt_len} tokens but the model's context is {max_model_len}, "
                            "leaving no room to generate; shorten the prompt")
        if params.max_tokens is None:
            room = min(max_model_len, kv_tokens) - prompt_len
            if room < 1:
                raise KilnError(f"the prompt has {prompt_len} tokens but the KV cache holds {kv_tokens}; "
                                "shorten the prompt or give the executor more KV memory")
            return room
        if prompt_len + params.max_tokens > max_model_len:
            raise KilnError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                            f"context of {max_model_len} tokens; lower max_tokens or shorten the prompt")
        if prompt_len + params.max_tokens > kv_tokens:
            raise KilnError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                            f"{kv_tokens} tokens the KV cache holds; lower max_tokens or give the executor "
                            "more KV memory")
        return params.max_tokens

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; its final output (finish_reason "abort")
        comes with the next step(). Unknown or finished ids are ignored (it may have just ended)."""
        request = self._requests.get(request_id)
        if request is None:
            return
        now = time.monotonic()
        for completion in request.completions:
            if not completion.seq.is_finished:
                self.scheduler.finish(completion.seq, "abort")
                completion.seq.finish_time = now
        self._aborted_outputs.append(self._output(request))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted_outputs)

    def stats(self) -> EngineStats:
        return collect_stats(self.scheduler)

    def step(self) -> list[RequestOutput]:
        """Run one model step; outputs of the requests that advanced (or were aborted)."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        scheduled = self.scheduler.schedule()
        chunks = scheduled.chunks
        if not chunks:
            return outputs
        batch = build_step_batch(scheduled, self.kv)
        try:
            logits = self.executor.execute(batch)
        except BaseException:
            self.kv.forget_transfers(list(batch.kv_transfers))  # the caller aborts the step's requests
            raise
        expected = (len(chunks), self.executor.vocab_size)
        if tuple(logits.shape) != expected:
            raise RuntimeError(f"executor returned logits of shape {tuple(logits.shape)}, expected {expected}")
        rows = [i for i, c in enumerate(chunks) if c.completes]
        seqs = [chunks[i].seq for i in rows]
        sampled = self.sampler.sample(logits if len(rows) == len(chunks) else logits[rows], seqs)
        seq_ids = [s.seq_id for s in seqs]
        advanced = self.scheduler.update_from_output(scheduled, dict(zip(seq_ids, sampled.token_ids)))
        touched = self._record_tokens(advanced, dict(zip(seq_ids, sampled.logprobs)))
        outputs += map(self._output, touched)
        return outputs

    def _record_tokens(self, advanced: list[Sequence], logprobs: dict[SeqId, TokenLogprobs | None]) -> list[_Request]:
        """Detokenize each sequence's newest token (finishing it on a stop string), record its
        logprobs and times; the requests these sequences belong to, each once, in order."""
        now = time.monotonic()
        requests = self._requests
        touched: dict[str, _Request] = {}
        for seq in advanced:
            request_id, index = seq.seq_id
            request = touched.get(request_id)
            if request is None:
                request = touched[request_id] = requests[request_id]
            completion = request.completions[index]
            if seq.first_token_time is None:
                seq.first_token_time = now
            if completion.logprobs is not None:
                completion.logprobs.append(logprobs[seq.seq_id])
            if seq.finish_reason != "stop":  # a stop token / EOS is not part of the text
                self._detokenize(completion)
            if seq.is_finished:
                seq.finish_time = now
        return list(touched.values())

    def _detokenize(self, completion: _Completion) -> None:
        """Add the sequence's newest token to its text, finishing it on a stop string."""
        seq = completion.seq
        check_stop = seq.num_output_tokens > seq.params.min_tokens
        stop = completion.detokenizer.add_token(seq.token_ids[-1], check_stop)
        if stop is None:
            return
        if seq.is_finished:  # the length limit and a stop string at once
            seq.finish_reason, seq.stop_reason = "stop", stop
        else:
            self.scheduler.finish(seq, "stop", stop)

    def _output(self, request: _Request) -> RequestOutput:
        """Cumulative state plus deltas since the last output; forgets a request once finished."""
        completions = request.completions
        if len(completions) == 1:  # the common case, without the loops below
            seq = completions[0].seq
            finished = seq.is_finished
            metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time if finished else None,
                                     seq.num_prompt_tokens, seq.num_output_tokens)
            outputs = (_completion_output(completions[0], finished),)
        else:
            seqs = [c.seq for c in completions]
            finished = all(s.is_finished for s in seqs)
            first_tokens = [s.first_token_time for s in seqs if s.first_token_time is not None]
            metrics = RequestMetrics(
                arrival_time=seqs[0].arrival_time,
                first_token_time=min(first_tokens) if first_tokens else None,
                finish_time=max(s.finish_time for s in seqs) if finished else None,
                num_prompt_tokens=len(request.prompt_token_ids),
                num_generation_tokens=sum(s.num_output_tokens for s in seqs))
            outputs = tuple(_completion_output(c, c.seq.is_finished) for c in completions)
        if finished:
            del self._requests[request.request_id]
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished, metrics)


def _completion_output(completion: _Completion, finished: bool) -> CompletionOutput:
    """The completion's output now (`finished`: its sequence's), advancing what was streamed."""
    seq = completion.seq
    text = completion.detokenizer.output_text(finished)
    num_tokens = seq.num_output_tokens
    output = CompletionOutput(completion.index, text, text[completion.sent_text:], seq.finish_reason,
                              seq.stop_reason, seq.token_ids, seq.num_prompt_tokens, completion.sent_tokens,
                              num_tokens, completion.logprobs)
    completion.sent_text, completion.sent_tokens = len(text), num_tokens
    return output
