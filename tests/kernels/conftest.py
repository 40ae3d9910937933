"""Kernel-tier fixtures. Without a CUDA GPU, Triton kernels run under its interpreter.

TRITON_INTERPRET is set here, at import time, before any kernel module is generated and
imported (Triton decides interpreted vs compiled when `@triton.jit` decorates a function).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

GPU_TARGET_BY_CAPABILITY = {(8, 0): "a100", (8, 9): "l40s", (9, 0): "h100", (10, 0): "b200"}


@pytest.fixture
def device() -> str:
    """Where kernel tests run: "cuda" when a GPU is present, else "cpu" (interpreted Triton)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def target(device):
    """The kiln target whose tile tables the kernels use here: the GPU's own, or `cpu`."""
    from kiln.codegen.targets import get_target

    if device == "cpu":
        return get_target("cpu")
    capability = torch.cuda.get_device_capability()
    return get_target(GPU_TARGET_BY_CAPABILITY.get(capability, "h100"))


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
