"""The cpu target's step-op kernels: C for the ops a step runs outside its quantized linears (rms_norm,
rope, KV-cache writes, silu * mul, decode attention, fp32 linears of a few rows), rendered from
templates/cpu_step_ops.c.j2 and built by gcc into one shared library per ISA variant, as
codegen/cpu_kernels.py builds the quantized linears. runtime/cpu_step_kernels.py loads one and runtime/cpu_ops.py calls it.

At batch 1 these ops are a few hundred elements each: in torch each costs its dispatch and an
OpenMP fork/join (rms_norm on [1, 576]: ~40 us), ~10 ms of a SmolLM2-135M decode step on two cores;
in C, called through ctypes, a few microseconds. The library depends on no model, so every
artifact carries the same one; builds are cached under cpu_kernel_cache_dir() like the quantized kernels'.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kiln.codegen.cpu_kernels import build_library
from kiln.codegen.render import render_template

# The template's constants (its header says what each is). PAR_*: from timings of one thread vs two on
# the dev machine (2-core AMD EPYC, Zen 3, shared): two threads gained nothing on rms_norm below ~32k
# elements, 1.5x from ~64k; silu_mul (an exp per element, ~0.8 ns) 1.5x at 24k elements, little at 12k;
# attention runs ~6-8 ns per query head and key (of 64 channels; SmolLM2's 3 query heads a kv head),
# and 256k products (~4k keys x heads, ~25 us) pay for a fork and join of torch's pool (~5-10 us).
# TILE_KEYS: 32 beat 16 by 20% and tied 64. PAR_LINEAR: a linear reads its weights from memory (~10 GB/s a
# core), 256 KB in ~25 us, several forks' worth. GEMV_COLS: 4096 columns beat 1024 by ~5% and 256 by ~15%
# over SmolLM2's linears at one row of x. LINEAR_KC: at 8 rows of x, 16 rows of w per pass ran SmolLM2's
# linears 1.5-1.9x faster than whole columns of tiles (one panel across all of K's rows and pages), 1.2x
# faster than 48, as fast as oneDNN on weights packed into its layout.
PARAMS = {"par_elems": 1 << 16, "par_exp_elems": 1 << 14, "par_attn": 1 << 18, "tile_keys": 32, "split_keys": 256,
          "par_linear": 1 << 16, "gemv_cols": 4096, "linear_kc": 16}
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", "-fno-math-errno")
LIBRARY_STEM = "step_ops"


def render_step_source() -> str:
    """The C source of the step-op kernels (entry points: the template's header)."""
    return render_template("cpu_step_ops.c.j2", **PARAMS)


def build_step_library(out_dir: Path, variants: Iterable[str] | None = None) -> dict[str, str]:
    """Compiles the step-op kernels into `out_dir/step_ops.<variant>.so` (cpu_kernels.build_library)."""
    return build_library(LIBRARY_STEM, render_step_source(), FLAGS, out_dir, variants)
