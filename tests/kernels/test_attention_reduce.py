"""The split-K reduce kernel (flash-decoding's second pass) vs a softmax over all the keys in fp64.

Each (sequence, head) row gets random scores and values cut into `num_splits` chunks of random
lengths, some empty (the partial decode writes for a split past a short sequence's end: max -inf,
sum 0, acc 0); the partials are what `attention_decode` writes per split (fp32, max in log2 units),
and the oracle attends over the concatenated keys (plus the head's sink logit) in fp64.
"""

import math

import pytest
import torch

from kiln.codegen.kernels import attention_decode, attention_reduce

LOG2E = math.log2(math.e)


def partials_and_oracle(batch: int, heads: int, splits: int, dim: int, sinks: torch.Tensor | None, seed: int):
    """(part_max, part_sum, part_acc) fp32 for [batch, heads, splits] rows of 0..4 keys per split
    (at least one split empty when splits > 1, every split of row 0 empty), and the fp64 oracle
    [batch, heads, dim]: softmax(scores (+ sink)) @ values, 0 for a row without keys or sink."""
    generator = torch.Generator().manual_seed(seed)
    part_max = torch.full((batch, heads, splits), float("-inf"), dtype=torch.float64)
    part_sum = torch.zeros(batch, heads, splits, dtype=torch.float64)
    part_acc = torch.zeros(batch, heads, splits, dim, dtype=torch.float64)
    exact = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            lengths = torch.randint(0, 5, (splits,), generator=generator)
            if splits > 1:
                lengths[torch.randint(0, splits, (1,), generator=generator)] = 0
            if b == 0 and h == 0:
                lengths.zero_()
            scores = 3 * torch.randn(int(lengths.sum()), generator=generator, dtype=torch.float64)
            values = torch.randn(int(lengths.sum()), dim, generator=generator, dtype=torch.float64)
            for s, (x, v) in enumerate(zip(scores.split(lengths.tolist()), values.split(lengths.tolist()))):
                if len(x):
                    part_max[b, h, s] = x.max() * LOG2E
                    weights = torch.exp2(x * LOG2E - part_max[b, h, s])
                    part_sum[b, h, s], part_acc[b, h, s] = weights.sum(), weights @ v
            logits = scores if sinks is None else torch.cat([scores, sinks[h:h + 1].double()])
            if len(logits):
                weights = torch.softmax(logits, 0)[: len(scores)]
                exact[b, h] = weights @ values
    return part_max.float(), part_sum.float(), part_acc.float(), exact


def check_reduce(dtype: str, heads: int, dim: int, splits: int, with_sinks: bool, device, seed: int) -> None:
    variant = attention_reduce.choose(dtype=dtype, num_heads=heads, head_dim=dim, sinks=with_sinks)
    torch_dtype = attention_reduce.TORCH_DTYPES[dtype]
    sinks = (2 * torch.randn(heads, generator=torch.Generator().manual_seed(seed))).to(torch_dtype) if with_sinks else None
    part_max, part_sum, part_acc, exact = partials_and_oracle(2, heads, splits, dim, sinks, seed)
    out = torch.full((2, heads, dim), float("nan"), dtype=torch_dtype, device=device)
    attention_reduce.launch(variant, part_max.to(device), part_sum.to(device), part_acc.to(device), out,
                            None if sinks is None else sinks.to(device))
    # fp32 sums in another order, then one rounding to the output's dtype
    tolerance = 1e-5 if torch_dtype == torch.float32 else torch.finfo(torch_dtype).eps
    torch.testing.assert_close(out.cpu().double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max().item(),
                               msg=f"{dtype} splits={splits} sinks={with_sinks}")
    if not with_sinks:
        assert (out[0, 0] == 0).all()  # no keys at all: 0, not NaN


@pytest.mark.parametrize("with_sinks", [False, True])
def test_reduce_matches_the_softmax_over_all_splits_for_every_split_count(device, with_sinks):
    """Every split count decode may launch, 1..MAX_DECODE_SPLITS; head_dim 80 (masked columns)."""
    for splits in range(1, attention_decode.MAX_SPLITS + 1):
        check_reduce("fp32", 3, 80, splits, with_sinks, device, seed=splits)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_reduce_in_half_types(device, dtype, with_sinks):
    for splits in (1, 5, attention_decode.MAX_SPLITS):
        check_reduce(dtype, 2, 64, splits, with_sinks, device, seed=100 + splits)


def test_reduce_loads_all_splits_at_once_and_covers_every_split_count():
    variant = attention_reduce.choose(dtype="bf16", num_heads=9, head_dim=64, sinks=True)
    assert variant.block_s >= attention_decode.MAX_SPLITS and variant.block_s & (variant.block_s - 1) == 0
    assert variant.num_warps == 4 and attention_reduce.choose(dtype="bf16", num_heads=4, head_dim=256).num_warps == 8
    assert variant.cache_key == f"attention_reduce__bf16__h9_d64__sinks__s{variant.block_s}__w4"
    source = attention_reduce.render(variant)
    assert " in range(" not in source.split("@triton.jit")[1]  # no loop over the splits
    assert attention_reduce.constexprs(variant)["BLOCK_S"] == variant.block_s


def test_reduce_rejects_more_splits_than_its_tile(device):
    variant = attention_reduce.choose(dtype="fp32", num_heads=1, head_dim=16)
    splits = variant.block_s + 1
    part = torch.zeros(1, 1, splits, device=device)
    with pytest.raises(ValueError, match="splits"):
        attention_reduce.launch(variant, part, part.clone(), torch.zeros(1, 1, splits, 16, device=device),
                                torch.empty(1, 1, 16, device=device))


def test_reduce_cross_compiles_without_spills_for_odd_and_wide_heads(cross_compile):
    """Beyond test_attention_aot.py's layers: head_dim 80 (masked columns), fp32 partials into fp32,
    and head_dim 512 (the widest tile, 8 warps) with sinks, on every GPU target."""
    cross_compile(attention_reduce, lambda target: [
        attention_reduce.choose(dtype="fp32", num_heads=3, head_dim=80),
        attention_reduce.choose(dtype="bf16", num_heads=8, head_dim=512, sinks=True),
    ])
