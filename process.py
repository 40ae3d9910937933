"""The process-wide settings kiln changes, in one place.

Triton's interpreter (TRITON_INTERPRET=1) runs GPU kernels on a CPU: `enable_interpreter` switches
it on (it must precede the first import of triton), `apply_interpreter_fixes` patches two of its
bf16 paths to agree with the GPU:
- `tl.dot` hands bf16 bits to numpy.matmul as integers, so any bf16 dot returns garbage. The
  fix widens bf16 operands to fp32 first, which is what the GPU's bf16 MMA computes too (exact
  products, fp32 sums).
- `x.to(tl.bfloat16)` from fp32 truncates, where the GPU rounds to nearest even. The fix rounds
  to nearest even.
`apply_interpreter_fixes` is idempotent and changes nothing for compiled (GPU) kernels.

`cache_dir` names the directories kiln caches in ($KILN_CACHE_DIR, else ~/.cache/kiln).
"""

import os
import sys
from pathlib import Path

import numpy as np

from kiln.errors import KilnError


def cache_dir(name: str) -> Path:
    """kiln's cache `name` (kernels, cpu_kernels, artifacts, models, ptxas, ...): $KILN_CACHE_DIR/<name>,
    else ~/.cache/kiln/<name>."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / name


def enable_interpreter() -> None:
    """Sets TRITON_INTERPRET=1 before triton is imported; refuses if it was imported without it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise KilnError("interpreting Triton kernels needs TRITON_INTERPRET=1 before triton is imported; "
                        "run with the environment variable TRITON_INTERPRET=1 set")
    os.environ["TRITON_INTERPRET"] = "1"


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, as raw uint16 bits (NaN stays a quiet NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def apply_interpreter_fixes() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "kiln_fixes_applied", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.kiln_fixes_applied = True
