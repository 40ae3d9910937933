"""rope vs torch: rotate_half layout, out of place and in place inside a packed qkv row."""

import pytest
import torch

from kiln.codegen.kernels import TORCH_DTYPES
from kiln.codegen.kernels import rope


def inverse_frequencies(head_dim, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def exact_rope(x, positions, inv_freq):
    """The spec: angle = float(position) * inv_freq in fp32; the rotation itself in fp64."""
    angle = (positions.float()[:, None] * inv_freq[None, :]).double()[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def torch_rope(x, positions, inv_freq):
    """The usual same-dtype implementation (Hugging Face Llama): fp32 cos/sin cast to x's dtype."""
    angle = positions.float()[:, None] * inv_freq[None, :]
    embedding = torch.cat([angle, angle], dim=-1)[:, None, :]
    cos, sin = embedding.cos().to(x.dtype), embedding.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def case(tokens, heads, head_dim, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, head_dim, generator=generator).to(TORCH_DTYPES[dtype]).to(device)
    positions = torch.randint(0, 4096, (tokens,), generator=generator, dtype=torch.int32)
    positions[0] = 0
    return x, positions.to(device), inverse_frequencies(head_dim).to(device)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 9, 64), (5, 9, 64), (3, 2, 128), (4, 3, 80)])
def test_out_of_place(device, target, check_close, dtype, tokens, heads, head_dim):
    x, positions, inv_freq = case(tokens, heads, head_dim, dtype, device, seed=heads + tokens)
    x_before = x.clone()
    variant = rope.choose(target, dtype=dtype, heads=heads, head_dim=head_dim, inplace=False)
    out = rope.launch(variant, x, positions, inv_freq)
    assert torch.equal(x, x_before)
    check_close(out, exact_rope(x, positions, inv_freq), torch_rope(x, positions, inv_freq))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_q_and_k_in_place_in_one_launch_inside_packed_qkv(device, target, check_close, dtype):
    """9 q heads and 3 k heads are consecutive in a [T, 15 * D] qkv row: one launch rotates both."""
    tokens, head_dim, rotated_heads = 4, 64, 12
    qkv, positions, inv_freq = case(tokens, 15, head_dim, dtype, device, seed=7)
    qk = qkv[:, :rotated_heads]
    qk_before, v_before = qk.clone(), qkv[:, rotated_heads:].clone()
    variant = rope.choose(
        target, dtype=dtype, heads=rotated_heads, head_dim=head_dim, inplace=True, x_stride=15 * head_dim
    )
    assert rope.launch(variant, qk, positions, inv_freq) is qk
    check_close(qk, exact_rope(qk_before, positions, inv_freq), torch_rope(qk_before, positions, inv_freq))
    assert torch.equal(qkv[:, rotated_heads:], v_before)


def test_odd_head_dim_is_a_user_error(target):
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="even head_dim"):
        rope.choose(target, dtype="bf16", heads=4, head_dim=63, inplace=True)


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(
        rope,
        lambda target: [
            rope.choose(target, dtype="bf16", heads=12, head_dim=64, inplace=True, x_stride=15 * 64),
            rope.choose(target, dtype="bf16", heads=32, head_dim=128, inplace=False),
        ],
    )
