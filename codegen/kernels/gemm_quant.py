"""Quantized weights in the GEMM template (codegen/kernels/gemm.py): W [S*N, K] read as the codes
and group scales of a kiln.quant format (`Variant.quant`), dequantized per K block in the main loop.

Kernel arguments: p_w is the qweight, in kiln/quant.py's layout: int8 [S*N, K] (`*i8`), int4
uint8 [S*N, K/2] (`*u8`, two codes a byte), fp8e4m3 uint8 [S*N, K] (`*u8`, the e4m3fn bits);
p_wscales, right after it, the scales [S*N, K/GROUP, 2] of (s, z) pairs (`*fp16` or `*fp32`).
GROUP is a constexpr. Per K block (elements k = i_k*BLOCK_K + o_k, masked at K) and column slice:
  codes   int8: the byte. int4: byte (k // G) * (G/2) + k % (G/2) of the row, its low nibble
          when k % G < G/2, else its high one (kiln.quant's per-group order); each byte is loaded
          for both of its elements (the second load hits L1: DRAM traffic is K/2 bytes a row).
          fp8e4m3: the byte bit-cast to float8e4nv, converted in hardware (`Target.fp8`).
  scales  per channel (G = K): one (s, z) per column, loaded before the loop; G a multiple of
          BLOCK_K: one per column per K block; BLOCK_K a multiple of G: [BLOCK_K/G, BLOCK_N]
          pairs, broadcast over their groups' rows (`_scale_case`; a per-element gather was
          pipelined through shared memory: 240 KB at 64x128x64 on sm_80).
  w       s * q + z in fp32, cast to x's dtype: the [BLOCK_K, BLOCK_N] operand of tl.dot.
The rest of the kernel (prologue, epilogue, bias, split-K) does not see the difference.

BLOCK_K: a power of two (>= 16, tl.dot's least K) such that G is a multiple of it or it is a
multiple of G, unless the format is per channel (any BLOCK_K); `fit_block_k` takes the widest
such one up to the tile table's, so a group of 32 keeps the decode tiles' BLOCK_K 128 (four
groups a block, scales gathered) and a group of 128 the small/large tiles' 64 (half a group).
A group that is neither a power of two nor a multiple of 16 (24, 40) fits no BLOCK_K: refused.
"""

from __future__ import annotations

import torch

from kiln.codegen.targets import Target, fp8_targets
from kiln.errors import KilnError
from kiln.quant import QuantFormat, QuantizedTensor

MIN_BLOCK_K = 16  # tl.dot's least K
CODE_POINTERS = {"int4": "*u8:16", "int8": "*i8:16", "fp8e4m3": "*u8:16"}
SCALE_POINTERS = {"f16": "*fp16:16", "f32": "*fp32:16"}


def per_channel(fmt: QuantFormat, k: int) -> bool:
    return fmt.group == k


def block_k_fits(fmt: QuantFormat, k: int, block_k: int) -> bool:
    """Whether K blocks of `block_k` align with `fmt`'s groups (see the module docstring)."""
    return per_channel(fmt, k) or fmt.group % block_k == 0 or block_k % fmt.group == 0


def fit_block_k(fmt: QuantFormat, k: int, block_k: int) -> int:
    """The widest BLOCK_K <= `block_k` (a power of two) that fits `fmt`'s groups."""
    width = block_k
    while width >= MIN_BLOCK_K and not block_k_fits(fmt, k, width):
        width //= 2
    if width < MIN_BLOCK_K:
        raise ValueError(f"a {fmt.name} weight: no K block of {MIN_BLOCK_K}..{block_k} (a power of two) "
                         f"holds whole groups of {fmt.group} or lies within one")
    return width


def check(fmt: QuantFormat, k: int, block_k: int) -> None:
    """ValueError unless a [., K] weight in `fmt` can be read in K blocks of `block_k`."""
    if k % fmt.group:
        raise ValueError(f"K={k} is not a whole number of {fmt.name} groups")
    if not block_k_fits(fmt, k, block_k):
        raise ValueError(f"BLOCK_K {block_k} neither holds whole groups of {fmt.group} nor lies within one")


def check_target(fmt: QuantFormat, target: Target) -> None:
    """KilnError if `target` cannot read `fmt` (fp8e4m3 needs `Target.fp8`)."""
    if fmt.kind == "fp8e4m3" and target.is_gpu and not target.fp8:
        raise KilnError(f"fp8e4m3 weights need a GPU that converts float8 e4m3 in hardware, which target "
                        f"{target.name} ({target.arch_name}) lacks; targets that have it: {', '.join(fp8_targets())}. "
                        "Quantize to int8 or int4 for this target")


def key(fmt: QuantFormat) -> str:
    """The format in a kernel name ("int4_g32_f16")."""
    return fmt.name.replace("-", "_")


def _scale_case(fmt: QuantFormat, k: int, block_k: int) -> str:
    """"channel" (G = K), "block" (one group per K block) or "gather" (several per K block)."""
    if per_channel(fmt, k):
        return "channel"
    return "block" if fmt.group % block_k == 0 else "gather"


def byte_index(fmt: QuantFormat, k: str) -> str:
    """The Triton expression of the byte (in its row) that holds element `k` (an int tensor)."""
    if fmt.kind != "int4":
        return k
    return f"({k} // GROUP) * (GROUP // 2) + {k} % (GROUP // 2)"


def nibble_shift(k: str) -> str:
    """int4: the shift of element `k`'s nibble in its byte (0: low, 4: high), as uint8."""
    return f"(({k} // (GROUP // 2)) % 2 * 4).to(tl.uint8)"


def code_values(fmt: QuantFormat, loaded: str, shift: str) -> str:
    """fp32 q from the `loaded` bytes (int4: and the `shift` of each element's nibble)."""
    return {"int4": f"(({loaded} >> {shift}) & 15).to(tl.float32)", "int8": f"{loaded}.to(tl.float32)",
            "fp8e4m3": f"{loaded}.to(tl.float8e4nv, bitcast=True).to(tl.float32)"}[fmt.kind]


def signature(fmt: QuantFormat) -> dict[str, str]:
    """p_w and p_wscales' AOT types."""
    return {"p_w": CODE_POINTERS[fmt.kind], "p_wscales": SCALE_POINTERS[fmt.scale_dtype]}


def render_params(fmt: QuantFormat, k: int, block_k: int, slices: int) -> dict:
    """The template's quantized-weight lines: `quant_setup` (before the K loop), `quant_block`
    (at the top of each K block) and `quant_slices` (per column slice j: lines that leave its
    dequantized [BLOCK_K, BLOCK_N] tile in b_w)."""
    row_bytes = "(K // 2)" if fmt.kind == "int4" else "K"
    case = _scale_case(fmt, k, block_k)
    setup = [f"o_wrow = (o_n % N).to(tl.int64)  # W rows of slice 0; codes {row_bytes} bytes a row"]
    block = ["o_kq = i_k * BLOCK_K + o_k  # the K block's elements"]
    block.append(f"o_kb = {byte_index(fmt, 'o_kq')}  # the byte of each element")
    if fmt.kind == "int4":
        block.append(f"o_shift = {nibble_shift('o_kq')}  # its nibble: low, then high")
    if case == "block":
        block.append("i_group = (i_k * BLOCK_K) // GROUP  # the K block lies within one group")
    elif case == "gather":
        block.append("o_group = i_k * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)  # the block's groups")
    decode = code_values(fmt, "b_q", "o_shift[:, None]")
    slice_lines = []
    for j in range(slices):
        rows = f"(o_wrow + {j} * N)" if j else "o_wrow"
        setup += [f"p_wq{j} = p_w + {rows}[None, :] * {row_bytes}",
                  f"p_ws{j} = p_wscales + {rows}[None, :] * (K // GROUP * 2)"]
        if case == "channel":
            setup += [f"b_s{j} = tl.load(p_ws{j}).to(tl.float32)", f"b_z{j} = tl.load(p_ws{j} + 1).to(tl.float32)"]
            scales = f"b_s{j}", f"b_z{j}"
            loads = []
        elif case == "block":
            loads = [f"b_s = tl.load(p_ws{j} + 2 * i_group).to(tl.float32)",
                     f"b_z = tl.load(p_ws{j} + 2 * i_group + 1).to(tl.float32)"]
            scales = "b_s", "b_z"
        else:  # [BLOCK_K // GROUP, BLOCK_N] pairs, each repeated over its group's GROUP rows
            at = f"p_ws{j} + 2 * o_group[:, None]"
            mask = "mask=o_group[:, None] < K // GROUP, other=0.0"
            loads = [f"b_s = tl.load({at}, {mask}).to(tl.float32)", f"b_z = tl.load({at} + 1, {mask}).to(tl.float32)",
                     *(f"{v} = tl.reshape(tl.broadcast_to({v}[:, None, :], (BLOCK_K // GROUP, GROUP, BLOCK_N)), "
                       "(BLOCK_K, BLOCK_N))" for v in ("b_s", "b_z"))]
            scales = "b_s", "b_z"
        slice_lines.append([
            f"b_q = tl.load(p_wq{j} + o_kb[:, None], mask=mask_k[:, None], other=0)",
            f"b_q = {decode}",
            *loads,
            f"b_w = (b_q * {scales[0]} + {scales[1]}).to(p_x.dtype.element_ty)",
        ])
    return dict(quant_setup=setup, quant_block=block, quant_slices=slice_lines)


def check_weight(fmt: QuantFormat, weight, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of `weight`, a QuantizedTensor in `fmt` of logical shape [rows, k],
    contiguous; ValueError otherwise."""
    if not isinstance(weight, QuantizedTensor) or weight.format != fmt or tuple(weight.shape) != (rows, k):
        found = f"{weight.format.name} {tuple(weight.shape)}" if isinstance(weight, QuantizedTensor) else type(weight)
        raise ValueError(f"weight: expected a {fmt.name} QuantizedTensor of shape {(rows, k)}, got {found}")
    if not (weight.qweight.is_contiguous() and weight.scales.is_contiguous()):
        raise ValueError("weight: qweight and scales must be contiguous")
    return weight.qweight, weight.scales
