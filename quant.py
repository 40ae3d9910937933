"""Quantized weights as a layout: what the compiler, the artifact and every target's kernels agree
on, importable without the compiler (torch only).

A linear weight [N, K] (or an embedding table [V, D]: N rows of K) is stored quantized along K in
groups of `group` consecutive elements, each group with its own scale s and offset z:

    w[n, k] = s[n, k // group] * q[n, k] + z[n, k // group]      (computed in fp32)

`QuantFormat.kind` says what q is:
  int4     unsigned 4-bit codes 0..15, two per byte. Within each group of g elements, byte j
           holds element j in its low nibble and element j + g/2 in its high nibble (GGUF's
           Q4_0/Q4_1 order): `qweight` is uint8 [N, K/2].
  int8     signed 8-bit codes -128..127: `qweight` is int8 [N, K].
  fp8e4m3  float8 e4m3 values (q is their value; z is 0): `qweight` is uint8 [N, K] holding the bits.
`scales` is [N, K/group, 2] of `scale_dtype`: the (s, z) pair of each group, interleaved so that a
kernel reads one stream. f16 pairs hold GGUF's Q4_0/Q4_1/Q8_0 exactly; K-quants' products of a
super-block scale and a 6-bit sub-block scale need f32.

Every GGUF type kiln keeps quantized maps onto these bit-exactly (frontend/gguf_quant.py);
`kiln compile --quant` rounds fp weights to the nearest code (`quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kiln.errors import KilnError

KINDS = ("int4", "int8", "fp8e4m3")
SCALE_DTYPES = {"f16": torch.float16, "f32": torch.float32}
# The component tensors of quantized weight `name` in weights.safetensors
QWEIGHT_SUFFIX, SCALES_SUFFIX = ".qweight", ".qscales"


@dataclass(frozen=True)
class QuantFormat:
    """How one weight is quantized (see the module docstring). `group` divides K and is even."""

    kind: str
    group: int
    scale_dtype: str = "f32"

    def __post_init__(self):
        if self.kind not in KINDS or self.scale_dtype not in SCALE_DTYPES or self.group < 2 or self.group % 2:
            raise KilnError(f"not a quantization format kiln knows: {self}")

    @property
    def name(self) -> str:
        """E.g. "int4-g32-f16": also the suffix of the kernels that read it."""
        return f"{self.kind}-g{self.group}-{self.scale_dtype}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> QuantFormat:
        """The inverse of `name`."""
        try:
            kind, group, scale_dtype = name.split("-")
            return cls(kind, int(group.removeprefix("g")), scale_dtype)
        except (ValueError, TypeError):
            raise KilnError(f"{name!r} names no quantization format (like 'int4-g32-f16')") from None

    def codes_per_byte(self) -> int:
        return 2 if self.kind == "int4" else 1

    def storage(self, rows: int, cols: int) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype]:
        """(qweight shape, dtype, scales shape, dtype) of a [rows, cols] weight in this format."""
        if cols % self.group:
            raise KilnError(f"a weight of {cols} columns cannot be quantized in groups of {self.group}")
        qdtype = torch.int8 if self.kind == "int8" else torch.uint8
        return ((rows, cols // self.codes_per_byte()), qdtype,
                (rows, cols // self.group, 2), SCALE_DTYPES[self.scale_dtype])

    def bytes_per_weight(self) -> float:
        return 1 / self.codes_per_byte() + 2 * SCALE_DTYPES[self.scale_dtype].itemsize / self.group


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight of logical shape [rows, cols] in `format`: `qweight` and `scales` as the module
    docstring lays them out. Rows (output features) can be sliced and concatenated freely."""

    format: QuantFormat
    qweight: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self):
        rows = self.qweight.shape[0]
        cols = self.qweight.shape[1] * self.format.codes_per_byte()
        qshape, qdtype, sshape, sdtype = self.format.storage(rows, cols)
        if (tuple(self.qweight.shape), self.qweight.dtype, tuple(self.scales.shape), self.scales.dtype) != (
                qshape, qdtype, sshape, sdtype):
            raise KilnError(f"a {self.format.name} weight of shape [{rows}, {cols}] is stored as {qdtype} {qshape} "
                            f"and {sdtype} {sshape}, not {self.qweight.dtype} {tuple(self.qweight.shape)} and "
                            f"{self.scales.dtype} {tuple(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * self.format.codes_per_byte()

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def rows(self, index: torch.Tensor | slice) -> QuantizedTensor:
        """The rows `index` (a slice, or a 1-D index tensor), still quantized."""
        return QuantizedTensor(self.format, self.qweight[index], self.scales[index])

    def codes(self) -> torch.Tensor:
        """q as fp32 [rows, cols] (the fp8 values for fp8e4m3)."""
        rows, cols = self.shape
        if self.format.kind == "int4":
            grouped = self.qweight.view(rows, cols // self.format.group, self.format.group // 2)
            return torch.cat([grouped & 15, grouped >> 4], dim=-1).reshape(rows, cols).float()
        if self.format.kind == "fp8e4m3":
            return self.qweight.view(torch.float8_e4m3fn).float()
        return self.qweight.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [rows, cols]: s * q + z in fp32 (the reference every kernel is tested against)."""
        rows, cols = self.shape
        scale, offset = self.scales.float().unbind(-1)
        q = self.codes().view(rows, cols // self.format.group, self.format.group)
        return (q * scale[..., None] + offset[..., None]).reshape(rows, cols).to(dtype)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of weight `name` (`from_tensors` reads them back)."""
        return {name + QWEIGHT_SUFFIX: self.qweight.contiguous(), name + SCALES_SUFFIX: self.scales.contiguous()}

    @classmethod
    def from_tensors(cls, format: QuantFormat, name: str, tensors) -> QuantizedTensor:
        return cls(format, tensors[name + QWEIGHT_SUFFIX], tensors[name + SCALES_SUFFIX])

    @classmethod
    def cat(cls, parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Rows of `parts` stacked (packing q/k/v or gate/up): their formats must agree."""
        if len({p.format for p in parts}) > 1:
            raise KilnError(f"cannot pack weights of different formats ({', '.join(p.format.name for p in parts)})")
        return cls(parts[0].format, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))


Weight = torch.Tensor | QuantizedTensor  # a weight as the compiler and the executors hold it


def stored_tensors(weights: Mapping[str, Weight]) -> dict[str, torch.Tensor]:
    """`weights` as weights.safetensors holds them: each quantized one as its two entries."""
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        out.update(value.to_tensors(name) if isinstance(value, QuantizedTensor) else {name: value})
    return out


def assemble_weights(tensors: Mapping[str, torch.Tensor], formats: Mapping[str, str]) -> dict[str, Weight]:
    """The inverse of `stored_tensors`: `formats` (weight name -> format name, the manifest's
    `quantized_weights`) names the weights whose two entries become one QuantizedTensor."""
    parts = {name + suffix for name in formats for suffix in (QWEIGHT_SUFFIX, SCALES_SUFFIX)}
    weights: dict[str, Weight] = {name: value for name, value in tensors.items() if name not in parts}
    for name, format in formats.items():
        weights[name] = QuantizedTensor.from_tensors(QuantFormat.parse(format), name, tensors)
    return weights

FP8_MAX = 448.0  # largest finite float8 e4m3 (fn) value


def quantize(weight: torch.Tensor, format: QuantFormat) -> QuantizedTensor:
    """Round-to-nearest quantization of `weight` [rows, cols]: int4 asymmetric per group (z is the
    group's minimum, s spans it to the maximum), int8 symmetric per group (s = max|w| / 127, z = 0),
    fp8e4m3 per group scaled so that max|w| maps to 448 (z = 0)."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // format.group, format.group)
    if format.kind == "int4":
        low, high = w.amin(-1), w.amax(-1)
        scale, offset = _stored((high - low) / 15, format), _stored(low, format)
        q = ((w - offset[..., None]) / scale.clamp_min(1e-30)[..., None]).round().clamp(0, 15).to(torch.uint8)
        half = format.group // 2
        qweight = (q[..., :half] | (q[..., half:] << 4)).reshape(rows, cols // 2)
    else:
        top = FP8_MAX if format.kind == "fp8e4m3" else 127
        scale = _stored(w.abs().amax(-1) / top, format)
        offset = torch.zeros_like(scale)
        scaled = w / scale.clamp_min(1e-30)[..., None]
        if format.kind == "int8":
            qweight = scaled.round().clamp(-128, 127).to(torch.int8).reshape(rows, cols)
        else:
            qweight = scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(rows, cols)
    scales = torch.stack([scale, offset], dim=-1).to(SCALE_DTYPES[format.scale_dtype])
    return QuantizedTensor(format, qweight.contiguous(), scales.contiguous())


def _stored(value: torch.Tensor, format: QuantFormat) -> torch.Tensor:
    """`value` rounded to the scale dtype (codes are chosen against the scales as stored)."""
    return value.to(SCALE_DTYPES[format.scale_dtype]).float()


ACTIVATION_BLOCK = 32  # elements of x per scale (the cpu kernels' quantized-activation paths)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 (K a multiple of ACTIVATION_BLOCK) as the cpu kernels quantize activations to
    `bits` (8 or 16): per block of 32, amax = max |x|, top = 2^(bits-1) - 1, d = amax / top and
    q = rint(x * (top / amax)) (q = 0 where amax is 0), each step one fp32 operation. Returns
    (q int8 or int16 [M, K], d fp32 [M, K / 32]); the kernels multiply the weights by q * d."""
    rows, cols = x.shape
    if cols % ACTIVATION_BLOCK:
        raise KilnError(f"activations of {cols} features are quantized in blocks of {ACTIVATION_BLOCK}")
    if bits not in (8, 16):
        raise KilnError(f"activations are quantized to 8 or 16 bits, not {bits}")
    top = float(2 ** (bits - 1) - 1)
    blocks = x.float().reshape(rows, cols // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse).to(torch.int8 if bits == 8 else torch.int16).reshape(rows, cols)
    return q, (amax / top).reshape(rows, cols // ACTIVATION_BLOCK)
