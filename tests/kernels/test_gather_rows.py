"""gather_rows: the embedding lookup and the last-token gather, vs torch indexing (exact)."""

import pytest
import torch

from kiln.codegen.kernels import TORCH_DTYPES
from kiln.codegen.kernels import gather_rows


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, tokens", [(64, 1), (100, 7), (128, 5)])
def test_embedding_lookup(device, target, dtype, dim, tokens):
    generator = torch.Generator().manual_seed(dim + tokens)
    weight = torch.randn(50, dim, generator=generator).to(TORCH_DTYPES[dtype]).to(device)
    ids = torch.randint(0, 50, (tokens,), generator=generator, dtype=torch.int32)
    ids[0] = 49  # the last row: the offset math must reach the end of the table
    ids = ids.to(device)
    out = gather_rows.launch(gather_rows.choose(target, dtype=dtype, dim=dim), ids, weight)
    assert torch.equal(out, weight[ids.long()])


def test_last_token_gather_into_given_out(device, target):
    """Rows query_start[1:] - 1 of a flattened step (3 sequences of 4, 1 and 3 tokens)."""
    hidden = torch.randn(8, 100).to(device)
    query_start = torch.tensor([0, 4, 5, 8], dtype=torch.int32)
    logits_indices = (query_start[1:] - 1).to(device)
    out = torch.full((3, 100), float("nan"), device=device)
    result = gather_rows.launch(gather_rows.choose(target, dtype="fp32", dim=100), logits_indices, hidden, out=out)
    assert result is out
    assert torch.equal(out, hidden[[3, 4, 7]])


def test_rejects_a_table_of_another_width(device, target):
    variant = gather_rows.choose(target, dtype="fp32", dim=64)
    with pytest.raises(ValueError, match="table"):
        gather_rows.launch(variant, torch.zeros(2, dtype=torch.int32, device=device), torch.zeros(9, 65, device=device))


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(gather_rows, lambda target: [gather_rows.choose(target, dtype="bf16", dim=576)])
