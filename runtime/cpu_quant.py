"""Quantized linears and embeddings on the cpu target: the C kernels an artifact carries
(codegen/cpu_kernels.py builds them, one shared library per ISA variant), loaded with ctypes.

`load_quant_library` picks the variant this CPU runs, `bind` ties a QuantizedTensor to its
format's functions once (pointers and argument types precomputed: a step calls ~120 linears, so a
call does little more than allocate the output and enter C), `linear` and `embedding` run them.

Activations: fp32, or for a weight bound with `activation_bits` 16 or 8 (an artifact's
`quant_activations`, int16 by default) and one row of x (a batch-1 decode step), int4 and int8
codes, on AVX2 CPUs: x quantized per block of 32 (kiln.quant.quantize_activations) and multiplied
by the codes with integer dot products. int16 (madd of 16-bit pairs) keeps ~2^-16 of each block's
largest value (relative error ~2e-5, fp32's 1e-7, int8's 6e-3) and on a 2-core AMD EPYC (Zen 1,
whose AVX2 units are 128 bits wide) takes 0.73x the fp32 kernels' time, int8 0.68x (llama.cpp's
scheme: maddubs; it flips SmolLM2's chat answer, as llama.cpp's own Q4_1 run does). From two rows
of x on the fp32 kernels, which reuse each dequantized group across rows, run in every mode.

Threads: the libraries are linked with -fopenmp (DT_NEEDED libgomp.so.1). torch's wheel ships
torch/lib/libgomp.so.1 under that SONAME, so once torch is imported the dynamic loader resolves
the kernels' OpenMP to torch's copy: one libgomp, one thread pool, shared with torch's own
parallel regions. Each call passes torch.get_num_threads() as its parallel region's
num_threads (the thread-local OpenMP default of a thread torch has not set up may differ).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.quant import QuantFormat, QuantizedTensor
from kiln.runtime.cpu_graph import Kernel

# torch's CPU capability -> the library variants it runs, best first ("generic": non-x86 builds)
_VARIANTS_BY_CAPABILITY = {
    "AVX512": ("x86-64-v4", "x86-64-v3", "x86-64-v2"),
    "AVX2": ("x86-64-v3", "x86-64-v2"),
}
_FALLBACK = ("x86-64-v2", "generic")
# From this many rows of x on, `linear` dequantizes blocks of the weight (DEQUANT_BLOCK_BYTES of fp32
# each) and runs torch's fp32 GEMM on them: on a 2-core AMD EPYC (Zen 3) 10-25% faster than the C
# kernels from 128 rows (the dequantization is then a few percent of the GEMM), a tie at 64.
TORCH_GEMM_ROWS = 128
DEQUANT_BLOCK_BYTES = 16 << 20
ACTIVATION_BITS = {"fp32": 32, "int16": 16, "int8": 8}  # an artifact's quant_activations -> bits
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# kiln_quant_linear_<fmt>(x, M, K, N, qweight, scales, bias, y, threads, activation_bits)
_LINEAR_ARGS = (_P, _I64, _I64, _I64, _P, _P, _P, _P, _INT, _INT)
# kiln_quant_rows_<fmt>(qweight, scales, K, V, ids (int32), T, out, threads) -> how many ids are out of [0, V)
_ROWS_ARGS = (_P, _P, _I64, _I64, _P, _I64, _P, _INT)


@dataclass(frozen=True)
class QuantLibrary:
    """One loaded variant of an artifact's kernel library."""

    variant: str
    path: Path
    cdll: ctypes.CDLL


def preferred_variants(capability: str | None = None) -> tuple[str, ...]:
    """The library variants this CPU runs, best first (`capability` defaults to torch's)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return _VARIANTS_BY_CAPABILITY.get(capability, ()) + _FALLBACK


def load_variant(directory: str | Path, files: dict[str, str], what: str) -> tuple[str, Path, ctypes.CDLL]:
    """(variant, path, loaded library) of the best variant this CPU runs of `files` ({variant: path
    relative to `directory`}), the library of `what` ("quantized", "step-op") kernels."""
    for variant in preferred_variants():
        if variant in files:
            path = Path(directory) / files[variant]
            try:
                return variant, path, ctypes.CDLL(str(path))
            except OSError as e:
                raise KilnError(f"cannot load the {what} kernels {path}: {e}") from None
    raise KilnError(f"none of the {what} kernel variants {sorted(files)} runs on this CPU "
                    f"(torch reports {torch.backends.cpu.get_cpu_capability()}): recompile the artifact here")


def load_quant_library(directory: str | Path, files: dict[str, str]) -> QuantLibrary:
    """Loads the best variant this CPU runs of `files` ({variant: path relative to `directory`})."""
    if not files:
        raise KilnError(f"{directory} has quantized weights but no cpu kernels for them: recompile it for the cpu target")
    return QuantLibrary(*load_variant(directory, files, "quantized"))


@dataclass(frozen=True)
class QuantLinear:
    """A quantized weight [N, K] bound to its kernels: what `linear` and `embedding` take.
    `qweight_ptr` and `scales_ptr` are the addresses the C functions read (`qt` keeps them alive);
    `activation_bits` (32, 16 or 8) is passed to every linear call."""

    qt: QuantizedTensor
    n: int
    k: int
    linear_fn: Kernel
    rows_fn: Kernel
    qweight_ptr: int
    scales_ptr: int
    activation_bits: int = 32

    @property
    def format(self) -> QuantFormat:
        return self.qt.format

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


def bind(library: QuantLibrary, qt: QuantizedTensor, activation_bits: int = 32) -> QuantLinear:
    """`qt` (made contiguous) bound to `library`'s functions for its format; `activation_bits` (32,
    16 or 8): see the module docstring."""
    if activation_bits not in ACTIVATION_BITS.values():
        raise KilnError(f"activation_bits is {activation_bits}, not one of {sorted(ACTIVATION_BITS.values())}")
    qt = QuantizedTensor(qt.format, qt.qweight.contiguous(), qt.scales.contiguous())
    suffix = qt.format.name.replace("-", "_")
    try:
        linear_fn = Kernel(library.cdll, f"kiln_quant_linear_{suffix}", _LINEAR_ARGS, None)
        rows_fn = Kernel(library.cdll, f"kiln_quant_rows_{suffix}", _ROWS_ARGS, ctypes.c_int64)
    except AttributeError:
        raise KilnError(f"the artifact's cpu kernels ({library.path}) have no {qt.format.name} functions") from None
    n, k = qt.shape
    return QuantLinear(qt, n, k, linear_fn, rows_fn, qt.qweight.data_ptr(), qt.scales.data_ptr(), activation_bits)


def linear(x: torch.Tensor, w: QuantLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w.T (+ bias [N]) -> [..., N] in x's dtype; the kernel runs in fp32 (bf16/f16
    x are converted first). Equal to x @ w.qt.dequantize().T in fp32 within fp32 rounding; where
    quantized activations apply (module docstring), to x' @ w.qt.dequantize().T, x' the activations
    kiln.quant.quantize_activations(x, w.activation_bits) stand for."""
    if x.dim() == 2 and x.dtype == torch.float32 and bias is None and x.is_contiguous() and x.shape[1] == w.k:
        y = torch.empty((x.shape[0], w.n))  # the fast path: a decode step's linears
        w.linear_fn(x.data_ptr(), x.shape[0], w.k, w.n, w.qweight_ptr, w.scales_ptr, None, y.data_ptr(),
                    torch.get_num_threads(), w.activation_bits)
        return y
    if x.shape[-1] != w.k:
        raise KilnError(f"linear: x has {x.shape[-1]} features, the quantized weight {w.k}")
    x2 = x.reshape(-1, w.k).float().contiguous()
    if bias is not None:
        if bias.numel() != w.n:
            raise KilnError(f"linear: the bias has {bias.numel()} elements, the quantized weight {w.n} rows")
        bias = bias.float().contiguous()
    if x2.shape[0] >= TORCH_GEMM_ROWS:
        y = _dequantized_gemm(x2, w, bias)
    else:
        y = torch.empty((x2.shape[0], w.n))
        w.linear_fn(x2.data_ptr(), x2.shape[0], w.k, w.n, w.qweight_ptr, w.scales_ptr,
                    None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(),
                    w.activation_bits)
    return y.view(*x.shape[:-1], w.n).to(x.dtype)


def _dequantized_gemm(x: torch.Tensor, w: QuantLinear, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32 @ w.T (+ bias) for large M: blocks of weight rows dequantized by the kernels
    (at most DEQUANT_BLOCK_BYTES of fp32 at a time), each multiplied by torch's fp32 GEMM."""
    y = torch.empty((x.shape[0], w.n))
    rows = max(1, DEQUANT_BLOCK_BYTES // (4 * w.k))
    block = torch.empty((min(rows, w.n), w.k))
    for n0 in range(0, w.n, rows):
        ids = torch.arange(n0, min(n0 + rows, w.n), dtype=torch.int32)
        wb = block[:len(ids)]
        w.rows_fn(w.qweight_ptr, w.scales_ptr, w.k, w.n, ids.data_ptr(), len(ids), wb.data_ptr(), torch.get_num_threads())
        if bias is None:
            torch.mm(x, wb.t(), out=y[:, n0:n0 + len(ids)])
        else:
            torch.addmm(bias[n0:n0 + len(ids)], x, wb.t(), out=y[:, n0:n0 + len(ids)])
    return y


def embedding(ids: torch.Tensor, w: QuantLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rows `ids` [T] (any integer dtype) of the table w [V, K], dequantized: [T, K] in `dtype`
    (bit-equal to w.qt.dequantize()[ids] in fp32). An id outside [0, V) raises KilnError."""
    ids = ids.reshape(-1)
    if ids.dtype != torch.int32 or not ids.is_contiguous():
        ids = ids.to(torch.int32).contiguous()
    out = torch.empty((ids.shape[0], w.k), dtype=torch.float32)
    bad = w.rows_fn(w.qweight_ptr, w.scales_ptr, w.k, w.n, ids.data_ptr(), ids.shape[0], out.data_ptr(),
                    torch.get_num_threads())
    if bad:
        raise KilnError(f"embedding: {bad} of the ids {ids.tolist()[:16]} are outside the table's {w.n} rows")
    return out if dtype == torch.float32 else out.to(dtype)
