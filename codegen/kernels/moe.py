"""Fused mixture of experts (the `moe` op, ir/reference.moe), vLLM's fused-MoE scheme in three
kernels (stages) and a combine:

  align     the P = T * top_k (token, slot) pairs sorted by expert (stable), each expert's run
            padded to a multiple of BLOCK_M with the sentinel P; the expert of every M-block;
            the padded row count. Sized by the static bound P + E * (BLOCK_M - 1), so every
            grid is known on the host and nothing syncs (CUDA-graph safe): blocks past the
            padded count exit at once. One Triton program rather than torch's argsort /
            bincount / cumsum / scatter: one launch instead of about six, compiled into the
            artifact like every other kernel.
  gate_up   grouped GEMM 1 per (M-block, N-tile over I): the block's expert's gate and up rows
            for the same columns (two fp32 accumulators), biases, the activation as epilogue
            ("silu": silu(gate) * up; "swiglu_clamped": GPT-OSS's, ALPHA and LIMIT constexprs)
            -> the intermediate [rows, I] in x's dtype.
  down      grouped GEMM 2: intermediate @ w_down[e]^T + b_down[e], times the pair's routing
            weight -> row p of a [P, N] buffer in x's dtype;
  combine   the sum over each token's top_k rows (torch on the device, step_support.combine_pairs).

Layouts as the op's: x [T, K], weights and ids [T, top_k] (pair p = t * top_k + j), w_gate_up
[E, 2I, K], w_down [E, N, I], biases [E, 2I], [E, N]; all contiguous. One `Variant` per kernel:
the stages of one layer share their `MoeParams` and BLOCK_M (the alignment's padding).
Tiles: kind "moe", bucket by token count (`bucket`); blocks BLOCK_M, BLOCK_N, BLOCK_K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, compiled_grid, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.kernels.gemm import DOT_OPTIONS
from kiln.codegen.targets import Target
from kiln.ir.op_types import MOE_ACTIVATIONS
from kiln.runtime import step_support
from kiln.runtime.step_support import combine_pairs

KIND = "moe"
STAGES = ("align", "gate_up", "down")
ID_DTYPES = {torch.int32: "i32", torch.int64: "i64"}
# one-hot [BLOCK_P, E_PAD] int32 values the alignment holds per tile (32 per thread on 4 warps)
ALIGN_TILE_VALUES = 4096
ALIGN_WARPS = 4


@dataclass(frozen=True)
class MoeParams:
    """What a layer's kernels are rendered for: x/weights/outputs `dtype`, the routing weights'
    and ids' dtypes, E experts, top_k, hidden K, output N, intermediate I, the activation."""

    dtype: str
    weights_dtype: str
    ids_dtype: str  # "i32" or "i64"
    experts: int
    top_k: int
    k: int
    n: int
    intermediate: int
    activation: str = "silu"
    alpha: float | None = None
    limit: float | None = None
    bias: bool = False

    def __post_init__(self):
        if self.activation not in MOE_ACTIVATIONS or (self.activation == "swiglu_clamped") != (self.limit is not None):
            raise ValueError(f"moe activation {self.activation!r} (alpha {self.alpha}, limit {self.limit}): "
                             f"one of {MOE_ACTIVATIONS}, alpha and limit exactly for swiglu_clamped")
        if self.activation == "swiglu_clamped" and self.alpha is None:
            raise ValueError("swiglu_clamped needs alpha")


@dataclass(frozen=True)
class Variant:
    stage: str  # one of STAGES
    moe: MoeParams
    block_m: int
    block_n: int  # 0 for align
    block_k: int  # align: BLOCK_P, its pairs per chunk
    num_warps: int
    num_stages: int

    @property
    def cache_key(self) -> str:
        m = self.moe
        if self.stage == "align":
            shape = f"{m.ids_dtype}__e{m.experts}__top{m.top_k}__b{self.block_m}p{self.block_k}"
        else:
            act = f"__{m.activation}" + (f"_a{m.alpha:g}_l{m.limit:g}" if m.limit is not None else "")
            shape = (f"{m.dtype}__w{m.weights_dtype}__e{m.experts}__top{m.top_k}__n{_n(self)}__k{_k(self)}"
                     + (act if self.stage == "gate_up" else "") + "__bias" * m.bias
                     + f"__b{self.block_m}x{self.block_n}x{self.block_k}")
        return f"{KIND}_{self.stage}__{shape}__w{self.num_warps}s{self.num_stages}".replace(".", "p").replace("-", "m")


def _n(variant: Variant) -> int:
    """The GEMM's output columns: I for gate_up, N for down."""
    return variant.moe.intermediate if variant.stage == "gate_up" else variant.moe.n


def _k(variant: Variant) -> int:
    """The GEMM's reduction length: K for gate_up, I for down."""
    return variant.moe.k if variant.stage == "gate_up" else variant.moe.intermediate


BUCKET_BOUNDS = (16, 256)  # the decode and small buckets' largest token counts


def bucket(tokens: int) -> str:
    """Tile bucket by token count T (each expert sees about T * top_k / E pairs): decode (T <= 16),
    small (T <= 256), large."""
    return step_support.bucket(tokens, *BUCKET_BOUNDS)


def choose(target: Target, params: MoeParams, tokens: int) -> tuple[Variant, Variant, Variant]:
    """The (align, gate_up, down) variants for about `tokens` tokens (any T runs; it picks tiles).

    BLOCK_N and BLOCK_K never exceed their GEMM's width (16 and 32 at least); on GPUs gate_up's
    BLOCK_N is halved until its two accumulators fit the target's accumulator_values_per_thread.
    The alignment takes BLOCK_P = ALIGN_TILE_VALUES / E_PAD pairs per chunk (16 at least).
    """
    tiles = target.tiles(KIND, bucket(tokens))
    block_m, threads = tiles.block("BLOCK_M"), tiles.num_warps * target.warp_size
    budget = target.accumulator_values_per_thread

    def gemm(stage: str, accumulators: int) -> Variant:
        shape = Variant(stage, params, block_m, 0, 0, tiles.num_warps, tiles.num_stages)
        block_n = min(tiles.block("BLOCK_N"), max(16, next_power_of_2(_n(shape))))
        block_k = min(tiles.block("BLOCK_K"), max(32, next_power_of_2(_k(shape))))
        while target.is_gpu and block_n > 16 and accumulators * block_m * block_n / threads > budget:
            block_n //= 2
        return Variant(stage, params, block_m, block_n, block_k, tiles.num_warps, tiles.num_stages)

    block_p = max(16, ALIGN_TILE_VALUES // next_power_of_2(params.experts))
    align = Variant("align", params, block_m, 0, block_p, ALIGN_WARPS, 1)
    return align, gemm("gate_up", 2), gemm("down", 1)


def padding(variant: Variant) -> int:
    """Rows the alignment may add to the T * top_k pairs: E * (BLOCK_M - 1)."""
    return variant.moe.experts * (variant.block_m - 1)


def padded_rows(variant: Variant, tokens: int) -> int:
    """Rows of the sorted pairs and the intermediate: the bound T * top_k + E * (BLOCK_M - 1)."""
    return tokens * variant.moe.top_k + padding(variant)


def padded_blocks(variant: Variant, tokens: int) -> int:
    return triton.cdiv(padded_rows(variant, tokens), variant.block_m)


def grid_source(variant: Variant) -> str:
    """align: one program; the GEMMs: one per (M-block of the bound, N tile)."""
    if variant.stage == "align":
        return "lambda tokens: (1,)"
    rows = f"tokens * {variant.moe.top_k} + {padding(variant)}"
    return f"lambda tokens: (cdiv({rows}, {variant.block_m}) * {triton.cdiv(_n(variant), variant.block_n)},)"


def grid(variant: Variant, tokens: int) -> tuple[int]:
    return compiled_grid(grid_source(variant))(tokens)


def render(variant: Variant) -> str:
    m = variant.moe
    return render_kernel(KIND, variant, stage=variant.stage, bias=m.bias, activation=m.activation,
                         dot_options=DOT_OPTIONS[m.dtype])


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    m, index = variant.moe, pointer("i32")
    if variant.stage == "align":
        return {"p_ids": pointer(m.ids_dtype), "p_sorted": index, "p_block_experts": index, "p_num_padded": index,
                "T": "i32"}
    tensor = pointer(m.dtype)
    return {"p_x": tensor, "p_w": tensor, **({"p_bias": tensor} if m.bias else {}),
            **({"p_weights": pointer(m.weights_dtype)} if variant.stage == "down" else {}),
            "p_sorted": index, "p_block_experts": index, "p_num_padded": index, "p_out": tensor, "T": "i32"}


def constexprs(variant: Variant) -> dict[str, object]:
    m = variant.moe
    if variant.stage == "align":
        return {"TOP_K": m.top_k, "E": m.experts, "E_PAD": next_power_of_2(m.experts), "BLOCK_M": variant.block_m,
                "BLOCK_P": variant.block_k}
    activation = {"ALPHA": m.alpha, "LIMIT": m.limit} if variant.stage == "gate_up" and m.limit is not None else {}
    return {"TOP_K": m.top_k, "N": _n(variant), "K": _k(variant), **activation, "BLOCK_M": variant.block_m,
            "BLOCK_N": variant.block_n, "BLOCK_K": variant.block_k}


def launch(variants: tuple[Variant, Variant, Variant], x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
           w_gate_up: torch.Tensor, w_down: torch.Tensor, b_gate_up: torch.Tensor | None = None,
           b_down: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the (align, gate_up, down) variants of `choose` and the combine on the op's inputs
    (layouts in the module docstring); returns out [T, N] in x's dtype."""
    align, gate_up, down = variants
    m, tokens = align.moe, x.shape[0]
    dtype = TORCH_DTYPES[m.dtype]
    e, i = m.experts, m.intermediate
    check_layout("x", x, (tokens, m.k), (m.k, 1), dtype)
    check_layout("weights", weights, (tokens, m.top_k), (m.top_k, 1), TORCH_DTYPES[m.weights_dtype])
    check_layout("ids", ids, (tokens, m.top_k), (m.top_k, 1), {v: k for k, v in ID_DTYPES.items()}[m.ids_dtype])
    check_layout("w_gate_up", w_gate_up, (e, 2 * i, m.k), (2 * i * m.k, m.k, 1), dtype)
    check_layout("w_down", w_down, (e, m.n, i), (m.n * i, i, 1), dtype)
    if (b_gate_up is not None, b_down is not None) != (m.bias, m.bias):
        raise ValueError(f"{gate_up.cache_key}: expects {'both' if m.bias else 'no'} biases")
    if m.bias:
        check_layout("b_gate_up", b_gate_up, (e, 2 * i), (2 * i, 1), dtype)
        check_layout("b_down", b_down, (e, m.n), (m.n, 1), dtype)
    out = torch.empty(tokens, m.n, dtype=dtype, device=x.device)
    if not tokens:
        return out
    rows = padded_rows(align, tokens)
    index = dict(dtype=torch.int32, device=x.device)
    sorted_pairs, block_experts = torch.empty(rows, **index), torch.empty(padded_blocks(align, tokens), **index)
    num_padded = torch.empty(1, **index)
    routing = (sorted_pairs, block_experts, num_padded)
    hidden = torch.empty(rows, i, dtype=dtype, device=x.device)
    pairs = torch.empty(tokens * m.top_k, m.n, dtype=dtype, device=x.device)
    runs = [(align, [ids, *routing]), (gate_up, [x, w_gate_up, *[b_gate_up] * m.bias, *routing, hidden]),
            (down, [hidden, w_down, *[b_down] * m.bias, weights, *routing, pairs])]
    for variant, args in runs:
        load(variant).kernel[grid(variant, tokens)](*args, tokens, **constexprs(variant), num_warps=variant.num_warps,
                                                    num_stages=variant.num_stages)
    return combine_pairs(pairs, out)
