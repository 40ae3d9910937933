"""GEMM / GEMV: out[M, N] = epilogue(prologue(x) @ W^T), W stored [N, K] (nn.Linear layout).

fp32 accumulation; M (output rows) is a runtime argument, N and K are compiled in. The prologue
is a tuple of op names from `PROLOGUE_OPS`, in this order, that shape the rows of x the matmul
reads while they stream through the K loop:
  gather_rows  output row m reads x row rows[m] (rows: [M] int32; x may have any row count)
  rms_norm     x rows are RMS-normalised: norm(x) @ W^T = rsqrt(mean(x^2) + eps) * (x @ W^T), so
               the fp32 accumulators' rows are scaled before the epilogue; the sum of squares
               comes from a first pass over the tile's rows (re-read from cache), not from the
               main loop, whose registers stay the accumulators' (in the loop, sm_80/89/90a
               spilled); eps is a runtime argument
  norm_weight  x columns are scaled by norm_weight[K] before the dot (an RMSNorm weight that
               was not folded into W); needs rms_norm
The epilogue is a tuple of op names from `EPILOGUE_OPS`, applied in order to the fp32 accumulator `acc`:
  bias       acc + bias[N]
  silu       silu(acc)
  gelu_tanh  gelu(acc), tanh approximation
  silu_mul   packed gate/up weight W: [2N, K] (gate rows, then up rows): silu(x@Wg^T) * (x@Wu^T);
             must come first (it defines what `acc` is)
  residual   acc + residual[M, N] (out may be the residual tensor itself: in-place add)
Blocks: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M; tile kind "gemm", bucket by M (`bucket`). Ops that
keep another [BLOCK_M, BLOCK_N] tile live (silu_mul's second accumulator, the residual tile) may
halve BLOCK_N so that registers do not spill (see `choose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, pointer, render_kernel
from kiln.codegen.targets import Target


@dataclass(frozen=True)
class EpilogueOp:
    expression: str  # Triton expression for the new `acc` (fp32 [BLOCK_M, BLOCK_N])
    operand: str | None = None  # the pointer argument it reads, if any
    loop_tiles: int = 0  # extra [BLOCK_M, BLOCK_N] accumulators live through the main loop
    epilogue_tiles: int = 0  # extra [BLOCK_M, BLOCK_N] tiles it loads beside `acc` in the epilogue


EPILOGUE_OPS = {
    "bias": EpilogueOp("acc + tl.load(p_bias + o_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]", "p_bias"),
    "silu": EpilogueOp("silu(acc)"),
    "gelu_tanh": EpilogueOp("gelu_tanh(acc)"),
    "silu_mul": EpilogueOp("silu(acc) * acc_up", loop_tiles=1),
    "residual": EpilogueOp(
        "acc + tl.load(p_residual + o_out, mask=mask_out, other=0.0).to(tl.float32)", "p_residual", epilogue_tiles=1
    ),
}
@dataclass(frozen=True)
class PrologueOp:
    operand: str | None = None  # the pointer argument it reads, if any
    scalar: str | None = None  # the fp32 runtime argument it reads, if any


PROLOGUE_OPS = {
    "gather_rows": PrologueOp("p_rows"),
    "rms_norm": PrologueOp(scalar="eps"),
    "norm_weight": PrologueOp("p_norm_weight"),
}
# fp32 values per thread the epilogue's live tiles may hold; beyond it ptxas spills (seen with
# a 128x256 accumulator plus a residual tile on 8 warps on sm_90a).
EPILOGUE_VALUES_PER_THREAD = 128
# Extra tl.dot arguments per dtype: fp32 GEMMs stay exact fp32 (no tf32).
DOT_OPTIONS = {"fp32": ', input_precision="ieee"', "bf16": "", "fp16": ""}
KIND = "gemm"


@dataclass(frozen=True)
class Variant:
    dtype: str  # x, W, bias, residual and out
    n: int  # N output columns
    k: int  # K reduction length
    epilogue: tuple[str, ...]
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    prologue: tuple[str, ...] = ()

    def __post_init__(self):
        if tuple(op for op in PROLOGUE_OPS if op in self.prologue) != self.prologue:
            raise ValueError(f"prologue {self.prologue}: ops must be distinct names from {list(PROLOGUE_OPS)}, "
                             "in that order")
        if "norm_weight" in self.prologue and "rms_norm" not in self.prologue:
            raise ValueError(f"prologue {self.prologue}: norm_weight scales an rms_norm's output; it needs rms_norm")
        unknown = [op for op in self.epilogue if op not in EPILOGUE_OPS]
        if unknown or len(set(self.epilogue)) != len(self.epilogue):
            raise ValueError(f"epilogue {self.epilogue}: ops must be distinct names from {list(EPILOGUE_OPS)}")
        if "silu_mul" in self.epilogue[1:]:
            raise ValueError(f"epilogue {self.epilogue}: silu_mul must be the first op")

    @property
    def gate_up(self) -> bool:
        return "silu_mul" in self.epilogue

    @property
    def rms_norm(self) -> bool:
        return "rms_norm" in self.prologue

    @property
    def cache_key(self) -> str:
        prologue = "".join(f"__{op}" for op in self.prologue)
        epilogue = "".join(f"__{op}" for op in self.epilogue)
        return (
            f"{KIND}__{self.dtype}{prologue}__n{self.n}__k{self.k}{epilogue}"
            f"__b{self.block_m}x{self.block_n}x{self.block_k}g{self.group_m}__w{self.num_warps}s{self.num_stages}"
        )


def bucket(m: int) -> str:
    """Tile bucket by row count: decode-like (M <= 16), small (M <= 128), large."""
    if m <= 16:
        return "decode"
    return "small" if m <= 128 else "large"


def choose(
    target: Target, *, dtype: str, m: int, n: int, k: int, epilogue: tuple[str, ...] = (),
    prologue: tuple[str, ...] = (),
) -> Variant:
    """The variant for about `m` rows (it runs correctly for any M; `m` only picks the tiles).

    On GPUs, BLOCK_N is halved until the main loop's accumulators fit the target's
    `accumulator_values_per_thread` and the epilogue's live tiles fit EPILOGUE_VALUES_PER_THREAD.
    """
    tiles = target.tiles(KIND, bucket(m))
    block_m, block_n = tiles.block("BLOCK_M"), tiles.block("BLOCK_N")
    ops = [EPILOGUE_OPS[op] for op in epilogue if op in EPILOGUE_OPS]
    loop_tiles = 1 + sum(op.loop_tiles for op in ops)
    epilogue_tiles = 1 + max((op.epilogue_tiles for op in ops), default=0)
    threads = tiles.num_warps * target.warp_size

    def too_many_values(block_n):
        per_thread = block_m * block_n / threads
        loop_limit, epilogue_limit = target.accumulator_values_per_thread, EPILOGUE_VALUES_PER_THREAD
        return per_thread * loop_tiles > loop_limit or per_thread * epilogue_tiles > epilogue_limit

    while target.is_gpu and block_n > 16 and too_many_values(block_n):
        block_n //= 2
    return Variant(
        dtype, n, k, tuple(epilogue), block_m, block_n, tiles.block("BLOCK_K"),
        tiles.block("GROUP_M"), tiles.num_warps, tiles.num_stages, tuple(prologue),
    )


def operands(variant: Variant) -> list[str]:
    """The extra pointer arguments the prologue and epilogue read, in kernel-argument order."""
    ops = [PROLOGUE_OPS[op] for op in variant.prologue] + [EPILOGUE_OPS[op] for op in variant.epilogue]
    return [op.operand for op in ops if op.operand]


def scalars(variant: Variant) -> list[str]:
    """The fp32 runtime arguments (after M) the prologue reads, in kernel-argument order."""
    return [PROLOGUE_OPS[op].scalar for op in variant.prologue if PROLOGUE_OPS[op].scalar]


def render(variant: Variant) -> str:
    return render_kernel(
        KIND, variant, operands=operands(variant), scalars=scalars(variant), prologue=variant.prologue,
        epilogue=variant.epilogue, gate_up=variant.gate_up,
        epilogue_expressions=[EPILOGUE_OPS[op].expression for op in variant.epilogue],
        dot_options=DOT_OPTIONS[variant.dtype],
    )


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    tensor = pointer(variant.dtype)
    extra = {operand: pointer("i32") if operand == "p_rows" else tensor for operand in operands(variant)}
    return {"p_x": tensor, "p_w": tensor, **extra, "p_out": tensor, "M": "i32", **dict.fromkeys(scalars(variant), "fp32")}


def constexprs(variant: Variant) -> dict[str, object]:
    return {
        "N": variant.n, "K": variant.k, "BLOCK_M": variant.block_m, "BLOCK_N": variant.block_n,
        "BLOCK_K": variant.block_k, "GROUP_M": variant.group_m,
    }


def grid(variant: Variant, rows: int) -> tuple[int]:
    """One program per (BLOCK_M, BLOCK_N) output tile of out: [rows, N]."""
    return (triton.cdiv(rows, variant.block_m) * triton.cdiv(variant.n, variant.block_n),)


def launch(
    variant: Variant, x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [R, K] (R = M, or any count with gather_rows); weight: [N, K] ([2N, K] with silu_mul);
    rows: [M] int32 (gather_rows); norm_weight: [K] (norm_weight); eps (rms_norm); bias: [N];
    residual: [M, N] -> out: [M, N]."""
    dtype, n, k = TORCH_DTYPES[variant.dtype], variant.n, variant.k
    count = rows.shape[0] if rows is not None else x.shape[0]
    check_layout("x", x, (x.shape[0], k), (k, 1), dtype)
    check_layout("weight", weight, (2 * n if variant.gate_up else n, k), (k, 1), dtype)
    given = {"p_rows": rows, "p_norm_weight": norm_weight, "p_bias": bias, "p_residual": residual}
    expected = {"p_rows": ((count,), (1,), torch.int32), "p_norm_weight": ((k,), (1,), dtype),
                "p_bias": ((n,), (1,), dtype), "p_residual": ((count, n), (n, 1), dtype)}
    for operand, tensor in given.items():
        if (tensor is not None) != (operand in operands(variant)):
            raise ValueError(f"{variant.cache_key}: {operand[2:]} must be given exactly when the variant uses it")
        if tensor is not None:
            check_layout(operand[2:], tensor, *expected[operand])
    if (eps is not None) != variant.rms_norm:
        raise ValueError(f"{variant.cache_key}: eps must be given exactly when the prologue has rms_norm")
    out = torch.empty(count, n, dtype=dtype, device=x.device) if out is None else out
    check_layout("out", out, (count, n), (n, 1), dtype)
    if count:
        extra = [given[operand] for operand in operands(variant)]
        load(variant).kernel[grid(variant, count)](
            x, weight, *extra, out, count, *([eps] if variant.rms_norm else []), **constexprs(variant),
            num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return out
