"""The draw's fast paths against their plain definitions, on adversarial logits: ties, -inf,
flat rows, top_p near 1, rows of every mode in one batch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.draw import (
    BLOCK_ROWS,
    CHUNK,
    LOG2_E,
    ChunkedRows,
    _nucleus_candidates,
    _scales,
    chunk_weights,
    draw_tokens,
    nucleus_probs,
    pick,
    pick_in_vocab,
)
from kiln.runtime.sampler import argmax_rows
from kiln.runtime.sampling_params import SamplingParams

ROWS = BLOCK_ROWS + 5


def _tied_logits(rows: int, vocab: int, seed: int, levels: int) -> torch.Tensor:
    """[rows, vocab] logits from `levels` distinct values (many ties), a few -inf."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=gen).float() * 0.5
    logits[torch.rand(rows, vocab, generator=gen) < 0.05] = float("-inf")
    return logits


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 80), levels=st.sampled_from([2, 7, 1000]),
       vocab=st.sampled_from([40 * CHUNK, 64 * CHUNK, 4000]))
def test_chunked_top_k_is_the_top_k(seed, k, levels, vocab):
    logits = _tied_logits(5, vocab, seed, levels)
    for rows in (None, torch.tensor([3, 0])):
        values, ids = ChunkedRows(logits).top(k, rows)
        picked = logits if rows is None else logits[rows]
        assert torch.equal(values, picked.topk(k, dim=-1).values)
        assert torch.equal(picked.gather(1, ids), values)
        assert all(len(set(row)) == k for row in ids.tolist())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), vocab=st.sampled_from([CHUNK, 16 * CHUNK, 1000]), masked=st.floats(0, 0.99))
def test_pick_in_vocab_is_pick_over_the_cumsum(seed, vocab, masked):
    """Integer logits at T = log2(e): every weight is a power of 2 >= 2^-8 and every sum exact in
    fp32, so chunk by chunk must agree to the token with one cumsum over the vocabulary. ROWS rows:
    a full and a partial block of the weight pass."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-8, 1, (ROWS, vocab), generator=gen).float()
    logits[torch.rand(ROWS, vocab, generator=gen) < masked] = float("-inf")
    logits[1, :vocab // 2] = float("-inf")  # whole chunks without weight before the first token
    logits[:, -1] = 0.0
    uniforms = torch.rand(ROWS, generator=gen)
    uniforms[:3] = torch.tensor([0.0, 0.5, 1.0 - 2**-24])
    scale = _scales([SamplingParams(temperature=LOG2_E)] * ROWS, logits.device)
    assert (scale == 1.0).all()
    tokens = pick_in_vocab(logits, scale, uniforms)
    assert torch.equal(tokens, pick(torch.exp2(logits).cumsum(dim=-1), uniforms))
    assert (logits.gather(1, tokens[:, None]) > float("-inf")).all()


def _mass_by_value(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> dict[float, float]:
    """Probability kept per distinct logit value (tie-agnostic), and the number of kept tokens."""
    mass: dict[float, float] = {}
    for token, p in zip(ids.tolist(), probs.tolist()):
        if p > 0:
            value = float(logits[token])
            mass[value] = mass.get(value, 0.0) + p
    return mass


NUCLEUS = [SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(temperature=0.7, top_p=0.5),
           SamplingParams(temperature=1.0, top_p=1 - 1e-6), SamplingParams(temperature=2.0, min_p=1e-4),
           SamplingParams(temperature=0.5, top_p=0.9, min_p=0.2), SamplingParams(temperature=1.0, top_p=0.05)]


@pytest.mark.parametrize("kind", ["tied", "flat", "bf16_rounded", "peaked"])
def test_nucleus_candidates_equal_the_full_sort(kind):
    """First FIRST_WIDTH candidates, widened where needed == the fully sorted vocabulary."""
    vocab, gen = 64 * CHUNK, torch.Generator().manual_seed(5)
    logits = {"tied": lambda: _tied_logits(len(NUCLEUS), vocab, 5, levels=9),
              "flat": lambda: torch.zeros(len(NUCLEUS), vocab),
              "bf16_rounded": lambda: (3 * torch.randn(len(NUCLEUS), vocab, generator=gen)).bfloat16().float(),
              "peaked": lambda: 8 * torch.randn(len(NUCLEUS), vocab, generator=gen)}[kind]()
    fast = nucleus_probs(logits, NUCLEUS)
    chunked, (values, ids) = ChunkedRows(logits), logits.topk(vocab, dim=-1)
    scale = _scales(NUCLEUS, logits.device)
    total = chunk_weights(logits, values[:, :1], scale, chunked.size).sum(dim=-1)
    full = _nucleus_candidates(chunked, None, (values, ids), values[:, :1], scale, total, NUCLEUS)
    for row in range(len(NUCLEUS)):
        fast_mass, full_mass = (_mass_by_value(logits[row], ids[row], probs[row]) for ids, probs in (fast, full))
        assert fast_mass.keys() == full_mass.keys(), NUCLEUS[row]
        assert fast_mass == pytest.approx(full_mass, abs=1e-6), NUCLEUS[row]
        assert int((fast[1][row] > 0).sum()) == int((full[1][row] > 0).sum()), NUCLEUS[row]


MODES = NUCLEUS + [SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, top_k=3),
                   SamplingParams(temperature=1.0, top_k=70, top_p=0.8), SamplingParams(temperature=0.3, top_k=1)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), modes=st.lists(st.sampled_from(range(len(MODES))), min_size=1, max_size=12),
       vocab=st.sampled_from([64 * CHUNK, 3000]))
def test_a_row_draws_the_same_token_in_any_batch(seed, modes, vocab):
    """Rows of every mode in one batch, on tie-heavy logits: each row's token is the one it gets alone."""
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(len(modes), vocab, generator=gen)).bfloat16().float()
    uniforms = torch.rand(len(modes), generator=gen)
    params = [MODES[m] for m in modes]
    batched = draw_tokens(logits, params, uniforms)
    alone = [int(draw_tokens(logits[r:r + 1], [p], uniforms[r:r + 1])) for r, p in enumerate(params)]
    assert batched.tolist() == alone
    assert all(logits[r, t] > float("-inf") for r, t in enumerate(alone))


def test_argmax_rows_is_torch_argmax():
    logits = _tied_logits(16, 3 * CHUNK, seed=1, levels=3)
    logits[0] = float("-inf")
    logits[1, 7] = logits[1, 9] = float("nan")
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(argmax_rows(logits[4:9]), logits[4:9].argmax(dim=-1))
