"""GGUF block-quantized tensors kept quantized: each kept type's blocks repacked, bit-exactly, into
kiln's layout (kiln/quant.py), so that `repack(t).dequantize()` equals gguf-py's
`gguf.quants.dequantize(t.data, t.tensor_type)`.

Block layouts (gguf-py's quants.py, llama.cpp's ggml-common.h; fp16 fields little-endian) and what
each becomes, per group of the kiln format (w = s * q + z):

  Q4_0  32 elems: d, 16 bytes of nibbles (byte j: elem j low, j+16 high)  -> int4-g32-f16, s = d, z = -8d
  Q4_1  32 elems: d, m, 16 bytes of nibbles as Q4_0                       -> int4-g32-f16, s = d, z = m
  Q5_0  32 elems: d, 4 bytes qh (bit i: elem i's fifth bit), 16 bytes of nibbles as Q4_0
                                                                          -> int8-g32-f16 (q - 16), s = d, z = -0
  Q5_1  32 elems: d, m, qh and nibbles as Q5_0                            -> int8-g32-f16 (q 0..31), s = d, z = m
  Q8_0  32 elems: d, 32 int8                                              -> int8-g32-f16, s = d, z = -0
  Q4_K  256 elems: d, dmin, 12 bytes of 6-bit (sc, m) x 8, 128 bytes of nibbles: 32-byte chunk i holds
        sub-block 2i in its low nibbles and 2i+1 in its high ones (re-packed to kiln's nibble order)
                                                                          -> int4-g32-f32, s = d*sc, z = -dmin*m
  Q5_K  256 elems: d, dmin, 12 bytes of scales as Q4_K, 32 bytes qh (bit b of byte j: sub-block b, elem j),
        128 bytes of low nibbles as Q4_K                                  -> int8-g32-f32 (q 0..31), s, z as Q4_K
  Q6_K  256 elems: 128 bytes ql, 64 bytes qh, 16 int8 scales, d           -> int8-g16-f32 (q - 32), s = d*sc, z = -0

Why this is exact: every product gguf-py forms (d * q, d * sc, dmin * m, (d * sc) * q) needs at most
23 significant bits (an 11-bit fp16 significand times at most 12 more), so it is exact in fp32, as
are kiln's s * q; the one rounding left is the final addition, the same in both. Where gguf-py adds
nothing (Q8_0, Q6_K) z is -0.0, so s * q + z is s * q bit for bit, negative zeros included. The
only difference: Q4_0's d * (q - 8) is -0.0 where d < 0 and q = 8, kiln's s * q + z is +0.0 there
(equal as numbers). Q4_0's z = -8d is fp16, so |d| may be at most 8188 (8 * 8188 is fp16's largest
finite value); `repack` refuses a tensor with a larger d.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kiln.errors import KilnError
from kiln.frontend.checkpoint_gguf import GGUFTensor
from kiln.quant import QuantFormat, QuantizedTensor

# GGUF types kept quantized, and the kiln format each becomes.
KEPT_TYPES: dict[Q, QuantFormat] = {
    Q.Q4_0: QuantFormat("int4", 32, "f16"),
    Q.Q4_1: QuantFormat("int4", 32, "f16"),
    Q.Q5_0: QuantFormat("int8", 32, "f16"),
    Q.Q5_1: QuantFormat("int8", 32, "f16"),
    Q.Q8_0: QuantFormat("int8", 32, "f16"),
    Q.Q4_K: QuantFormat("int4", 32, "f32"),
    Q.Q5_K: QuantFormat("int8", 32, "f32"),
    Q.Q6_K: QuantFormat("int8", 16, "f32"),
}
Q4_0_MAX_D = 8188.0  # the largest |d| whose z = -8d is finite in fp16

# A repacker: blocks uint8 [rows, blocks per row, bytes per block] -> (codes [rows, blocks per row, ...]
# in kiln's qweight dtype and byte order, s [rows, blocks per row, groups per block], z the same shape).
Repacker = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def repack(tensor: GGUFTensor) -> QuantizedTensor:
    """`tensor` (2-D, of a type in KEPT_TYPES; `data` uint8 [rows, bytes per row]) as a
    QuantizedTensor [rows, cols] in the format KEPT_TYPES names, equal to gguf-py's dequantization."""
    if tensor.tensor_type not in KEPT_TYPES or len(tensor.shape) != 2:
        raise KilnError(f"tensor {tensor.name!r} ({tensor.tensor_type.name}, shape {list(tensor.shape)}) is not a "
                        f"2-D tensor of a type kiln keeps quantized ({', '.join(t.name for t in KEPT_TYPES)})")
    rows, cols = tensor.shape
    block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    blocks = tensor.data.reshape(rows, cols // block_size, type_size)
    codes, scale, offset = _REPACKERS[tensor.tensor_type](blocks)
    if tensor.tensor_type == Q.Q4_0 and np.abs(scale).max(initial=0) > Q4_0_MAX_D:
        raise KilnError(f"tensor {tensor.name!r} has a Q4_0 block scale above {Q4_0_MAX_D:g}, whose offset -8d "
                        "fp16 cannot hold: kiln cannot keep it quantized")
    scales = np.stack([scale, offset], axis=-1).reshape(rows, -1, 2)
    return QuantizedTensor(KEPT_TYPES[tensor.tensor_type], torch.from_numpy(codes.reshape(rows, -1)),
                           torch.from_numpy(scales))


def _f16(field: np.ndarray) -> np.ndarray:
    """An fp16 field: uint8 [..., 2] -> float16 [...]."""
    return np.ascontiguousarray(field).view(np.float16)[..., 0]


def _negative_zeros(like: np.ndarray) -> np.ndarray:
    return np.full(like.shape, -0.0, dtype=like.dtype)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks[..., :2])
    with np.errstate(over="ignore"):  # a too large d is refused by `repack`
        offset = d * np.float16(-8)
    return np.ascontiguousarray(blocks[..., 2:]), d[..., None], offset[..., None]


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ascontiguousarray(blocks[..., 4:]), _f16(blocks[..., :2])[..., None], _f16(blocks[..., 2:4])[..., None]


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks[..., :2])[..., None]
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8), d, _negative_zeros(d)


def _five_bit_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 codes 0..31 uint8 [..., 32] from qh [..., 4] (bit i: code i's high bit) and the 16
    bytes of nibbles qs [..., 16] (byte j: code j low, code j + 16 high)."""
    high = (qh.reshape(*qh.shape[:-1], 4, 1) >> np.arange(8, dtype=np.uint8)) & 1  # [..., byte, bit]: code 8*byte+bit
    return np.concatenate([qs & 15, qs >> 4], axis=-1) | (high.reshape(*qh.shape[:-1], 32) << 4)


def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks[..., :2])[..., None]
    codes = _five_bit_codes(blocks[..., 2:6], blocks[..., 6:22]).view(np.int8) - np.int8(16)
    return codes, d, _negative_zeros(d)


def _q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = _five_bit_codes(blocks[..., 4:8], blocks[..., 8:24]).view(np.int8)
    return codes, _f16(blocks[..., :2])[..., None], _f16(blocks[..., 2:4])[..., None]


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: (s, z) fp32 [rows, blocks, 8] from d, dmin (bytes 0-3) and the 12 bytes of 6-bit
    scales and mins (bytes 4-15): bytes 0-3 hold sc[0:4] in their low 6 bits and the top 2 bits of
    sc[4:8]; bytes 4-7 the same for m; bytes 8-11 the low 4 bits of sc[4:8] (low nibble) and m[4:8]."""
    packed = blocks[..., 4:16].reshape(*blocks.shape[:-1], 3, 4)
    low_sc, low_m, high = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([low_sc & 63, (high & 15) | ((low_sc >> 2) & 48)], axis=-1)
    m = np.concatenate([low_m & 63, (high >> 4) | ((low_m >> 2) & 48)], axis=-1)
    d = _f16(blocks[..., 0:2]).astype(np.float32)[..., None]
    dmin = _f16(blocks[..., 2:4]).astype(np.float32)[..., None]
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """128 bytes of Q4_K/Q5_K nibbles [..., 128] (chunk i of 32 bytes: sub-block 2i low, 2i+1 high)
    -> (low, high) uint8 [..., 4, 32], the 4-bit codes of sub-blocks 2i and 2i+1 per chunk i."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return chunks & 15, chunks >> 4


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low, high = _k_nibbles(blocks[..., 16:144])
    # Per 32-code sub-block, kiln's byte j is code j | code j+16 << 4.
    sub_blocks = np.stack([low, high], axis=-2).reshape(*blocks.shape[:-1], 8, 2, 16)
    codes = sub_blocks[..., 0, :] | (sub_blocks[..., 1, :] << 4)
    return codes, *_k_scales(blocks)


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    low, high = _k_nibbles(blocks[..., 48:176])
    nibbles = np.stack([low, high], axis=-2).reshape(*blocks.shape[:-1], 8, 32)
    bits = blocks[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]  # [..., sub-block b, 32]: bit b
    return (nibbles | ((bits & 1) << 4)).view(np.int8), *_k_scales(blocks)


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Element 128h + 64s + j takes nibble s of ql[64h + j] (s = 0, 1) and, as element 128h + 32t + j,
    bits 2t..2t+1 of qh[32h + j] as its top two bits (t = 0..3)."""
    lead = blocks.shape[:-1]
    ql = blocks[..., :128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    codes = ((ql & 15).reshape(*lead, 256) | ((qh & 3) << 4).reshape(*lead, 256)).view(np.int8) - np.int8(32)
    scale = _f16(blocks[..., 208:210]).astype(np.float32)[..., None] * blocks[..., 192:208].view(np.int8)
    return codes, scale, _negative_zeros(scale)


_REPACKERS: dict[Q, Repacker] = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
                                 Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
