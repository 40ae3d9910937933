"""The recurrent layers of the `cpu` target: linear attention and causal conv1d over the state
pool, as its programs call them (through cpu_ops), on whatever device the tensors live.

Their meaning is ir/linear_rules.py's token-by-token reference. Here the one-token chunks of a
step (decodes) advance their states together, one batched update per step; a longer chunk runs
in chunks of CHUNK tokens in the WY/UT form (as flash-linear-attention computes the gated delta
rule): within a chunk the outputs are a few matmuls, and the state crosses each chunk boundary
once. Everything runs in fp32; outputs are cast to v's (x's) dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunk of the chunked form


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _spans(query_start: torch.Tensor, seq_lens: torch.Tensor) -> tuple[list[int], list[int], list[bool]]:
    starts = query_start.tolist()
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    return starts, lengths, [int(n) == q for n, q in zip(seq_lens.tolist(), lengths)]


def _initial(state: torch.Tensor, slots: torch.Tensor, fresh: list[bool]) -> torch.Tensor:
    """The states of `slots` (fp32 copies), zero where the sequence starts fresh."""
    initial = state[slots].float()
    if any(fresh):
        initial[torch.tensor(fresh, device=state.device)] = 0
    return initial


def linear_attention(q, k, v, g, state, query_start, seq_lens, state_indices, beta=None, *, rule: str, group: int,
                     scale: float, qk_l2norm: bool) -> torch.Tensor:
    """q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv]; state f32[NS, Hv, Dk, Dv] -> [T, Hv, Dv] in v's
    dtype (ir/linear_rules.linear_attention; `group` = Hv / Hk). Writes each sequence's state."""
    q, k = q.float(), k.float()
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q, k = (q * scale).repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)  # to the value heads
    v32, g32 = v.float(), g.float()
    beta32 = beta.float() if beta is not None else None
    starts, lengths, fresh = _spans(query_start, seq_lens)
    slots = state_indices.long()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    ones = [b for b, n in enumerate(lengths) if n == 1]
    if ones:
        rows = torch.tensor([starts[b] for b in ones], device=v.device)
        s = _initial(state, slots[ones], [fresh[b] for b in ones])
        s, out[rows] = _token_update(rule, s, q[rows], k[rows], v32[rows], g32[rows],
                                     beta32[rows] if beta32 is not None else None)
        state[slots[ones]] = s
    for b, n in enumerate(lengths):
        if n <= 1:
            continue
        span = slice(starts[b], starts[b] + n)
        s = _initial(state, slots[b:b + 1], fresh[b:b + 1])[0]
        out[span], s = _chunked(rule, s, q[span], k[span], v32[span], g32[span],
                                beta32[span] if beta32 is not None else None)
        state[slots[b]] = s
    return out.to(v.dtype)


def _token_update(rule: str, s, q, k, v, g, beta):
    """One token of each of a batch's sequences: s [B, H, Dk, Dv]; q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]."""
    s = s * g.exp()[..., None, None]
    if rule == "gated_delta":
        v = (v - torch.einsum("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * v[..., None, :]
    return s, torch.einsum("bhkv,bhk->bhv", s, q)


def _chunked(rule: str, s, q, k, v, g, beta):
    """One sequence's L tokens from state s [H, Dk, Dv]: q, k [L, H, Dk], v [L, H, Dv], g, beta [L, H].
    Returns (out [L, H, Dv], final state)."""
    length = q.shape[0]
    pad = -length % CHUNK
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q, k, v))  # [H, L', D]
    g = F.pad(g.t(), (0, pad))  # padded tokens decay nothing and add nothing (k = v = 0)
    if beta is not None:
        beta = F.pad(beta.t(), (0, pad))
    heads, padded = q.shape[:2]
    q, k, v = (x.reshape(heads, -1, CHUNK, x.shape[-1]) for x in (q, k, v))
    cum = g.reshape(heads, -1, CHUNK).cumsum(-1)  # [H, N, C]: log decay from the chunk's start
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, N, C, C]
    k_t = k.transpose(-1, -2).contiguous()  # [H, N, Dk, C]
    if rule == "gated_delta":
        # WY/UT form: within a chunk, u = T (beta v - W s) with T = (I + strict_lower(beta k k^T * decay))^-1
        k_beta = k * beta.reshape(heads, -1, CHUNK, 1)
        lower = ((k_beta @ k_t) * decay).tril(-1)
        eye = torch.eye(CHUNK, device=q.device).expand_as(lower)
        solve = torch.linalg.solve_triangular(eye + lower, eye, upper=False, unitriangular=True)
        v = solve @ (v * beta.reshape(heads, -1, CHUNK, 1))
        w = solve @ (k_beta * cum.exp()[..., None])
    scores = (q @ k_t) * decay  # [H, N, C, C]
    out = torch.empty_like(v)
    for c in range(q.shape[1]):
        u = v[:, c] - w[:, c] @ s if rule == "gated_delta" else v[:, c]
        out[:, c] = (q[:, c] * cum[:, c, :, None].exp()) @ s + scores[:, c] @ u
        last = cum[:, c, -1:]
        s = s * last.exp()[..., None] + (k_t[:, c] * (last - cum[:, c]).exp()[:, None, :]) @ u
    return out.reshape(heads, padded, -1)[:, :length].transpose(0, 1), s


def causal_conv1d(x, weight, conv_state, query_start, seq_lens, state_indices, bias=None, *,
                  activation: str | None) -> torch.Tensor:
    """x [T, C]; weight [C, K]; conv_state [NS, K - 1, C]; bias [C] or None -> [T, C] in x's dtype
    (ir/linear_rules.causal_conv1d). Writes each sequence's last K - 1 inputs to its slot."""
    starts, lengths, fresh = _spans(query_start, seq_lens)
    slots = state_indices.long()
    w, b32 = weight.float(), bias.float() if bias is not None else None
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    ones = [b for b, n in enumerate(lengths) if n == 1]
    if ones:  # the one-token chunks together: [B', K, C] windows
        rows = torch.tensor([starts[b] for b in ones], device=x.device)
        window = torch.cat([_initial(conv_state, slots[ones], [fresh[b] for b in ones]), x[rows, None].float()], dim=1)
        out[rows] = (window * w.t()).sum(1) + (b32 if b32 is not None else 0)
        conv_state[slots[ones]] = window[:, 1:].to(conv_state.dtype)
    for b, n in enumerate(lengths):
        if n <= 1:
            continue
        prior = _initial(conv_state, slots[b:b + 1], fresh[b:b + 1])[0]
        window = torch.cat([prior, x[starts[b]:starts[b] + n].float()])  # [K - 1 + n, C]
        out[starts[b]:starts[b] + n] = F.conv1d(window.t()[None], w[:, None], b32, groups=w.shape[0])[0].t()
        conv_state[slots[b]] = window[n:].to(conv_state.dtype)
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)
