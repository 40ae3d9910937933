"""silu_mul vs torch: out = silu(gate) * up over a packed [T, 2N] input."""

import pytest
import torch
import torch.nn.functional as F

from kiln.codegen.kernels import TORCH_DTYPES
from kiln.codegen.kernels import silu_mul

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("width, tokens", [(64, 1), (70, 4), (128, 3)])
def test_matches_torch(device, target, check_close, dtype, width, tokens):
    generator = torch.Generator().manual_seed(width + tokens)
    x = (4 * torch.randn(tokens, 2 * width, generator=generator)).to(TORCH_DTYPES[dtype]).to(device)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # silu's saturated tails and its zero
    out = silu_mul.launch(silu_mul.choose(target, dtype=dtype, dim=width), x)
    gate, up = x[:, :width], x[:, width:]
    check_close(out, F.silu(gate.double()) * up.double(), F.silu(gate) * up)


def test_writes_into_a_given_out(device, target):
    x = torch.randn(2, 2 * 64, device=device)
    out = torch.empty(2, 64, device=device)
    assert silu_mul.launch(silu_mul.choose(target, dtype="fp32", dim=64), x, out=out) is out
    torch.testing.assert_close(out, F.silu(x[:, :64]) * x[:, 64:])


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(silu_mul, lambda target: [silu_mul.choose(target, dtype="bf16", dim=1536)])
