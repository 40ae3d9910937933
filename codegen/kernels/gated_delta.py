"""Kernel kind `gated_delta`: the `linear_attention` op (ir/linear_rules.py) over a varlen batch.

The recurrence rule is a variant parameter: "gated_delta" (Gated DeltaNet, takes beta) or
"gated" (gated linear attention with a scalar decay per head, Mamba2's SSD). Each sequence's
fp32 state [Hv, Dk, Dv] lives in slot state_indices[b] of the state pool: read unless the chunk
starts the sequence, written back after it. One program per (sequence, value head, BLOCK_V state
columns) carries its [Dk, BLOCK_V] fp32 tile through the sequence's chunk, in one of two forms:
  recurrent (chunk == 0)  token by token, the state in registers: decode steps (and correct for
                          any length)
  chunked (chunk > 0)     `chunk` tokens at a time, as flash-linear-attention chunks the gated
                          delta rule (the WY/UT form, its triangular solve done in registers by
                          forward substitution), with the products on tensor cores: prefill
Both forms take the same arguments and grid; the caller picks one per step phase (`choose`).
The chunked form keeps a whole chunk in registers: chunks of CHUNK = 16 tokens, with state
slices of 64 rows, compile without spills on every GPU target for head_k_dim up to 256 (chunks
of 32 and 64 tokens spill on some, in 4 or 8 warps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen.kernels import (
    TORCH_DTYPES,
    check_layout,
    compiled_grid,
    float_tag,
    load_source,
    next_power_of_2,
    pointer,
    render_kernel,
)
from kiln.codegen.targets import Target
from kiln.ir.linear_rules import RULES
from kiln.ir.specs import LinearAttentionSpec

KIND = "gated_delta"
CHUNK = 16  # tokens per chunk of the chunked form
CHUNK_BLOCK_K = 64  # state rows per slice of the chunked form (its dots' K)
CHUNK_BLOCK_V = 32  # state columns per chunked program (16 spills at head_k_dim 256)
CHUNK_MAX_HEAD_K = 256  # the widest key head the chunked form compiles for without spills
STATE_TILE = 4096  # the most fp32 state values a recurrent program holds (head_k_dim rounded up x BLOCK_V)
OPERANDS = {"fp32": "tl.float32", "bf16": "tl.bfloat16", "fp16": "tl.float16"}


@dataclass(frozen=True)
class Variant:
    """dtype: of q, k, v, beta and out; g_dtype: of g. scale: q's (applied after the L2 norm).
    chunk: tokens per chunk, 0 for the recurrent form. block_v: state columns per program;
    block_k: state rows per slice (the chunked form's dots run a slice at a time; the recurrent
    form holds one slice, the whole head_k_dim)."""

    rule: str
    dtype: str
    g_dtype: str
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    scale: float
    qk_l2norm: bool
    chunk: int
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        if self.rule not in RULES or self.num_v_heads % self.num_k_heads:
            raise ValueError(f"unknown rule or num_v_heads not a multiple of num_k_heads: {self}")
        if self.chunk and (self.chunk < 16 or self.chunk & (self.chunk - 1)):
            raise ValueError(f"chunk must be 0 (recurrent) or a power of two >= 16 (tl.dot): {self}")
        if not self.chunk and self.k_slices > 1:
            raise ValueError(f"the recurrent form holds the state's rows in one slice: {self}")

    @property
    def uses_beta(self) -> bool:
        return RULES[self.rule].uses_beta

    @property
    def k_slices(self) -> int:
        return -(-self.head_k_dim // self.block_k)

    @property
    def v_tiles(self) -> int:
        return -(-self.head_v_dim // self.block_v)

    @property
    def cache_key(self) -> str:
        shape = f"hk{self.num_k_heads}_hv{self.num_v_heads}_dk{self.head_k_dim}_dv{self.head_v_dim}"
        form = f"c{self.chunk}" if self.chunk else "recurrent"
        norm = "__l2norm" if self.qk_l2norm else ""
        return (f"{KIND}__{self.rule}__{self.dtype}_g{self.g_dtype}__{shape}__scale{float_tag(self.scale)}{norm}"
                f"__{form}_bk{self.block_k}_bv{self.block_v}__w{self.num_warps}_s{self.num_stages}")


def choose(target: Target, spec: LinearAttentionSpec, dtype: str, *, chunked: bool, g_dtype: str = "fp32") -> Variant:
    """The variant for `spec`'s layer with q, k, v, beta in `dtype` and g in `g_dtype`: chunked
    for prefill steps, recurrent for decode steps. The same on every GPU target, where fp32
    layers and keys wider than CHUNK_MAX_HEAD_K run the recurrent form either way (fp32 products
    run on FMAs, or round to tf32, and spill)."""
    block_k = next_power_of_2(spec.head_k_dim)
    layer = (spec.rule, dtype, g_dtype, spec.num_k_heads, spec.num_v_heads, spec.head_k_dim, spec.head_v_dim,
             spec.effective_scale, spec.qk_l2norm)
    if chunked and (not target.is_gpu or dtype != "fp32" and block_k <= CHUNK_MAX_HEAD_K):
        return Variant(*layer, CHUNK, max(16, min(block_k, CHUNK_BLOCK_K)),
                       max(16, min(next_power_of_2(spec.head_v_dim), CHUNK_BLOCK_V)), num_warps=4)
    block_v = min(next_power_of_2(spec.head_v_dim), max(16, STATE_TILE // block_k))
    return Variant(*layer, 0, block_k, block_v, num_warps=4)


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, delta=variant.uses_beta, chunk=variant.chunk, qk_l2norm=variant.qk_l2norm,
                         k_slices=variant.k_slices, operand=OPERANDS[variant.dtype])


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index = pointer(variant.dtype), pointer("i32")
    beta = {"p_beta": act} if variant.uses_beta else {}
    return {"p_q": act, "p_k": act, "p_v": act, "p_g": pointer(variant.g_dtype), "p_state": pointer("fp32"),
            "p_query_start": index, "p_seq_lens": index, "p_state_indices": index, **beta, "p_out": act}


def constexprs(variant: Variant) -> dict[str, object]:
    chunk = {"CHUNK": variant.chunk} if variant.chunk else {}
    return {"NUM_V_HEADS": variant.num_v_heads, "GROUP": variant.num_v_heads // variant.num_k_heads,
            "HEAD_K": variant.head_k_dim, "HEAD_V": variant.head_v_dim, "BLOCK_K": variant.block_k,
            "BLOCK_V": variant.block_v, "SCALE": variant.scale, **chunk}


def grid_source(variant: Variant) -> str:
    """One program per (sequence, value head, BLOCK_V state columns)."""
    return f"lambda seqs: (seqs, {variant.num_v_heads * variant.v_tiles})"


def grid(variant: Variant, num_seqs: int) -> tuple[int, int]:
    return compiled_grid(grid_source(variant))(num_seqs)


def launch(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
           query_start: torch.Tensor, seq_lens: torch.Tensor, state_indices: torch.Tensor,
           beta: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The op's tensors, contiguous: q, k [T, Hk, Dk]; v [T, Hv, Dv]; g [T, Hv] (g_dtype); state
    [NS, Hv, Dk, Dv] fp32 (updated in place at the sequences' slots); query_start [B + 1], seq_lens
    and state_indices [B] int32; beta [T, Hv] for a rule that uses it. Returns out [T, Hv, Dv]
    (allocated when None)."""
    tokens, hk, hv, dk, dv = q.shape[0], variant.num_k_heads, variant.num_v_heads, variant.head_k_dim, variant.head_v_dim
    num_seqs, dtype = seq_lens.shape[0], TORCH_DTYPES[variant.dtype]
    if (beta is not None) != variant.uses_beta:
        raise ValueError(f"rule {variant.rule} {'needs' if variant.uses_beta else 'takes no'} beta")
    out = torch.empty(v.shape, dtype=dtype, device=v.device) if out is None else out
    for name, tensor in (("q", q), ("k", k)):
        check_layout(name, tensor, (tokens, hk, dk), (hk * dk, dk, 1), dtype)
    for name, tensor in (("v", v), ("out", out)):
        check_layout(name, tensor, (tokens, hv, dv), (hv * dv, dv, 1), dtype)
    check_layout("g", g, (tokens, hv), (hv, 1), TORCH_DTYPES[variant.g_dtype])
    if beta is not None:
        check_layout("beta", beta, (tokens, hv), (hv, 1), dtype)
    check_layout("state", state, (state.shape[0], hv, dk, dv), (hv * dk * dv, dk * dv, dv, 1), torch.float32)
    check_layout("query_start", query_start, (num_seqs + 1,), (1,), torch.int32)
    for name, tensor in (("seq_lens", seq_lens), ("state_indices", state_indices)):
        check_layout(name, tensor, (num_seqs,), (1,), torch.int32)
    if num_seqs:
        load(variant).kernel[grid(variant, num_seqs)](
            q, k, v, g, state, query_start, seq_lens, state_indices, *(() if beta is None else (beta,)), out,
            **constexprs(variant), num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return out
