"""Batched sampling on torch, on whatever device the logits live.

Per step, in this order, each part only on the rows that ask for it:
  1. logprobs: log-softmax of the unmodified logits (vLLM's default), for rows with `logprobs`
     (read from the logits after sampling where nothing edits them, else from a copy made first);
  1b. structured output: the tokens the row's grammar does not allow are masked (after the draw,
     the grammar is fed the token: runtime/structured_output.py);
  2. min_tokens: EOS (unless ignore_eos) and stop_token_ids masked while fewer tokens were made;
  3. penalties: repetition (HF: on prompt + output tokens, logit / p if > 0 else logit * p),
     then presence / frequency (OpenAI: on output tokens, logit -= f * count + p * (count > 0)),
     read and written only at each row's seen tokens;
  4. greedy rows (temperature 0): argmax;
  5. the other rows: temperature, top-k, top-p, min-p and an inverse-CDF draw (runtime/draw.py)
     with one uniform number per row: a seeded sequence takes it from its own generator, so its
     tokens do not depend on what else is in the batch; unseeded rows share the sampler's.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime import structured_output
from kiln.runtime.draw import ChunkedRows, draw_tokens, logsumexp
from kiln.runtime.request import Sequence, TokenLogprobs
from kiln.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row; None where the sequence asked for none


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], seed: int | None = None):
        self.eos_token_ids = eos_token_ids
        self._generator: torch.Generator | None = None
        self._seed = seed

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [B, V] fp32, row b for seqs[b] (modified in place). One token per row."""
        rows_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        unedited = _unedited_rows(logits, rows_lp, seqs) if rows_lp else None
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            structured_output.mask(logits, constrained, [seqs[i].grammar for i in constrained])
        mask_stop_tokens_before_min(logits, seqs, self.eos_token_ids)
        apply_penalties(logits, seqs)
        greedy: list[int] = []
        random: list[int] = []
        for i, seq in enumerate(seqs):
            (greedy if seq.params.is_greedy else random).append(i)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            _set_rows(tokens, greedy, argmax_rows(_rows(logits, greedy)))
        if random:
            sub_seqs = [seqs[i] for i in random]
            uniforms = self._uniforms(sub_seqs, logits.device)
            _set_rows(tokens, random, draw_tokens(_rows(logits, random), [s.params for s in sub_seqs], uniforms))
        token_ids = tokens.tolist()
        if constrained:
            structured_output.accept([seqs[i].grammar for i in constrained], [token_ids[i] for i in constrained])
        out_lp: list[TokenLogprobs | None] = [None] * len(seqs)
        if unedited is not None:
            for j, row in enumerate(top_logprobs(unedited, [token_ids[i] for i in rows_lp],
                                                 [seqs[i].params.logprobs for i in rows_lp])):
                out_lp[rows_lp[j]] = row
        return SamplerOutput(token_ids, out_lp)

    def _uniforms(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        """[R] uniform numbers in [0, 1): seeded sequences from their own generator."""
        uniforms = torch.empty(len(seqs), device=device)
        unseeded = [i for i, s in enumerate(seqs) if s.seed is None]
        if unseeded:
            draws = torch.rand(len(unseeded), generator=self._shared_generator(device), device=device)
            _set_rows(uniforms, unseeded, draws)
        seeded = [i for i, s in enumerate(seqs) if s.seed is not None]
        if seeded:
            _set_rows(uniforms, seeded, torch.cat([_own_uniform(seqs[i], device) for i in seeded]))
        return uniforms

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self._seed)
        return self._generator


def _own_uniform(seq: Sequence, device: torch.device) -> torch.Tensor:
    """[1] the next number of a seeded sequence's own generator (made on first use)."""
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.seed)
    return torch.rand(1, generator=seq.generator, device=device)


def _unedited_rows(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> torch.Tensor:
    """logits[rows] as they are now, before min_tokens masks and penalties: the logits themselves
    when those are all rows and none will be edited, else a copy."""
    sub = _rows(logits, rows)
    if sub is logits and any(_has_penalty(s.params) or s.num_output_tokens < s.params.min_tokens or s.grammar is not None
                             for s in seqs):
        return logits.clone()
    return sub


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [R, V] -> [R] long, the first index of each row's maximum (as torch.argmax, NaN
    included). On a CPU through numpy, whose SIMD argmax runs at memory speed; torch's CPU
    argmax is several times slower than one read of the logits."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a copy when rows are all of x."""
    if len(rows) == x.shape[0]:
        return x
    return x[torch.tensor(rows, device=x.device)]


def _set_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == x.shape[0]:
        x.copy_(values)
    else:
        x[torch.tensor(rows, device=x.device)] = values


def mask_stop_tokens_before_min(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """logits: [B, V]; -inf on EOS / stop ids of rows that have not yet made min_tokens tokens (but
    for rows with a grammar: it alone decides where their output ends)."""
    for i, seq in enumerate(seqs):
        if seq.params.min_tokens and seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else eos_token_ids)
            logits[i, sorted(banned)] = float("-inf")


def seen_tokens(seqs: list[Sequence], vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sequence's distinct tokens (prompt + output), as flat arrays [N]: the sequence's
    index, the token id, and how often the token is among the sequence's output tokens."""
    lengths = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=len(seqs))
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    num_prompt = np.repeat(np.fromiter((s.num_prompt_tokens for s in seqs), dtype=np.int64, count=len(seqs)), lengths)
    tokens = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), dtype=np.int64,
                         count=int(lengths.sum()))
    is_output = np.arange(len(tokens)) - starts >= num_prompt
    keys, inverse = np.unique(np.repeat(np.arange(len(seqs)), lengths) * vocab + tokens, return_inverse=True)
    return keys // vocab, keys % vocab, np.bincount(inverse, weights=is_output, minlength=len(keys))


def _has_penalty(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logits: [B, V] contiguous, in place, on the rows with a repetition, presence or frequency
    penalty, reading and writing only the tokens each of them has seen (N of them in all)."""
    rows = [i for i, s in enumerate(seqs) if _has_penalty(s.params)]
    if not rows:
        return
    device, vocab, flat_logits = logits.device, logits.shape[1], logits.view(-1)
    row_of, token_ids, output_counts = seen_tokens([seqs[i] for i in rows], vocab)
    flat = torch.from_numpy(np.asarray(rows)[row_of] * vocab + token_ids).to(device)  # [N] into flat_logits
    which = torch.from_numpy(row_of).to(device)

    def per_token(name: str) -> torch.Tensor:
        return torch.tensor([getattr(seqs[i].params, name) for i in rows], device=device).index_select(0, which)

    seen = flat_logits.index_select(0, flat)
    rep = per_token("repetition_penalty")
    seen = torch.where(seen > 0, seen / rep, seen * rep)
    counts = torch.from_numpy(output_counts).to(device, logits.dtype)
    seen = (seen - per_token("frequency_penalty") * counts
            - per_token("presence_penalty") * (counts > 0).to(logits.dtype))
    flat_logits.index_copy_(0, flat, seen)


def top_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: list[int]) -> list[TokenLogprobs]:
    """logits: [R, V] unmodified; the chosen token's log-softmax value and each row's top_n best,
    without a [R, V] log-softmax (log-sum-exp through the chunked weights, top-n through chunks)."""
    lse = logsumexp(logits)
    chosen = (logits.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0] - lse).tolist()
    width = max(top_n)
    values, ids = ChunkedRows(logits).top(width) if width else (logits[:, :0], logits[:, :0].long())
    values, ids = (values - lse[:, None]).tolist(), ids.tolist()
    return [TokenLogprobs(token_ids[r], chosen[r], tuple(ids[r][:n]), tuple(values[r][:n]))
            for r, n in enumerate(top_n)]
