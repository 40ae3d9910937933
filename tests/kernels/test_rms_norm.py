"""rms_norm vs torch: rows with and without the fused residual add, and per-head q/k norm."""

import pytest
import torch

from kiln.codegen.kernels import TORCH_DTYPES
from kiln.codegen.kernels import rms_norm

EPS = 1e-6


def exact_rms_norm(h, weight):
    h, weight = h.double(), weight.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight


def torch_rms_norm(h, weight):
    """The usual same-dtype implementation (Hugging Face Llama): fp32 statistics, dtype product."""
    h32 = h.float()
    return weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


def random(shape, dtype, device, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(TORCH_DTYPES[dtype]).to(device)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, tokens", [(64, 1), (100, 3), (128, 2), (1100, 2)])
def test_rows(device, target, check_close, dtype, dim, tokens):
    x, weight = random((tokens, dim), dtype, device, 0), random((dim,), dtype, device, 1)
    out = rms_norm.launch(rms_norm.choose(target, dtype=dtype, dim=dim), x, weight, EPS)
    check_close(out, exact_rms_norm(x, weight), torch_rms_norm(x, weight))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, tokens", [(64, 1), (100, 3)])
def test_fused_residual_add(device, target, check_close, dtype, dim, tokens):
    x, residual = random((tokens, dim), dtype, device, 2), 4 * random((tokens, dim), dtype, device, 3)
    weight = random((dim,), dtype, device, 4)
    variant = rms_norm.choose(target, dtype=dtype, dim=dim, residual=True)
    expected_h = x + residual  # torch adds in the activation dtype too: one rounding of the exact sum
    out, h = rms_norm.launch(variant, x, weight, EPS, residual=residual, residual_out=residual)
    assert torch.equal(h, expected_h)
    check_close(out, exact_rms_norm(expected_h, weight), torch_rms_norm(expected_h, weight))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_per_head_norm_in_place_inside_packed_qkv(device, target, check_close, dtype, head_dim):
    """Qwen3's q-norm: 9 q heads of a packed [T, (9 + 2 * 3) * D] qkv row, normalized in place."""
    tokens, heads, row = 3, 9, 15 * head_dim
    qkv = random((tokens, row), dtype, device, 5)
    original = qkv.clone()
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    weight = random((head_dim,), dtype, device, 6)
    variant = rms_norm.choose(target, dtype=dtype, dim=head_dim, heads=heads, x_stride=row, out_stride=row)
    q_before = q.clone()
    assert rms_norm.launch(variant, q, weight, EPS, out=q) is q
    check_close(q, exact_rms_norm(q_before, weight), torch_rms_norm(q_before, weight))
    assert torch.equal(qkv[:, heads * head_dim :], original[:, heads * head_dim :])  # k, v untouched


def test_residual_must_match_the_variant(device, target):
    x, weight = torch.zeros(2, 64, device=device), torch.ones(64, device=device)
    with pytest.raises(ValueError, match="residual"):
        rms_norm.launch(rms_norm.choose(target, dtype="fp32", dim=64), x, weight, EPS, residual=x)


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(
        rms_norm,
        lambda target: [
            rms_norm.choose(target, dtype="bf16", dim=576, residual=True),
            rms_norm.choose(target, dtype="bf16", dim=4096),
            rms_norm.choose(target, dtype="bf16", dim=128, heads=32, x_stride=48 * 128, out_stride=48 * 128),
        ],
    )
