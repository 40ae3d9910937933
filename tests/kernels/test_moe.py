"""moe vs the per-expert reference (kiln.ir.reference.moe): the alignment's contract, the three
kernels and the combine on ragged expert loads (experts without tokens, one expert receiving
every token, T = 1, T not a multiple of BLOCK_M), both activations, with and without biases,
fp32 and bf16; the register model of `choose`; cross-compilation for every GPU arch; and, on a
GPU, the compiled kernels at a realistic width."""

import dataclasses

import pytest
import torch

from kiln.codegen.kernels import moe
from kiln.codegen.targets import TARGETS, get_target
from kiln.ir import reference

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
TINY = (8, 48, 40, 24)  # (E experts, K hidden, N out, I intermediate); ragged_ids needs E = 8
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
QWEN3_30B = moe.MoeParams("bf16", "fp32", "i64", 128, 8, 2048, 2048, 768)
GPT_OSS_20B = moe.MoeParams("bf16", "bf16", "i64", 32, 4, 2880, 2880, 2880, "swiglu_clamped", 1.702, 7.0, bias=True)
SWIGLU = dict(activation="swiglu_clamped", alpha=1.702, limit=1.5)  # a limit the test values exceed


def ragged_ids(tokens: int, top_k: int, seed: int) -> torch.Tensor:
    """[T, top_k] distinct experts per token: slot 0 is expert 3 for every token, the others
    drawn from 1, 2, 4, 6, 7 (experts 0 and 5 get nothing)."""
    generator = torch.Generator().manual_seed(seed)
    others = torch.tensor([1, 2, 4, 6, 7])
    rest = torch.stack([others[torch.randperm(5, generator=generator)[: top_k - 1]] for _ in range(tokens)])
    return torch.cat([torch.full((tokens, 1), 3), rest], dim=1)


def moe_inputs(tokens: int, top_k: int, bias: bool, seed: int, dims: tuple = TINY) -> list[torch.Tensor]:
    """x, routing weights (fp32, rows summing to 1), ids, w_gate_up, w_down[, biases], fp32."""
    E, K, N, I = dims  # noqa: E741
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=generator)  # noqa: E731
    weights = torch.rand(tokens, top_k, generator=generator)
    tensors = [randn(tokens, K), weights / weights.sum(1, keepdim=True), ragged_ids(tokens, top_k, seed),
               randn(E, 2 * I, K, scale=K ** -0.5), randn(E, N, I, scale=I ** -0.5)]
    return tensors + ([randn(E, 2 * I, scale=0.5), randn(E, N, scale=0.5)] if bias else [])


def run(target, dtype: str, tensors: list[torch.Tensor], device: str, activation="silu", alpha=None, limit=None):
    x, weights, ids, w_gate_up, w_down, *biases = tensors
    (e, i, k), n = w_gate_up.shape, w_down.shape[1]
    params = moe.MoeParams(dtype, "fp32", "i64", e, ids.shape[1], k, n, i // 2, activation, alpha, limit,
                           bias=bool(biases))
    variants = moe.choose(target, params, x.shape[0])
    cast = [t.to(TORCH[dtype]).to(device) for t in [x, w_gate_up, w_down, *biases]]
    return moe.launch(variants, cast[0], weights.to(device), ids.to(device), *cast[1:]).cpu(), variants


def expected(tensors, dtype: torch.dtype, **activation) -> torch.Tensor:
    x, weights, ids, *expert_weights = tensors
    return reference.moe(x.to(dtype), weights, ids, *(t.to(dtype) for t in expert_weights), **activation)


@pytest.mark.parametrize("tokens, top_k", [(37, 2), (1, 3), (16, 1)])
def test_alignment_sorts_pairs_by_expert_in_padded_blocks(device, target, tokens, top_k):
    ids = ragged_ids(tokens, top_k, seed=tokens).to(device)
    experts = TINY[0]
    align = moe.choose(target, moe.MoeParams("fp32", "fp32", "i64", *TINY[:1], top_k, *TINY[1:]), tokens)[0]
    rows, block_m, pairs = moe.padded_rows(align, tokens), align.block_m, tokens * top_k
    index = dict(dtype=torch.int32, device=device)
    sorted_pairs, blocks, num_padded = torch.empty(rows, **index), torch.empty(-(-rows // block_m), **index), \
        torch.empty(1, **index)
    moe.load(align).kernel[moe.grid(align, tokens)](ids, sorted_pairs, blocks, num_padded, tokens,
                                                   **moe.constexprs(align), num_warps=align.num_warps)
    counts = torch.bincount(ids.flatten().cpu(), minlength=experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert num_padded.item() == padded.sum().item()
    want_pairs, want_blocks = [], []
    for expert in range(experts):  # each expert's pairs in (token, slot) order, then sentinels
        mine = (ids.flatten().cpu() == expert).nonzero().flatten().tolist()
        want_pairs += mine + [pairs] * (padded[expert].item() - len(mine))
        want_blocks += [expert] * (padded[expert].item() // block_m)
    assert sorted_pairs[: len(want_pairs)].tolist() == want_pairs
    assert blocks[: len(want_blocks)].tolist() == want_blocks


CASES = [  # (dtype, tokens, top_k, bias, activation)
    ("fp32", 37, 2, False, {}),
    ("fp32", 37, 2, True, SWIGLU),
    ("fp32", 1, 3, True, {}),
    ("fp32", 16, 1, False, SWIGLU),
    ("bf16", 37, 2, True, SWIGLU),
    ("bf16", 5, 3, False, {}),
]


@pytest.mark.parametrize("dtype, tokens, top_k, bias, activation", CASES)
def test_matches_the_per_expert_reference(device, target, check_close, dtype, tokens, top_k, bias, activation):
    tensors = moe_inputs(tokens, top_k, bias, seed=tokens * 10 + top_k)
    out, _ = run(target, dtype, tensors, device, **activation)
    exact = expected(tensors, torch.float64, **activation)
    if dtype == "fp32":
        assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    else:
        check_close(out, exact, expected(tensors, torch.bfloat16, **activation))


def test_swiglu_limit_clamps_gate_and_up():
    """The clamp is live in these inputs: a tenfold limit changes the result."""
    tensors = moe_inputs(7, 2, True, seed=1)
    assert not torch.allclose(expected(tensors, torch.float64, **SWIGLU),
                              expected(tensors, torch.float64, **{**SWIGLU, "limit": 15.0}))


def test_gate_up_block_n_fits_the_register_budget():
    """gate_up's two accumulators fit every target's accumulator_values_per_thread in every bucket;
    with half of a100's budget, its large 64x128 tile on 8 warps halves BLOCK_N."""
    def gate_up(target, tokens):
        align, gate_up, down = moe.choose(target, QWEN3_30B, tokens)
        assert align.block_m == gate_up.block_m == down.block_m and down.block_n >= gate_up.block_n
        return gate_up

    for target in (target for target in TARGETS.values() if target.is_gpu):
        for tokens in (1, 256, 4096):
            v = gate_up(target, tokens)
            assert 2 * v.block_m * v.block_n / (v.num_warps * target.warp_size) <= target.accumulator_values_per_thread
    a100 = get_target("a100")
    assert gate_up(a100, 4096).block_n == 128
    assert gate_up(dataclasses.replace(a100, accumulator_values_per_thread=32), 4096).block_n == 64


def test_cross_compiles_for_every_gpu_arch_without_spills(cross_compile):
    """Every bucket's variants of a Qwen3-30B-A3B layer, and a GPT-OSS-20B layer's (swiglu, biases,
    bf16 routing weights) for decode and large batches."""
    def variants(target):
        chosen = [v for tokens in (1, 256, 4096) for v in moe.choose(target, QWEN3_30B, tokens)]
        chosen += [v for tokens in (1, 4096) for v in moe.choose(target, GPT_OSS_20B, tokens)[1:]]
        return list({v.cache_key: v for v in chosen}.values())

    cross_compile(moe, variants)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 300])
def test_compiled_kernels_match_the_reference_on_a_gpu(target, check_close, tokens):
    """A Qwen3-MoE-like layer narrowed to 8 experts (bf16), in this GPU's own tiles."""
    tensors = moe_inputs(tokens, 2, True, seed=tokens, dims=(8, 512, 384, 256))
    out, _ = run(target, "bf16", tensors, "cuda", **SWIGLU)
    check_close(out, expected(tensors, torch.float64, **SWIGLU), expected(tensors, torch.bfloat16, **SWIGLU))
