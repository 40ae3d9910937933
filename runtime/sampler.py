"""Batched sampling on torch, on whatever device the logits live.

Per step, in this order, each part only on the rows that ask for it:
  1. logprobs: log-softmax of the unmodified logits (vLLM's default), for rows with `logprobs`;
  2. min_tokens: EOS (unless ignore_eos) and stop_token_ids masked while fewer tokens were made;
  3. penalties: repetition (HF: on prompt + output tokens, logit / p if > 0 else logit * p),
     then presence / frequency (OpenAI: on output tokens, logit -= f * count + p * (count > 0));
  4. greedy rows (temperature 0): argmax;
  5. the other rows: / temperature, top-k, top-p, min-p (each a -inf mask), softmax, and a draw
     by argmax(probs / E) with E ~ Exp(1) (the exponential race, same law as multinomial).
A seeded sequence draws E from its own generator, [V] numbers per sampled token, so its tokens
do not depend on what else is in the batch; unseeded rows share the sampler's generator.
"""

from dataclasses import dataclass

import torch

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
        logprobs = torch.log_softmax(_rows(logits, rows_lp), dim=-1) if rows_lp else None
        mask_stop_tokens_before_min(logits, seqs, self.eos_token_ids)
        apply_penalties(logits, seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.is_greedy]
        random = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            _set_rows(tokens, greedy, _rows(logits, greedy).argmax(dim=-1))
        if random:
            sub_seqs = [seqs[i] for i in random]
            probs = sampling_probs(_rows(logits, random), [s.params for s in sub_seqs])
            _set_rows(tokens, random, self._race(probs, sub_seqs))
        token_ids = tokens.tolist()
        out_lp: list[TokenLogprobs | None] = [None] * len(seqs)
        if rows_lp:
            for j, row in enumerate(top_logprobs(logprobs, [token_ids[i] for i in rows_lp],
                                                 [seqs[i].params.logprobs for i in rows_lp])):
                out_lp[rows_lp[j]] = row
        return SamplerOutput(token_ids, out_lp)

    def _race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """probs: [R, V] -> [R] token ids, argmax(probs / E), E ~ Exp(1) per (row, token)."""
        draws = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.seed is None]
        if unseeded:
            gen = self._shared_generator(probs.device)
            _set_rows(draws, unseeded, torch.empty_like(_rows(probs, unseeded)).exponential_(generator=gen))
        for i, seq in enumerate(seqs):
            if seq.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=probs.device).manual_seed(seq.seed)
                draws[i].exponential_(generator=seq.generator)
        # E can be exactly 0; clamping keeps p / E finite (and a 0 draw wins, as it should).
        return (probs / draws.clamp_min_(torch.finfo(draws.dtype).tiny)).argmax(dim=-1)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self._seed)
        return self._generator


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a copy when rows are all of x."""
    if len(rows) == x.shape[0]:
        return x
    return x[torch.tensor(rows, device=x.device)]


def _set_rows(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == x.shape[0]:
        if values is not x:
            x.copy_(values)
    else:
        x[torch.tensor(rows, device=x.device)] = values


def mask_stop_tokens_before_min(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int]) -> None:
    """logits: [B, V]; -inf on EOS / stop ids of rows that have not yet made min_tokens tokens."""
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else eos_token_ids)
            logits[i, sorted(banned)] = float("-inf")


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logits: [B, V], in place, on the rows with a repetition, presence or frequency penalty."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[1]
    params = [seqs[i].params for i in rows]
    sub = _rows(logits, rows)
    out_ids = _padded([seqs[i].output_token_ids for i in rows], vocab, device)
    ones = torch.ones_like(out_ids, dtype=torch.float)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(1, out_ids, ones)[:, :vocab]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    prompt_ids = _padded([seqs[i].prompt_token_ids for i in rows], vocab, device)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompt_ids, True)
    seen = seen[:, :vocab] | (counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    sub = sub - freq * counts - presence * (counts > 0).float()
    _set_rows(logits, rows, sub)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] -> probs [R, V] after temperature, top-k, top-p and min-p."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    logits = logits / temperature
    if any(p.top_k > 0 for p in params):
        logits = mask_top_k(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        logits = mask_top_p(logits, [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        logits = mask_min_p(logits, [p.min_p for p in params])
    return torch.softmax(logits, dim=-1)


def mask_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """logits: [R, V]; keep each row's top_k largest (ties at the k-th value kept; 0 keeps all)."""
    vocab = logits.shape[1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    kth = logits.topk(int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """logits: [R, V]; keep the smallest set of most likely tokens whose probability reaches
    top_p: a token is dropped when the tokens ranked above it already sum to >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= torch.tensor(top_p, device=logits.device)[:, None]
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def mask_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """logits: [R, V]; drop tokens whose probability is below min_p * the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=logits.device)[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def top_logprobs(logprobs: torch.Tensor, token_ids: list[int], top_n: list[int]) -> list[TokenLogprobs]:
    """logprobs: [R, V] log-softmax rows; the chosen token's logprob and each row's top_n best."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    width = max(top_n)
    values, ids = logprobs.topk(width, dim=-1) if width else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(token_ids[r], chosen[r], tuple(ids[r][:n]), tuple(values[r][:n]))
            for r, n in enumerate(top_n)]
