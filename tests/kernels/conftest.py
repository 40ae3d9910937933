"""Kernel-tier fixtures. Without a CUDA GPU, Triton kernels run under its interpreter.

TRITON_INTERPRET is set here, at import time, before any kernel module is generated and
imported (Triton decides interpreted vs compiled when `@triton.jit` decorates a function).
Cross-compiling still works in this process: `aot.compile_kernels` moves the work to a worker
process when triton.language itself was imported interpreted.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from kiln.process import apply_interpreter_fixes

    apply_interpreter_fixes()  # bf16 dot and rounding; see kiln/process.py



def _check_close(actual: torch.Tensor, exact: torch.Tensor, same_dtype_reference: torch.Tensor):
    """Asserts `actual` is as close to `exact` (an fp64 reference) as its dtype allows.

    The kernel's max error must stay within 2x the error of a torch reference computed in the
    kernel's dtype, plus a floor of 4 ulps of that dtype at the largest magnitude (for results
    that torch happens to get exactly right while the kernel rounds in another order).
    """
    assert actual.shape == exact.shape == same_dtype_reference.shape, (actual.shape, exact.shape)
    assert actual.dtype == same_dtype_reference.dtype, (actual.dtype, same_dtype_reference.dtype)
    actual64, exact64 = actual.double(), exact.double()
    kernel_error = (actual64 - exact64).abs().max().item()
    reference_error = (same_dtype_reference.double() - exact64).abs().max().item()
    floor = 4 * torch.finfo(actual.dtype).eps * exact64.abs().max().item()
    assert kernel_error <= 2 * reference_error + floor, (
        f"{actual.dtype} kernel error {kernel_error:.3g} vs same-dtype torch error {reference_error:.3g}"
    )


@pytest.fixture
def check_close():
    """The dtype-aware comparison `_check_close(actual, exact, same_dtype_reference)`."""
    return _check_close


def cross_compile_targets() -> list:
    """One GPU target per architecture in the registry (h200 compiles h100's sm_90a code with
    its tiles): what the per-kernel cross-compile tests cover."""
    from kiln.codegen.targets import TARGETS

    by_arch = {}
    for target in TARGETS.values():
        if target.is_gpu:
            by_arch.setdefault(target.arch_name, target)
    return list(by_arch.values())


def _cross_compile(kind_module, make_variants):
    """Compiles `make_variants(target)` for every GPU arch, prints the resource table (-s).

    Asserts each cubin is built for its target's arch (as `cuobjdump -elf` names it), does not
    spill, and fits the target's shared memory per block. Returns the compiled kernels.
    """
    from kiln.codegen.kernels import compile_variants

    requests = [(kind_module, variant, target) for target in cross_compile_targets() for variant in make_variants(target)]
    kernels = compile_variants(requests)
    check_cross_compiled(requests, kernels)
    return kernels


def check_cross_compiled(requests, kernels) -> None:
    """Prints the resource table (-s) of `kernels`, compiled for `requests` ((kind module, variant,
    target) each), and asserts each is its variant built for its target's arch, without spills,
    within the target's shared memory per block."""
    from kiln.codegen.aot import cubin_arch, resource_table

    print("\n" + resource_table(kernels))
    for (_, variant, target), kernel in zip(requests, kernels):
        assert kernel.name == variant.cache_key
        assert cubin_arch(kernel.binary) == target.arch_name, (kernel.name, target.name)
        assert not kernel.resources.spills, (kernel.name, target.name, kernel.resources)
        assert kernel.metadata["shared"] + kernel.resources.shared_bytes <= target.shared_mem_per_block


@pytest.fixture
def cross_compile():
    """`_cross_compile(kind_module, make_variants)`: the per-kernel AOT check for all GPU archs."""
    return _cross_compile
