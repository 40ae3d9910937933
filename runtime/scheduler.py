"""Token-budget scheduler (vLLM v1 style): no prefill or decode phase.

Every sequence has `num_computed_tokens` catching up to `num_tokens` (prompt + generated). One
`schedule()` gives each running sequence, oldest first, as many of its missing tokens as the
token budget allows (1 for a decode, a chunk of a long prompt), preempting the newest running
sequences when KV blocks run out, then admits waiting sequences FCFS. The scheduler never calls
the model: the engine executes the `SchedulerOutput` and hands the sampled tokens back to
`update_from_output`.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from kiln.runtime import structured_output
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import SeqId, SeqStatus, Sequence


class ScheduledChunk(NamedTuple):
    """`num_new_tokens` tokens of `seq` starting at `start` (= its num_computed_tokens). A named
    tuple: one is made per scheduled sequence per step, and a tuple is the cheapest to make."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk the sequence is caught up, so its last token's logits are sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # batch order: the num_decodes single-token chunks first
    num_decodes: int
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: frozenset[int]):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0  # tokens at prompt positions run through the model
        self.generation_tokens = 0  # tokens sampled

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0 or seq.status is not SeqStatus.RUNNING:  # out of tokens, or preempted
                break
            num_new = self.kv.chunk_tokens(seq.num_computed_tokens, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if not self._reserve_or_preempt(seq, seq.num_computed_tokens + num_new, preempted):
                break
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
        if not preempted:
            chunks += self._admit_waiting(budget)
        chunks = decodes_first(chunks)
        return SchedulerOutput(chunks, sum(c.num_new_tokens == 1 for c in chunks), preempted)

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Give `seq` slots for `num_tokens` tokens, preempting the newest running sequences
        until they fit; False when `seq` itself had to go."""
        if self.kv.holds_slots(seq.seq_id, num_tokens):
            return True
        while not self.kv.can_allocate(seq.seq_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.kv.allocate(seq.seq_id, num_tokens)
        return True

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        """FCFS: admit waiting sequences while tokens, sequence slots and KV blocks last."""
        chunks = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not prefix_source_ready(seq):
                break
            prefix = self.kv.find_prefix(seq.token_ids)
            num_new = self.kv.chunk_tokens(prefix.num_tokens, min(seq.num_tokens - prefix.num_tokens, budget))
            if not self.kv.can_allocate(seq.seq_id, prefix.num_tokens + num_new, prefix):
                break
            self.kv.allocate(seq.seq_id, prefix.num_tokens + num_new, prefix)
            self.kv.record_prefix_query(seq.num_tokens, prefix)
            self.waiting.popleft()
            seq.status, seq.num_computed_tokens, seq.wait_for = SeqStatus.RUNNING, prefix.num_tokens, None
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, prefix.num_tokens, num_new))
            budget -= num_new
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's KV; it re-prefills prompt + output later."""
        self.kv.free(seq.seq_id)
        seq.status, seq.num_computed_tokens = SeqStatus.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_from_output(self, output: SchedulerOutput, sampled: dict[SeqId, int]) -> list[Sequence]:
        """Advance every scheduled sequence by its chunk, append the tokens sampled for the ones
        that caught up, and finish those that hit a stop token or their length limit.
        Returns the sequences that received a token, in batch order."""
        advanced = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted after scheduling
                continue
            end = chunk.start + chunk.num_new_tokens
            self.prompt_tokens_computed += max(0, min(end, seq.num_prompt_tokens) - chunk.start)
            seq.num_computed_tokens = end
            self.kv.cache_computed(seq.seq_id, seq.token_ids, end)
            self.kv.release_unreachable(seq.seq_id, end)
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = stop_by_token(seq, token, self.eos_token_ids)
            if reason is not None:
                self.finish(seq, *reason)
            advanced.append(seq)
        self.generation_tokens += len(advanced)
        return advanced

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence now (stop, length or abort) and return its KV blocks."""
        if seq.is_finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id, keep_for=seq.params.cache_ttl)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason


def decodes_first(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Single-token chunks (decodes) first, the rest after, each group in schedule order."""
    return [c for c in chunks if c.num_new_tokens == 1] + [c for c in chunks if c.num_new_tokens != 1]


def prefix_source_ready(seq: Sequence) -> bool:
    """A sibling of an n > 1 request waits until the first sibling's prompt KV is computed (and
    so cached), so the prompt blocks are shared instead of computed n times."""
    leader = seq.wait_for
    return leader is None or leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens


def stop_by_token(seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> tuple[str, int | None] | None:
    """("stop", stop token id or None for EOS) / ("length", None) / None to go on. A sequence whose
    grammar ended with EOS (the only token it allows once the JSON is complete) stops whatever
    ignore_eos says."""
    params, num_output_tokens = seq.params, seq.num_output_tokens
    if seq.grammar is not None and token in eos_token_ids and structured_output.is_finished(seq.grammar):
        return "stop", None
    if num_output_tokens > params.min_tokens:
        if token in params.stop_token_ids:
            return "stop", token
        if not params.ignore_eos and token in eos_token_ids:
            return "stop", None
    if num_output_tokens >= seq.max_tokens:
        return "length", None
    return None
