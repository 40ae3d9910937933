"""A GPU target's answer to fusion's question "can you render this kernel?" (passes/context.py's
KernelCheck): the matcher that would render the candidate body is asked for its reason to refuse.

The compiler passes `kernel_check(target)` into the pipeline, so fusion forms only groups this
target renders; every op alone renders on every target (as a kernel, or as a torch op on the
device when no template takes it), so any spec that runs on the cpu target compiles for every GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.codegen.gpu_match import dequantized_rows_refusal
from kiln.codegen.match_gemm import gemm_refusal
from kiln.codegen.match_rows import rows_refusal
from kiln.codegen.targets import Target
from kiln.ir import Graph


def kernel_refusal(body: Graph, target: Target) -> str | None:
    """Why `target` cannot run `body` as one kernel, or None."""
    if any(n.op == "linear" for n in body.nodes):
        return gemm_refusal(body, target)
    return dequantized_rows_refusal(body) or rows_refusal(body, target)


def kernel_check(target: Target) -> Callable[[Graph], str | None] | None:
    """The kernel check fusion asks for `target` (None for the cpu target: it renders any group,
    op by op)."""
    if not target.is_gpu:
        return None
    return lambda body: kernel_refusal(body, target)
