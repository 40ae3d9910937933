"""The cpu target's mixture of experts: tokens sorted by expert, one GEMM pair per expert that
received tokens (experts without tokens cost nothing), each expert's rows scaled by their routing
weights, and the rows summed back per token.

Layouts as the `moe` op's (ir/reference.moe): x [T, K], weights [T, top_k] fp32, ids [T, top_k],
w_gate_up [E, 2I, K] (gate rows first), w_down [E, N, I], biases [E, 2I] and [E, N] or None. The
executor hands fp32 expert weights packed by `pack_experts` (a tuple of E oneDNN tensors); the
function takes the plain [E, ., .] tensors too.

Why this shape, measured on the dev machine (2-core AMD EPYC, AVX2, no native bf16) with one
Qwen3-30B-A3B-shaped expert (K 2048, I 768), single-thread ms per expert for gate_up + down, the
weights streamed from memory (bench/moe.py has whole layers):
- fp32 runs on oneDNN with each expert's weights packed once, at load: 1.4 ms at 2 rows against
  1.9 for MKL (F.linear, what transformers' grouped_mm and eager experts call), 3.4 against 4.2
  at 16 rows; at 1 row it is ~15% slower than MKL's gemv (1.2 against 1.05 ms: both stream the
  19 MB of weights, MKL's a little faster). A packing hint for 16 rows changed nothing measurable.
- bf16 weights cannot be packed for oneDNN without AVX512-BF16 or AVX-NE-CONVERT, and torch's bf16
  GEMM on AVX2 converts the weights again for every row (~1 ms per row): an expert of at most
  `BF16_DIRECT_ROWS_PER_THREAD` rows per thread runs in bf16; one with more has its weights
  converted to fp32 `CONVERT_ROWS` rows at a time, into a buffer that stays in cache for the fp32
  multiply: 4.0 ms at 16 rows against 15 in bf16 (converting a whole expert first: 5.1 ms;
  converting at load would double the memory bf16 was chosen for). The bf16 GEMM's conversions
  scale with threads, the bulk conversion (a memory-bound copy) less: the crossover was ~3 rows
  on 1 thread, 4 to 6 on 2 (whole layers at 32 tokens, 2 threads: 139 ms with 4, 181 with 2).
- The rows are gathered once, sorted by expert; each expert's output is copied into place, the
  routing weights scale all rows in one pass and index_add sums them per token: those together
  are ~2% of a 256-token call (a gather of each token's top_k rows and a sum timed the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available()
BF16_DIRECT_ROWS_PER_THREAD = 2  # bf16 experts of at most this many rows per thread run in bf16, larger ones in fp32
CONVERT_ROWS = 512  # bf16 weight rows converted to fp32 at a time: 4 MiB of gate_up, 1.5 MiB of down

Experts = torch.Tensor | Sequence[torch.Tensor]  # [E, M, K], or E oneDNN-packed [M, K] (`pack_experts`)


def pack_experts(w: torch.Tensor) -> Experts:
    """Expert weights [E, M, K] as the executor hands them to `moe`: fp32 ones packed into
    oneDNN's blocked layout one expert at a time (done once, at load; the packed copy replaces the
    stacked tensor); others unchanged."""
    if w.dtype != torch.float32 or not _ONEDNN:
        return w
    return tuple(torch.ops.mkldnn._reorder_linear_weight(w[e]) for e in range(w.shape[0]))


def _activation(gate_up: torch.Tensor, activation: str, alpha: float | None, limit: float | None) -> torch.Tensor:
    """[M, I] from an expert's [M, 2I] gate/up rows (reference.expert_activation)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate).mul_(up)
    assert alpha is not None and limit is not None, "swiglu_clamped needs alpha and limit"
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1).mul_(gate).mul_(torch.sigmoid(gate * alpha))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times w [N, K] (+ b [N]); w plain or oneDNN-packed."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _converted_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """fp32 x [M, K] times bf16 w [N, K] (+ b [N]) in fp32, w converted `CONVERT_ROWS` rows at a
    time into `buffer` [CONVERT_ROWS, K] fp32, which stays in cache for the multiply."""
    out = torch.empty(x.shape[0], w.shape[0])
    for n in range(0, w.shape[0], CONVERT_ROWS):
        chunk = w[n : n + CONVERT_ROWS]
        out[:, n : n + chunk.shape[0]] = F.linear(x, buffer[: chunk.shape[0]].copy_(chunk))
    return out if b is None else out.add_(b)


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: Experts, w_down: Experts,
        b_gate_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None, *, activation: str,
        alpha: float | None, limit: float | None) -> torch.Tensor:
    """[T, N] in x's dtype: sum over each token's top_k experts of weight * expert(x[t]).
    Computed in fp32 but for bf16 experts of few rows (`BF16_DIRECT_ROWS_PER_THREAD`: in bf16, as HF)."""
    top_k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=len(w_gate_up)).tolist()
    tokens = order // top_k
    rows = x.index_select(0, tokens)
    convert = rows.dtype == torch.bfloat16 and not w_gate_up[0].is_mkldnn
    if convert:
        direct_rows, rows32 = BF16_DIRECT_ROWS_PER_THREAD * torch.get_num_threads(), rows.float()
        buffers = torch.empty(CONVERT_ROWS, w_gate_up[0].shape[1]), torch.empty(CONVERT_ROWS, w_down[0].shape[1])
    out = torch.empty(rows.shape[0], w_down[0].shape[0], dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up, down = w_gate_up[expert], w_down[expert]
        b1 = None if b_gate_up is None else b_gate_up[expert]
        b2 = None if b_down is None else b_down[expert]
        if not convert:
            h = _activation(_linear(rows[start:end], gate_up, b1), activation, alpha, limit)
            out[start:end] = _linear(h, down, b2)
        elif count <= direct_rows:
            out[start:end] = F.linear(_activation(F.linear(rows[start:end], gate_up, b1), activation, alpha, limit),
                                      down, b2)
        else:
            h = _converted_linear(rows32[start:end], gate_up, None if b1 is None else b1.float(), buffers[0])
            out[start:end] = _converted_linear(_activation(h, activation, alpha, limit), down,
                                               None if b2 is None else b2.float(), buffers[1])
        start = end
    out.mul_(weights.reshape(-1).index_select(0, order)[:, None])
    return torch.zeros(x.shape[0], out.shape[1]).index_add_(0, tokens, out).to(x.dtype)
