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


def _check_close(actual: torch.Tensor, exact: torch.Tensor, same_dtype_reference: torch.Tensor | None = None):
    """Asserts `actual` matches `exact` (an fp32/fp64 reference) within what its dtype allows.

    fp32: tight absolute/relative tolerance. bf16/fp16: the kernel's max error must stay within
    2x (+ one ulp at the largest magnitude) of the error that a torch reference computed in that same dtype makes.
    """
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    actual64, exact64 = actual.double(), exact.double()
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual64, exact64, rtol=2e-5, atol=2e-5)
        return
    assert same_dtype_reference is not None, "low-precision checks need a same-dtype torch reference"
    kernel_error = (actual64 - exact64).abs().max().item()
    reference_error = (same_dtype_reference.double() - exact64).abs().max().item()
    floor = torch.finfo(actual.dtype).eps * exact64.abs().max().item()
    assert kernel_error <= 2 * reference_error + floor, (
        f"kernel error {kernel_error:.3g} vs same-dtype torch error {reference_error:.3g}"
    )


@pytest.fixture
def check_close():
    """The dtype-aware comparison `_check_close(actual, exact, same_dtype_reference=None)`."""
    return _check_close
