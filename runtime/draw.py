"""Draw one token per row from logits under temperature, top-k, top-p and min-p.

One uniform number u per row picks the token by inverse CDF (the first token whose cumulative
probability reaches u * total), so a seeded sequence needs one number from its own generator per
step and its tokens do not depend on the rest of the batch.

Rows without a filter draw from softmax(logits / T) in vocabulary order. With a filter, a row
works on its most likely tokens sorted by logit (its candidates), where each filter keeps a
prefix, and the row keeps the shortest of them:
  top-k  the first k tokens (exactly k; the distribution is renormalised over them);
  top-p  tokens whose more likely predecessors hold < top_p of the probability (of the top-k
         distribution with top-k, else of the whole vocabulary);
  min-p  tokens with p >= min_p * p_max, i.e. logit / T >= max(logit / T) + log(min_p).
Without top-k only the first CANDIDATES tokens are sorted first; a row whose kept prefix could
run past them is redone over the fully sorted vocabulary, so the result is exact either way.
"""

import math

import torch

from kiln.runtime.sampling_params import SamplingParams

CANDIDATES = 256


def draw_tokens(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] fp32, uniforms: [R] in [0, 1) -> token ids [R] (long)."""
    filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0]
    if not filtered:
        return _draw_plain(logits, params, uniforms)
    if len(filtered) == len(params):
        return _draw_filtered(logits, params, uniforms)
    plain = sorted(set(range(len(params))) - set(filtered))
    index_f, index_p = (torch.tensor(rows, device=logits.device) for rows in (filtered, plain))
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    tokens[index_f] = _draw_filtered(logits[index_f], [params[i] for i in filtered], uniforms[index_f])
    tokens[index_p] = _draw_plain(logits[index_p], [params[i] for i in plain], uniforms[index_p])
    return tokens


def _temperatures(params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    return torch.tensor([p.temperature for p in params], device=device)[:, None]


def _draw_plain(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """From softmax(logits / T), in vocabulary order."""
    weights = (logits - logits.amax(dim=-1, keepdim=True)).div_(_temperatures(params, logits.device)).exp_()
    return pick(weights.cumsum_(dim=-1), uniforms)


def _draw_filtered(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    ids, probs = candidate_probs(logits, params)
    return ids.gather(1, pick(probs.cumsum(dim=-1), uniforms)[:, None])[:, 0]


def pick(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """cdf: [R, C] non-decreasing, unnormalised -> [R] the first index with cdf >= u * cdf[-1]
    (u = 0 maps to the first token with a non-zero weight)."""
    target = (uniforms * cdf[:, -1]).clamp_min_(torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, target[:, None])[:, 0].clamp_max_(cdf.shape[1] - 1)


def candidate_probs(logits: torch.Tensor, params: list[SamplingParams],
                    width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [R, V] -> (token ids [R, C], probs [R, C]): each row's candidates, most likely
    first, with the filtered distribution of logits / T (0 past the kept prefix)."""
    vocab, device = logits.shape[1], logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if width is None:
        width = min(vocab, max(int(top_k.max()), CANDIDATES if bool((top_k == 0).any()) else 1))
    raw, ids = logits.topk(width, dim=-1)
    temperature = _temperatures(params, device)
    values = raw / temperature
    in_top_k = (top_k[:, None] == 0) | (torch.arange(width, device=device)[None, :] < top_k[:, None])
    log_total = torch.logsumexp(values.masked_fill(~in_top_k, -math.inf), dim=-1)
    whole_vocab = ((top_k == 0) & (top_p < 1.0)).nonzero()[:, 0]
    if len(whole_vocab) and width < vocab:  # top-p without top-k: the mass of the whole vocabulary
        rows = logits[whole_vocab] if len(whole_vocab) < len(params) else logits
        weights = (rows - raw[whole_vocab, :1]).div_(temperature[whole_vocab]).exp_()
        log_total[whole_vocab] = values[whole_vocab, 0] + weights.sum(dim=-1).log()
    probs = (values - log_total[:, None]).exp() * in_top_k
    log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], device=device)
    keep = in_top_k & (probs.cumsum(dim=-1) - probs < top_p[:, None]) & (values >= values[:, :1] + log_min_p[:, None])
    probs = probs * keep
    probs = probs / probs.sum(dim=-1, keepdim=True)
    unsure = ((top_k == 0) & keep[:, -1]).nonzero()[:, 0].tolist() if width < vocab else []
    if not unsure:
        return ids, probs
    index = torch.tensor(unsure, device=device)
    full_ids, full_probs = candidate_probs(logits[index], [params[i] for i in unsure], width=vocab)
    ids = torch.cat([ids, ids.new_zeros(len(params), vocab - width)], dim=1).index_copy_(0, index, full_ids)
    probs = torch.cat([probs, probs.new_zeros(len(params), vocab - width)], dim=1).index_copy_(0, index, full_probs)
    return ids, probs
