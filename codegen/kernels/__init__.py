"""Triton kernel templates, one module per kernel kind, and the conventions they share.

Every kind module (rows, gemm, attention_prefill, attention_decode, attention_reduce, gated_delta,
causal_conv1d) defines:
  Variant          frozen dataclass of every variant parameter; `cache_key` names it readably
                   and is also the generated kernel's function name
  choose(target, ...) -> Variant   picks tiles from the target's tables for a given shape
  render(variant) -> str           the generated Triton source (from templates/<kind>.py.j2)
  load(variant) -> module          renders and imports it; `module.kernel` is the kernel
  launch(variant, ...tensors)      computes the grid and runs it (out tensors given or allocated)
  signature(variant), constexprs(variant)   what `aot.compile_kernel` needs to cross-compile it
  grid_source(variant) -> str      its launch grid as the source of a lambda over the step sizes
                   (kiln.runtime.step_support names: cdiv); a step program embeds it, `grid`
                   evaluates it (one definition)
`compile_variants` cross-compiles (kind module, variant, target) triples in one batch.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from kiln.codegen.aot import CompiledKernel, CompileJob, compile_kernels
from kiln.codegen.render import load_kernel_module, render_template
from kiln.codegen.targets import Target
from kiln.contract import DTYPES
from kiln.process import apply_interpreter_fixes
from kiln.runtime import step_support

# kernels name their float dtypes as Triton does ("fp32"); the IR as kiln.contract does ("f32")
KERNEL_DTYPES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
TORCH_DTYPES = {kernel: DTYPES[name] for name, kernel in KERNEL_DTYPES.items()}


def pointer(dtype: str) -> str:
    """AOT signature of a tensor argument: a 16-byte-aligned pointer ("*bf16:16").

    Launchers must honour the alignment: whole tensors are, and so are views whose offset is a
    multiple of 16 bytes (e.g. the q/k/v slices of a packed qkv row of 16-aligned widths).
    """
    return f"*{dtype}:16"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def float_tag(value: float) -> str:
    """12.5 -> "12p5": a float as a cache-key fragment (letters, digits, `_` only)."""
    return f"{value:g}".replace(".", "p").replace("-", "m").replace("+", "")


def row_bucket(width: int) -> str:
    """Tile bucket of a row-wise kernel by its row width (see targets/tiles.py)."""
    if width <= 1024:
        return "narrow"
    return "medium" if width <= 4096 else "wide"


@functools.cache
def compiled_grid(source: str):
    """The grid function of a kind's `grid_source`, as a step program gets it."""
    return eval(source, {"cdiv": step_support.cdiv})


def render_kernel(kind: str, variant, **params) -> str:
    """Renders templates/<kind>.py.j2 with the kernel's name (its cache key) and `params`."""
    return render_template(f"{kind}.py.j2", kernel_name=variant.cache_key, **params)


def load_source(source: str, variant) -> ModuleType:
    """Imports a rendered kernel; an interpreted one (TRITON_INTERPRET=1) gets the interpreter fixes."""
    from triton.runtime.jit import JITFunction

    module = load_kernel_module(source, variant.cache_key)
    if not isinstance(module.kernel, JITFunction):
        apply_interpreter_fixes()
    return module


def compile_variants(requests: list[tuple[ModuleType, object, Target]]) -> list[CompiledKernel]:
    """Cross-compiles (kind module, variant, target) triples, in one batch (see aot.compile_kernels)."""
    jobs = [
        CompileJob(
            kind_module.load(variant).kernel, kind_module.signature(variant), kind_module.constexprs(variant),
            target, variant.num_warps, variant.num_stages,
        )
        for kind_module, variant, target in requests
    ]
    return compile_kernels(jobs)


def check_layout(name: str, tensor: torch.Tensor, shape: tuple, strides: tuple, dtype: torch.dtype) -> None:
    """Asserts a launch argument has the shape, strides and dtype its variant was rendered for.

    Strides of size-1 dimensions are not compared (torch leaves them arbitrary).
    """
    strides_match = all(size == 1 or have == want for size, have, want in zip(shape, tensor.stride(), strides))
    if tuple(tensor.shape) != tuple(shape) or not strides_match or tensor.dtype != dtype:
        raise ValueError(
            f"{name}: expected shape {tuple(shape)}, strides {tuple(strides)}, {dtype}; got "
            f"{tuple(tensor.shape)}, {tuple(tensor.stride())}, {tensor.dtype}"
        )
