"""Paged KV write and the fused rope + KV write vs naive torch (slot -1 skips a token)."""

import math

import pytest
import torch

from kiln.codegen.kernels import TORCH_DTYPES, kv_write, kv_write_rope
from kiln.codegen.kernels.attention_reference import kv_write_reference, make_paged_step, rope_kv_write_reference
from kiln.errors import KilnError

PAGE_SIZE = 16


def inverse_frequencies(head_dim, theta=100000.0):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def step_inputs(num_heads, num_kv_heads, head_dim, dtype, device, seed):
    """A step of a chunk mid-context, a decode and a whole prompt; tokens 2 and 9 are padding (-1).

    Returns qkv [T, (H + 2*Hkv) * D], the step metadata and random caches (old contents).
    """
    generator = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [5, 1, 7], [3000, 17, 7]  # positions up to 2999: large rope angles
    num_blocks = sum(math.ceil(n / PAGE_SIZE) for n in seq_lens) + 2
    step = make_paged_step(q_lens, seq_lens, PAGE_SIZE, num_blocks, generator, skip_write=[2, 9], device=device)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    cache_shape = (num_blocks, PAGE_SIZE, num_kv_heads, head_dim)
    qkv, k_cache, v_cache = (
        torch.randn(shape, generator=generator).to(TORCH_DTYPES[dtype]).to(device)
        for shape in ((sum(q_lens), width), cache_shape, cache_shape)
    )
    return qkv, step, k_cache, v_cache


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 128)])
def test_kv_write_from_packed_qkv_and_from_contiguous_kv(device, dtype, heads, kv_heads, head_dim):
    qkv, step, k_cache, v_cache = step_inputs(heads, kv_heads, head_dim, dtype, device, seed=head_dim)
    tokens = qkv.shape[0]
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    expected_k, expected_v = kv_write_reference(k, v, step.slot_mapping, k_cache, v_cache)
    for k_in, v_in in ((k, v), (k.contiguous(), v.contiguous())):
        variant = kv_write.choose(dtype=dtype, num_kv_heads=kv_heads, head_dim=head_dim, token_stride=k_in.stride(0))
        k_out, v_out = k_cache.clone(), v_cache.clone()
        kv_write.launch(variant, k_in, v_in, step.slot_mapping, k_out, v_out)
        assert torch.equal(k_out, expected_k) and torch.equal(v_out, expected_v)  # a copy: bit exact


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 128)])
def test_rope_kv_write_matches_reference(device, check_close, dtype, heads, kv_heads, head_dim):
    qkv, step, k_cache, v_cache = step_inputs(heads, kv_heads, head_dim, dtype, device, seed=head_dim + 1)
    inv_freq = inverse_frequencies(head_dim).to(device)
    args = (qkv, step.positions, inv_freq, step.slot_mapping, k_cache, v_cache, heads, kv_heads)
    exact_q, exact_k, _ = rope_kv_write_reference(*args, exact=True)
    same_q, same_k, expected_v = rope_kv_write_reference(*args)
    variant = kv_write_rope.choose(dtype=dtype, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    q_out = kv_write_rope.launch(variant, qkv, step.positions, inv_freq, step.slot_mapping, k_out, v_out)
    check_close(q_out, exact_q, same_q)  # every token's q, padding included
    check_close(k_out, exact_k, same_k)  # written slots rotated, the others untouched
    assert torch.equal(v_out, expected_v)
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=device).view(-1)
    untouched[step.slot_mapping[step.slot_mapping >= 0].long()] = False
    assert torch.equal(k_out.view(-1, kv_heads, head_dim)[untouched], k_cache.view(-1, kv_heads, head_dim)[untouched])


def test_rope_kv_write_needs_an_even_head_dim():
    with pytest.raises(KilnError, match="even head_dim"):
        kv_write_rope.choose(dtype="bf16", num_heads=4, num_kv_heads=2, head_dim=63)


def test_kv_write_rejects_a_cache_of_other_heads(device):
    qkv, step, k_cache, v_cache = step_inputs(9, 3, 64, "fp32", device, seed=0)
    k = torch.zeros(qkv.shape[0], 3, 64, device=device)
    variant = kv_write.choose(dtype="fp32", num_kv_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="k_cache"):
        kv_write.launch(variant, k, k, step.slot_mapping, k_cache.view(-1, PAGE_SIZE, 1, 192), v_cache)


def test_kv_write_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(kv_write, lambda target: [
        kv_write.choose(dtype="bf16", num_kv_heads=3, head_dim=64, token_stride=15 * 64),
        kv_write.choose(dtype="bf16", num_kv_heads=8, head_dim=128),
    ])


def test_rope_kv_write_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(kv_write_rope, lambda target: [
        kv_write_rope.choose(dtype="bf16", num_heads=9, num_kv_heads=3, head_dim=64),
        kv_write_rope.choose(dtype="bf16", num_heads=32, num_kv_heads=8, head_dim=128),
    ])
