"""The cpu target's step-op kernels (codegen/cpu_step_kernels.py builds them, one shared library per
ISA variant), loaded with ctypes: rms_norm, rope, KV-cache writes, silu * mul, decode attention and
fp32 linears of a few rows.

`load_step_library` picks the variant this CPU runs; `install` makes runtime/cpu_ops.py call it
(`installed`; None: cpu_ops runs its torch code). Each wrapper checks that its inputs are a case the
kernels run (fp32, the layouts below) and returns None (write_cache: False) when not, for the
caller's torch path; a call does little more than those checks, allocate the output and enter C
(ctypes releases the GIL). Threads: as runtime/cpu_quant.py's kernels, torch's OpenMP pool, the
kernels fork it only for large work (prefill-sized rows, long or many contexts). Each function is
a cpu_graph.Kernel: a CPU step graph records its calls.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.runtime.cpu_graph import Kernel
from kiln.runtime.cpu_quant import load_variant

_F32, _I32, _I64 = torch.float32, torch.int32, torch.int64
# Rows of x from which an fp32 linear runs on torch (MKL/oneDNN GEMM) rather than the C kernel: on the
# dev machine (2-core AMD EPYC, Zen 3), over SmolLM2's linears, the C kernel ran 0.99-1.12x torch's speed
# at 8 rows, 1.04-1.19x at 16, 0.57-0.73x at 32 and 0.44-0.63x from 48 (and beats it ~1.2x at one row).
LINEAR_ROWS = 17
_P, _N, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# name -> (argument types, result type), as the template's header documents them
_SIGNATURES = {
    "kiln_rms_norm": ((_P, _N, _N, _P, _F, _P, _INT), None),
    "kiln_silu_mul": ((_P, _N, _N, _P, _INT), None),
    "kiln_rope": ((_P, _N, _N, _N, _N, _P, _P, _N, _P, _INT), None),
    "kiln_write_rows": ((_P, _N, _N, _N, _P, _P, _N), ctypes.c_int64),
    "kiln_rope_write": ((_P, _P, _P, _N, _N, _N, _N, _N, _N, _N, _P, _P, _N, _P, _P, _P, _N, _P, _INT), ctypes.c_int64),
    "kiln_decode_attention": ((_P, _N, _N, _N, _P, _P, _N, _N, _N, _P, _P, _N, _F, _N, _F, _N, _N, _N, _P, _P, _INT),
                              ctypes.c_int),
    "kiln_linear_f32": ((_P, _N, _N, _N, _P, _P, _P, _INT), ctypes.c_int),
    "kiln_add": ((_P, _P, _N, _P), None),
    "kiln_gather_rows": ((_P, _N, _N, _N, _N, _P, _N, _P), ctypes.c_int64),
    "kiln_slots": ((_P, _N, _P), ctypes.c_int64),
    "kiln_rope_table": ((_P, _N, _P, _N, _F, _P, _P), None),
}


class StepKernels:
    """One loaded variant of the step-op library, its functions' argument types set."""

    def __init__(self, variant: str, path: Path, cdll: ctypes.CDLL):
        self.variant, self.path, self.cdll = variant, path, cdll
        try:
            fns = {name: Kernel(cdll, name, args, result) for name, (args, result) in _SIGNATURES.items()}
            self.replay = cdll.kiln_replay  # kiln_replay(ops, n, threads) -> 0 or the failed op + 1
        except AttributeError as e:
            raise KilnError(f"the step-op kernels {path} lack a function ({e}): recompile the artifact") from None
        self.replay.argtypes, self.replay.restype = (_P, _N, _INT), ctypes.c_int64
        self._rms_norm, self._silu_mul, self._rope = fns["kiln_rms_norm"], fns["kiln_silu_mul"], fns["kiln_rope"]
        self._write_rows, self._attention = fns["kiln_write_rows"], fns["kiln_decode_attention"]
        self._rope_write, self._add, self._gather_rows = fns["kiln_rope_write"], fns["kiln_add"], fns["kiln_gather_rows"]
        self._slots, self._rope_table, self._linear = fns["kiln_slots"], fns["kiln_rope_table"], fns["kiln_linear_f32"]

    # The wrappers check shapes through unpacked .shape / .stride() tuples and cheap predicates: a
    # torch.Size slice or x.stride(i) costs ~0.3 us, several times a predicate, and at batch 1 the
    # checks are a good part of a call (~3 us, the kernel itself well under 1 us). A head stride is
    # only checked where there are several heads (a size-1 axis may have any stride).

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
        """cpu_ops.rms_norm for contiguous fp32 x [..., D] and weight [D] (or None)."""
        if x.dtype is not _F32 or not x.is_contiguous() or (weight is not None and (
                weight.dtype is not _F32 or not weight.is_contiguous())):
            return None
        n, d = x.numel(), x.shape[-1]
        if n == 0 or (weight is not None and weight.numel() != d):
            return None
        y = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), n // d, d, None if weight is None else weight.data_ptr(), eps, y.data_ptr(),
                       torch.get_num_threads())
        return y

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.silu_mul for contiguous fp32 x [M, 2I]."""
        if x.dtype is not _F32 or x.dim() != 2 or not x.is_contiguous():
            return None
        m, i2 = x.shape
        if i2 % 2 or m * i2 == 0:
            return None
        y = x.new_empty(m, i2 // 2)
        self._silu_mul(x.data_ptr(), m, i2 // 2, y.data_ptr(), torch.get_num_threads())
        return y

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.rope for fp32 x [T, H, D] whose tokens' heads are contiguous (a view of a fused
        projection's output: any token stride) and contiguous fp32 cos, sin [T, 1, F]."""
        if (x.dtype is not _F32 or cos.dtype is not _F32 or sin.dtype is not _F32 or x.dim() != 3
                or not cos.is_contiguous() or not sin.is_contiguous()):
            return None
        t, h, d = x.shape
        st, sh, sd = x.stride()
        f = cos.shape[-1]
        if (sh != d and h > 1) or sd != 1 or cos.numel() != t * f or sin.numel() != t * f or 2 * f > d or t * h == 0:
            return None
        y = x.new_empty(t, h, d)
        self._rope(x.data_ptr(), t, h, d, st, cos.data_ptr(), sin.data_ptr(), f, y.data_ptr(), torch.get_num_threads())
        return y

    def write_cache(self, x: torch.Tensor, cache: torch.Tensor, index: torch.Tensor) -> bool:
        """cache [NB, bs, Hkv, D] viewed as [NB * bs, Hkv, D] gets rows index [T] (int64) of x
        [T, Hkv, D], fp32, each token's heads contiguous; False (nothing written) for other cases.
        An index outside the cache raises KilnError."""
        if (x.dtype is not _F32 or cache.dtype is not _F32 or index.dtype is not _I64 or x.dim() != 3
                or cache.dim() != 4 or not cache.is_contiguous() or not index.is_contiguous()):
            return False
        t, h, d = x.shape
        st, sh, sd = x.stride()
        nb, bs, ch, cd = cache.shape
        if ch != h or cd != d or (sh != d and h > 1) or sd != 1 or index.numel() != t:
            return False
        bad = self._write_rows(x.data_ptr(), t, h * d, st, index.data_ptr(), cache.data_ptr(), nb * bs)
        if bad:
            raise KilnError(f"write_cache: {bad} of the slots {index.tolist()[:16]} lie outside the cache's {nb * bs} rows")
        return True

    def rope_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.rope_write for fp32 q [T, H, D], k, v [T, Hkv, D] whose tokens' heads are
        contiguous (any token stride), contiguous fp32 cos, sin [T, 1, F] and caches [NB, bs, Hkv, D],
        int64 index [T]. A slot outside the caches raises KilnError (nothing written)."""
        if (q.dtype is not _F32 or k.dtype is not _F32 or v.dtype is not _F32 or k_cache.dtype is not _F32
                or v_cache.dtype is not _F32 or cos.dtype is not _F32 or sin.dtype is not _F32 or index.dtype is not _I64
                or q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k_cache.dim() != 4 or not k_cache.is_contiguous()
                or not v_cache.is_contiguous() or not cos.is_contiguous() or not sin.is_contiguous()
                or not index.is_contiguous()):
            return None
        t, h, d = q.shape
        tk, hkv, dk = k.shape
        tv, hv, dv = v.shape
        sq, sqh, sqd = q.stride()
        sk, skh, skd = k.stride()
        sv, svh, svd = v.stride()
        nb, bs, ch, cd = k_cache.shape
        f = cos.shape[-1]
        heads_strides = (sqh if h > 1 else d, skh if hkv > 1 else d, svh if hkv > 1 else d)  # any, of one head
        if ((tk, tv, dk, dv, hv, ch, cd, *heads_strides, sqd, skd, svd) != (t, t, d, d, hkv, hkv, d, d, d, d, 1, 1, 1)
                or v_cache.numel() != k_cache.numel() or 2 * f > d or cos.numel() != t * f or sin.numel() != t * f
                or index.numel() != t or t * h == 0):
            return None
        out = q.new_empty(t, h, d)
        bad = self._rope_write(q.data_ptr(), k.data_ptr(), v.data_ptr(), t, h, hkv, d, sq, sk, sv, cos.data_ptr(),
                               sin.data_ptr(), f, index.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), nb * bs,
                               out.data_ptr(), torch.get_num_threads())
        if bad:
            raise KilnError(f"write_cache: {bad} of the slots {index.tolist()[:16]} lie outside the cache's {nb * bs} rows")
        return out

    def rope_write_qkv(self, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                       sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       index: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.rope_write_qkv for fp32 qkv [T, (H + 2 Hkv) D] whose rows are contiguous (any row
        stride), contiguous fp32 cos, sin [T, 1, F] and caches [NB, bs, Hkv, D], int64 index [T]. A
        slot outside the caches raises KilnError (nothing written)."""
        if (qkv.dtype is not _F32 or k_cache.dtype is not _F32 or v_cache.dtype is not _F32 or cos.dtype is not _F32
                or sin.dtype is not _F32 or index.dtype is not _I64 or qkv.dim() != 2 or k_cache.dim() != 4
                or not k_cache.is_contiguous() or not v_cache.is_contiguous() or not cos.is_contiguous()
                or not sin.is_contiguous() or not index.is_contiguous()):
            return None
        t, width = qkv.shape
        st, sd = qkv.stride()
        nb, bs, ch, cd = k_cache.shape
        f = cos.shape[-1]
        if (width != (heads + 2 * kv_heads) * head_dim or sd != 1 or ch != kv_heads or cd != head_dim
                or v_cache.numel() != k_cache.numel() or 2 * f > head_dim or cos.numel() != t * f or sin.numel() != t * f
                or index.numel() != t or t * heads == 0):
            return None
        out = qkv.new_empty(t, heads, head_dim)
        q = qkv.data_ptr()
        k = q + 4 * heads * head_dim
        bad = self._rope_write(q, k, k + 4 * kv_heads * head_dim, t, heads, kv_heads, head_dim, st, st, st,
                               cos.data_ptr(), sin.data_ptr(), f, index.data_ptr(), k_cache.data_ptr(),
                               v_cache.data_ptr(), nb * bs, out.data_ptr(), torch.get_num_threads())
        if bad:
            raise KilnError(f"write_cache: {bad} of the slots {index.tolist()[:16]} lie outside the cache's {nb * bs} rows")
        return out

    def decode_attention(self, q, k_cache, v_cache, seq_lens, block_tables, scale: float, window: int | None,
                         softcap: float | None, layout: tuple[int, int, int] | None,
                         sinks: torch.Tensor | None) -> torch.Tensor | None:
        """cpu_ops.decode_attention for contiguous fp32 q [B, H, D] and caches [NB, bs, Hkv, D],
        contiguous int32 seq_lens [B] and block_tables [B, M], sinks (any float dtype) [H] or None:
        online softmax in fp32 over the keys each query sees, in position order, in pieces of 256
        positions merged in order (split over threads when the work is large; the result does not
        depend on the thread count). A length or a page outside the cache raises KilnError."""
        if (q.dtype is not _F32 or k_cache.dtype is not _F32 or v_cache.dtype is not _F32 or seq_lens.dtype is not _I32
                or block_tables.dtype is not _I32 or q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2
                or not q.is_contiguous() or not k_cache.is_contiguous() or not v_cache.is_contiguous()
                or not seq_lens.is_contiguous() or not block_tables.is_contiguous()):
            return None
        b, h, d = q.shape
        nb, bs, hkv, dk = k_cache.shape
        tb, width = block_tables.shape
        if dk != d or tb != b or seq_lens.numel() != b or v_cache.numel() != k_cache.numel() or h % hkv or b == 0:
            return None
        if sinks is not None:
            sinks = sinks.float().contiguous()
            if sinks.numel() != h:
                return None
        lbs, local, stride = layout or (0, 0, 0)
        out = torch.empty_like(q)
        bad = self._attention(q.data_ptr(), b, h, d, k_cache.data_ptr(), v_cache.data_ptr(), nb, bs, hkv,
                              seq_lens.data_ptr(), block_tables.data_ptr(), width, scale, window or 0, softcap or 0.0,
                              lbs, local, stride, None if sinks is None else sinks.data_ptr(), out.data_ptr(),
                              torch.get_num_threads())
        if bad == -2:
            raise MemoryError("decode_attention: no memory for the kernel's softmax states")
        if bad:
            raise KilnError(f"decode_attention: a sequence length {seq_lens.tolist()[:16]} or a block-table entry "
                            f"lies outside the KV cache ({nb} pages of {bs}, tables of {width})")
        return out

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.add for contiguous fp32 a and b of one shape."""
        if (a.dtype is not _F32 or b.dtype is not _F32 or a.shape != b.shape or not a.is_contiguous()
                or not b.is_contiguous()):
            return None
        y = torch.empty_like(a)
        self._add(a.data_ptr(), b.data_ptr(), a.numel(), y.data_ptr())
        return y

    def linear(self, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """cpu_ops.linear_t for contiguous fp32 x [M, K] (M < LINEAR_ROWS), weight_t [K, N] and bias [N]."""
        if (x.dtype is not _F32 or weight_t.dtype is not _F32 or x.dim() != 2 or not x.is_contiguous()
                or not weight_t.is_contiguous() or weight_t.dim() != 2):
            return None
        m, k = x.shape
        kw, n = weight_t.shape
        if m >= LINEAR_ROWS or k != kw or (bias is not None and (
                bias.dtype is not _F32 or bias.shape != (n,) or not bias.is_contiguous())):
            return None
        y = x.new_empty(m, n)
        if self._linear(x.data_ptr(), m, k, n, weight_t.data_ptr(), None if bias is None else bias.data_ptr(),
                        y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("linear: no memory for the kernel's partial sums")
        return y

    def gather_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """cpu_ops.gather_rows for fp32 x [R, W] (any strides) and contiguous int32 rows [n]."""
        if x.dtype is not _F32 or rows.dtype is not _I32 or x.dim() != 2 or rows.dim() != 1 or not rows.is_contiguous():
            return None
        r, w = x.shape
        row_stride, col_stride = x.stride()
        y = x.new_empty(rows.shape[0], w)
        bad = self._gather_rows(x.data_ptr(), r, w, row_stride, col_stride, rows.data_ptr(), rows.shape[0], y.data_ptr())
        if bad:
            raise KilnError(f"gather_rows: {bad} of the rows {rows.tolist()[:16]} lie outside the {r} rows")
        return y

    def slots(self, slot_mapping: torch.Tensor) -> torch.Tensor | None:
        """slot_mapping (contiguous int32 [T]) as int64 if none is negative (cpu_ops.cache_slots)."""
        if slot_mapping.dtype is not _I32 or slot_mapping.dim() != 1 or not slot_mapping.is_contiguous():
            return None
        out = torch.empty(slot_mapping.shape, dtype=_I64)
        return None if self._slots(slot_mapping.data_ptr(), out.numel(), out.data_ptr()) else out

    def rope_table(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                   factor: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cpu_ops.rope_table in fp32 for contiguous int32 positions [T] and fp32 inv_freq [F]."""
        if (positions.dtype is not _I32 or inv_freq.dtype is not _F32 or positions.dim() != 1
                or not positions.is_contiguous() or not inv_freq.is_contiguous()):
            return None
        t, f = positions.shape[0], inv_freq.shape[-1]
        cos, sin = torch.empty((t, 1, f)), torch.empty((t, 1, f))
        self._rope_table(positions.data_ptr(), t, inv_freq.data_ptr(), f, factor, cos.data_ptr(), sin.data_ptr())
        return cos, sin


installed: StepKernels | None = None


def load_step_library(directory: str | Path, files: dict[str, str]) -> StepKernels:
    """Loads the best variant this CPU runs of `files` ({variant: path relative to `directory`})."""
    return StepKernels(*load_variant(directory, files, "step-op"))


def install(kernels: StepKernels | None) -> None:
    """Makes cpu_ops run its step ops on `kernels` (None: on torch again), process-wide."""
    global installed
    installed = kernels
