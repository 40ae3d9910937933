"""Draw one token per row from logits under temperature, top-k, top-p and min-p.

One uniform number u per row picks the token by inverse CDF (the first token whose cumulative
probability reaches u * total), so a seeded sequence needs one number from its own generator per
step. A row's token comes from its own logits and parameters only, so it does not depend on the
rest of the batch: in particular candidates are ordered by their logits as given (ties broken as
torch.topk breaks them), never by recomputed probabilities, whose last bit can depend on where
the row sits in the batch.

Rows without a filter draw from softmax(logits / T) in vocabulary order. With a filter, a row
works on its most likely tokens sorted by logit (its candidates), where each filter keeps a
prefix, and the row keeps the shortest of them:
  top-k  the first k tokens (exactly k; the distribution is renormalised over them);
  top-p  tokens whose more likely predecessors hold < top_p of the probability (of the top-k
         distribution with top-k, else of the whole vocabulary);
  min-p  tokens with p >= min_p * p_max.

Rows run in groups of one mode, each group batched: plain rows; top-k rows, one group per k;
top-p / min-p rows without top-k ("nucleus" rows), which take FIRST_WIDTH candidates first and,
where the kept prefix could run past them, WIDEN times as many, up to the whole vocabulary, so
the result is exact either way.

On a CPU the full-vocabulary work is what costs, so it is kept to a few reads of the logits:
a row's best tokens come from the k chunks of CHUNK tokens with the largest maxima (not a full
top-k or sort), the weights exp((logit - max) / T) are only summed per chunk, BLOCK_ROWS rows at
a time in one scratch tensor (no [R, V] temporary: a fresh 50 MB tensor costs more in page
faults than the arithmetic), and a plain row's inverse CDF finds its chunk, then its token.
The logits are left unchanged.
"""

import math

import torch

from kiln.runtime.sampling_params import SamplingParams

CHUNK = 64  # tokens per chunk when searching a row through its chunk maxima / sums
BLOCK_ROWS = 32  # rows whose full-vocabulary weights are made at once on a CPU (few parallel ops)
FIRST_WIDTH = 64  # candidates first taken for a nucleus row
WIDEN = 4  # a nucleus row whose kept prefix may not fit retries with this many times the candidates
LOG2_E = 1 / math.log(2)


def draw_tokens(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] fp32, uniforms: [R] in [0, 1) -> token ids [R] (long)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(_mode(p, logits.shape[1]), []).append(i)
    if len(groups) == 1:
        return _draw_group(next(iter(groups)), logits, params, uniforms)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for mode, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw_group(mode, logits[index], [params[i] for i in rows], uniforms[index])
    return tokens


def _mode(p: SamplingParams, vocab: int) -> tuple:
    """("plain",) / ("top_k", k) / ("nucleus",): rows of one mode are drawn together."""
    if 0 < p.top_k < vocab:
        return "top_k", p.top_k
    if p.top_p < 1.0 or p.min_p > 0.0:
        return ("nucleus",)
    return ("plain",)


def _draw_group(mode: tuple, logits: torch.Tensor, params: list[SamplingParams],
                uniforms: torch.Tensor) -> torch.Tensor:
    if mode[0] == "plain":
        return pick_in_vocab(logits, _scales(params, logits.device), uniforms)
    ids, probs = (top_k_probs if mode[0] == "top_k" else nucleus_probs)(logits, params)
    return ids.gather(1, pick(probs.cumsum(dim=-1), uniforms)[:, None])[:, 0]


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _scales(params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    """[R, 1] log2(e) / T: exp(x / T) = 2^(x * scale), and torch's CPU exp2 is ~4x faster than exp."""
    return _column([LOG2_E / p.temperature for p in params], device)


def _weights(logits: torch.Tensor, top: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """logits: [R, N], top: [R, 1] the row max -> [R, N] exp((logit - top) / T) (new tensor)."""
    return ((logits - top) * scale).exp2_()


def chunk_weights(logits: torch.Tensor, top: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """logits: [R, V], top: [R, 1] row max -> [R, V / size]: exp((logit - top) / T) summed per
    chunk of `size` tokens; on a CPU BLOCK_ROWS rows at a time in one scratch tensor (kept in
    cache), elsewhere all rows at once (a GPU allocates cheaply and launches per block)."""
    rows, vocab = logits.shape
    block_rows = BLOCK_ROWS if logits.device.type == "cpu" else rows
    sums = logits.new_empty(rows, vocab // size)
    scratch = logits.new_empty(min(rows, block_rows), vocab)
    for start in range(0, rows, block_rows):
        block = slice(start, start + block_rows)
        weights = scratch[: sums[block].shape[0]]
        torch.sub(logits[block], top[block], out=weights).mul_(scale[block]).exp2_()
        torch.sum(weights.view(weights.shape[0], -1, size), dim=-1, out=sums[block])
    return sums


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] -> [R] log(sum(exp(logits))), through the chunked weight pass."""
    top = logits.amax(dim=-1, keepdim=True)
    scale = torch.full_like(top, LOG2_E)
    return top[:, 0] + chunk_weights(logits, top, scale, _chunk_size(logits.shape[1])).sum(dim=-1).log_()


def pick(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """cdf: [R, C] non-decreasing, unnormalised -> [R] the first index with cdf >= u * cdf[-1]
    (u = 0 maps to the first token with a non-zero weight)."""
    return _search(cdf, _target(cdf[:, -1], uniforms))


def _target(total: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[R] u * total, at least the smallest positive float (so a zero weight is never picked)."""
    return (uniforms * total).clamp_min_(torch.finfo(total.dtype).tiny)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cdf: [R, C], target: [R] -> [R] the first index with cdf >= target (the last if none)."""
    return torch.searchsorted(cdf, target[:, None])[:, 0].clamp_max_(cdf.shape[1] - 1)


def _chunk_size(vocab: int) -> int:
    """CHUNK where it divides the vocabulary, else 1 (no chunking)."""
    return CHUNK if vocab % CHUNK == 0 else 1


def pick_in_vocab(logits: torch.Tensor, scale: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits: [R, V], scale: [R, 1] -> [R] the first token whose cumulative weight
    exp(logit / T) reaches u * total: first the chunk where it lies, then the token in it."""
    rows, vocab = logits.shape
    size = _chunk_size(vocab)
    top = logits.amax(dim=-1, keepdim=True)
    chunk_cdf = chunk_weights(logits, top, scale, size).cumsum_(dim=-1)  # [R, V / size]
    target = _target(chunk_cdf[:, -1], uniforms)
    chunk = _search(chunk_cdf, target)
    before = chunk_cdf.gather(1, (chunk - 1).clamp_min(0)[:, None])[:, 0].masked_fill_(chunk == 0, 0.0)
    inside = logits.reshape(rows, vocab // size, size).gather(1, chunk[:, None, None].expand(rows, 1, size))[:, 0]
    inside = _weights(inside, top, scale).cumsum_(dim=-1)  # [R, size]
    # what is left of the target in the chunk: > 0 (before < target), at most the chunk's own sum
    rest = torch.minimum(target - before, inside[:, -1])
    return chunk * size + _search(inside, rest)


class ChunkedRows:
    """Logits [N, V] and the maximum of each chunk of `size` tokens [N, V / size]: a row's k
    largest tokens all lie in its k chunks with the largest maxima (a token outside is <= the
    k-th chunk maximum <= the k-th largest token inside), so a top-k reads those chunks only."""

    def __init__(self, logits: torch.Tensor):
        num_rows, vocab = logits.shape
        self.logits, self.size = logits, _chunk_size(vocab)
        self.num_chunks = vocab // self.size
        self.maxima = logits.reshape(num_rows, self.num_chunks, self.size).amax(dim=-1) if self.size > 1 else None

    def top(self, k: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: [R] row indices (None: all) -> (values, ids) [R, k]: each row's k largest
        logits, largest first, as logits[rows].topk(k)."""
        if self.maxima is None or k >= self.num_chunks:
            return (self.logits if rows is None else self.logits[rows]).topk(k, dim=-1)
        maxima = self.maxima if rows is None else self.maxima[rows]
        if rows is None:
            rows = torch.arange(self.logits.shape[0], device=self.logits.device)
        best = maxima.topk(k, dim=-1, sorted=False).indices  # [R, k] chunk ids
        # index_select of whole chunks: ~20x faster than a gather of the same tokens on a CPU
        chunks = (best + rows[:, None] * self.num_chunks).flatten()
        tokens = self.logits.reshape(-1, self.size).index_select(0, chunks).view(len(rows), k * self.size)
        values, where = tokens.topk(k, dim=-1)
        return values, best.gather(1, where // self.size) * self.size + where % self.size


def keep_prefix(weights: torch.Tensor, total: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """weights: [R, C] candidates' unnormalised probabilities, most likely first, total: [R] the
    mass they are relative to -> [R, C] bool: the candidates top-p and min-p keep."""
    top_p = _column([p.top_p for p in params], weights.device)
    min_p = _column([p.min_p for p in params], weights.device)
    before = weights.cumsum(dim=-1) - weights
    return (before < top_p * total[:, None]) & (weights >= min_p * weights[:, :1])


def _normalised(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = weights * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with one top_k = k: logits: [R, V] -> (ids [R, k], probs [R, k]), most likely first,
    the distribution of the kept candidates (top-p and min-p relative to the top-k one)."""
    values, ids = ChunkedRows(logits).top(params[0].top_k)
    weights = _weights(values, values[:, :1], _scales(params, logits.device))
    return ids, _normalised(weights, keep_prefix(weights, weights.sum(dim=-1), params))


def nucleus_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p / min-p rows without top-k: logits: [R, V] -> (ids [R, C], probs [R, C]), most
    likely first, 0 past each row's kept prefix."""
    chunked = ChunkedRows(logits)
    values, ids = chunked.top(min(FIRST_WIDTH, logits.shape[1]))
    top, scale = values[:, :1], _scales(params, logits.device)
    total = chunk_weights(logits, top, scale, chunked.size).sum(dim=-1)
    return _nucleus_candidates(chunked, None, (values, ids), top, scale, total, params)


def _nucleus_candidates(chunked: ChunkedRows, rows: torch.Tensor | None, candidates: tuple[torch.Tensor, torch.Tensor],
                        top: torch.Tensor, scale: torch.Tensor, total: torch.Tensor,
                        params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: [R] rows of chunked.logits (None: all), candidates: (values, ids) [R, W] their top W,
    top: [R, 1] row max, scale: [R, 1], total: [R] the whole row's weight -> (ids, probs) [R, C],
    C >= W: rows whose kept prefix may run past W are redone with WIDEN times as many."""
    (values, ids), vocab = candidates, chunked.logits.shape[1]
    width = ids.shape[1]
    weights = _weights(values, top, scale)
    keep = keep_prefix(weights, total, params)
    probs = _normalised(weights, keep)
    unsure = keep[:, -1].nonzero()[:, 0].tolist() if width < vocab else []
    if not unsure:
        return ids, probs
    index = torch.tensor(unsure, device=ids.device)
    wide_rows = index if rows is None else rows[index]
    wide_ids, wide_probs = _nucleus_candidates(chunked, wide_rows, chunked.top(min(width * WIDEN, vocab), wide_rows),
                                               top[index], scale[index], total[index], [params[i] for i in unsure])
    pad = wide_ids.shape[1] - width
    ids = torch.cat([ids, ids.new_zeros(len(ids), pad)], dim=1).index_copy_(0, index, wide_ids)
    probs = torch.cat([probs, probs.new_zeros(len(ids), pad)], dim=1).index_copy_(0, index, wide_probs)
    return ids, probs
