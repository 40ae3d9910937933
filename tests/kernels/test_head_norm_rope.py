"""head_norm_rope (Qwen3's per-head q/k norm, rope, and for k the KV write) vs torch: the q
heads into a buffer, the k heads and v into paged caches (slot -1 writes nothing)."""

import pytest
import torch

from kiln.codegen.kernels import TORCH_DTYPES, head_norm_rope
from kiln.codegen.kernels.attention_reference import kv_write_reference, make_paged_step, rope_reference
from kiln.errors import KilnError

EPS = 1e-6
PAGE_SIZE = 16
HEADS, KV_HEADS = 8, 2


def norm_rope(x, weight, positions, inv_freq, *, exact):
    """The oracle (fp64 throughout) or the same-dtype torch baseline (HF: fp32 statistics, the
    weight product and the rope each rounded to the dtype)."""
    if exact:
        h = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
        return rope_reference(h, positions, inv_freq, exact=True)
    h = x.float()
    h = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return rope_reference(h, positions, inv_freq)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_q_and_k_heads_of_a_packed_row(device, check_close, dtype, head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    step = make_paged_step([5, 1, 7], [3000, 17, 7], PAGE_SIZE, 200, generator, skip_write=[2, 9], device=device)
    tokens, width = 13, (HEADS + 2 * KV_HEADS) * head_dim

    def random(*shape):
        return (2 * torch.randn(shape, generator=generator)).to(TORCH_DTYPES[dtype]).to(device)

    qkv, q_weight, k_weight = random(tokens, width), random(head_dim), random(head_dim)
    k_cache, v_cache = random(200, PAGE_SIZE, KV_HEADS, head_dim), random(200, PAGE_SIZE, KV_HEADS, head_dim)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).to(device)
    heads = qkv.view(tokens, HEADS + 2 * KV_HEADS, head_dim)
    q, k, v = heads[:, :HEADS], heads[:, HEADS:HEADS + KV_HEADS], heads[:, HEADS + KV_HEADS:]

    q_variant = head_norm_rope.choose(dtype=dtype, num_heads=HEADS, head_dim=head_dim, x_stride=width, kv_write=False)
    q_out = head_norm_rope.launch(q_variant, q, q_weight, step.positions, inv_freq, EPS)
    check_close(q_out, *(norm_rope(q, q_weight, step.positions, inv_freq, exact=e) for e in (True, False)))

    k_variant = head_norm_rope.choose(dtype=dtype, num_heads=KV_HEADS, head_dim=head_dim, x_stride=width, kv_write=True)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    head_norm_rope.launch(k_variant, k, k_weight, step.positions, inv_freq, EPS, v=v, slot_mapping=step.slot_mapping,
                          k_cache=k_out, v_cache=v_out)
    exact_k, expected_v = kv_write_reference(norm_rope(k, k_weight, step.positions, inv_freq, exact=True), v,
                                             step.slot_mapping, k_cache.double(), v_cache)
    same_k, _ = kv_write_reference(norm_rope(k, k_weight, step.positions, inv_freq, exact=False), v,
                                   step.slot_mapping, k_cache, v_cache)
    check_close(k_out, exact_k, same_k)  # written slots normalized and rotated, the others untouched
    assert torch.equal(v_out, expected_v)


def test_needs_an_even_head_dim():
    with pytest.raises(KilnError, match="even head_dim"):
        head_norm_rope.choose(dtype="bf16", num_heads=4, head_dim=63, x_stride=4 * 63, kv_write=False)


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(head_norm_rope, lambda target: [
        head_norm_rope.choose(dtype="bf16", num_heads=16, head_dim=128, x_stride=32 * 128, kv_write=kv)
        for kv in (False, True)
    ])
