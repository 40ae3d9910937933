"""Fixtures of the GPU code generation tests. Without a CUDA GPU, the generated Triton kernels
run under Triton's interpreter: TRITON_INTERPRET is set here, at import time, before anything
imports a kernel module (tests/conftest.py sets it too; this keeps the folder runnable alone)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool only adds synchronisation on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GPU_TARGET_BY_CAPABILITY = {(8, 0): "a100", (8, 9): "l40s", (9, 0): "h100", (10, 0): "b200"}


@pytest.fixture
def device() -> str:
    """Where kernels run: "cuda" when a GPU is present, else "cpu" (interpreted Triton)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def target(device):
    """The kiln target whose tiles the kernels use here: the GPU's own, or `cpu`'s small ones."""
    from kiln.codegen.targets import get_target

    if device == "cpu":
        return get_target("cpu")
    return get_target(GPU_TARGET_BY_CAPABILITY.get(torch.cuda.get_device_capability(), "h100"))


def _check_close(actual: torch.Tensor, exact: torch.Tensor, same_dtype_reference: torch.Tensor, slack: float = 2.0):
    """`actual`'s max error against `exact` (fp64) is at most `slack` times that of a torch
    computation in `actual`'s dtype, plus 4 ulps of the dtype at the largest magnitude."""
    assert actual.shape == exact.shape == same_dtype_reference.shape, (actual.shape, exact.shape)
    exact64 = exact.double().cpu()
    error = (actual.double().cpu() - exact64).abs().max().item()
    reference_error = (same_dtype_reference.double().cpu() - exact64).abs().max().item()
    floor = 4 * torch.finfo(actual.dtype).eps * exact64.abs().max().item()
    assert error <= slack * reference_error + floor, (
        f"{actual.dtype}: error {error:.3g} vs same-dtype torch error {reference_error:.3g} (floor {floor:.3g})"
    )


@pytest.fixture
def check_close():
    return _check_close
