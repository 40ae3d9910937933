"""Rows of a quantized embedding table: out[T, D] = dequantize(table)[ids[t]] in the activations'
dtype, for a table [V, D] in a kiln.quant format (the `embedding` op reading a quantized param).

One program per (row t, block of BLOCK_D columns): it reads ids[t], that row's codes (int4: the
byte of each column and its nibble, as in gemm_quant.py) and the (s, z) pair of each column's
group, and stores s * q + z (fp32) cast to out's dtype. Arguments: p_table (the qweight),
p_scales ([V, D / GROUP, 2]), p_ids ([T] int32 or int64), p_out ([T, D]); constexprs D, GROUP,
BLOCK_D. The grid is (T, cdiv(D, BLOCK_D)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import (
    TORCH_DTYPES,
    check_layout,
    compiled_grid,
    gemm_quant,
    load_source,
    next_power_of_2,
    pointer,
    render_kernel,
)
from kiln.codegen.targets import Target
from kiln.quant import QuantFormat, QuantizedTensor

KIND = "embedding_quant"
MAX_BLOCK_D = 1024  # columns a program dequantizes
IDS_POINTERS = {"i32": "*i32:16", "i64": "*i64:16"}


@dataclass(frozen=True)
class Variant:
    dtype: str  # out's (the activations')
    quant: QuantFormat
    d: int  # D columns of the table
    ids: str  # the ids' dtype: "i32" or "i64"
    block_d: int
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        if self.d % self.quant.group:
            raise ValueError(f"a table of {self.d} columns is not a whole number of {self.quant.name} groups")

    @property
    def cache_key(self) -> str:
        return f"{KIND}__{self.dtype}__q{gemm_quant.key(self.quant)}__d{self.d}__{self.ids}__b{self.block_d}__w{self.num_warps}"


def choose(target: Target, *, dtype: str, quant: QuantFormat, d: int, ids: str = "i32") -> Variant:
    """The variant for a [., d] table in `quant` read by `ids`; KilnError where `target` cannot read `quant`."""
    gemm_quant.check_target(quant, target)
    block_d = min(next_power_of_2(d), MAX_BLOCK_D)
    return Variant(dtype, quant, d, ids, block_d, num_warps=4 if block_d >= 512 else 1 + (block_d >= 128))


def render(variant: Variant) -> str:
    fmt = variant.quant
    return render_kernel(KIND, variant, quant=fmt, byte=gemm_quant.byte_index(fmt, "o_d"),
                         shift=gemm_quant.nibble_shift("o_d"), codes=gemm_quant.code_values(fmt, "b_q", "o_shift"),
                         row_bytes="(D // 2)" if fmt.kind == "int4" else "D")


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    return {**dict(zip(("p_table", "p_scales"), gemm_quant.signature(variant.quant).values())),
            "p_ids": IDS_POINTERS[variant.ids], "p_out": pointer(variant.dtype)}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"D": variant.d, "GROUP": variant.quant.group, "BLOCK_D": variant.block_d}


def grid_source(variant: Variant) -> str:
    """One program per row and block of BLOCK_D columns."""
    return f"lambda rows: (rows, {triton.cdiv(variant.d, variant.block_d)})"


def launch(variant: Variant, table: QuantizedTensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table: [V, D] in variant.quant; ids: [T] of variant.ids; out: [T, D] (allocated if None)."""
    qweight, scales = gemm_quant.check_weight(variant.quant, table, table.shape[0], variant.d)
    count = ids.shape[0]
    check_layout("ids", ids, (count,), (1,), {"i32": torch.int32, "i64": torch.int64}[variant.ids])
    out = torch.empty(count, variant.d, dtype=TORCH_DTYPES[variant.dtype], device=ids.device) if out is None else out
    check_layout("out", out, (count, variant.d), (variant.d, 1), TORCH_DTYPES[variant.dtype])
    if count:
        load(variant).kernel[compiled_grid(grid_source(variant))(count)](
            qweight, scales, ids, out, **constexprs(variant), num_warps=variant.num_warps, num_stages=variant.num_stages)
    return out
