"""Sampler against a straightforward per-row float64 reference written here."""

import collections
import math

import pytest
import torch

from kiln.runtime.draw import FIRST_WIDTH, WIDEN, nucleus_probs, pick, top_k_probs
from kiln.runtime.request import Sequence
from kiln.runtime.sampler import Sampler, apply_penalties
from kiln.runtime.sampling_params import SamplingParams

EOS = 0


def _seq(params: SamplingParams, prompt=(5, 6, 7), output=(), index=0, name="r") -> Sequence:
    seq = Sequence((name, index), list(prompt), params, max_tokens=1000, arrival_time=0.0)
    seq.token_ids.extend(output)
    return seq


def ref_penalize(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, count in collections.Counter(output).items():
        out[t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def ref_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def ref_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Temperature, then top-k, top-p, min-p as documented, one row, float64."""
    xs = [x / p.temperature for x in logits]
    if p.top_k > 0:
        kth = sorted(xs, reverse=True)[p.top_k - 1]
        xs = [x if x >= kth else -math.inf for x in xs]
    if p.top_p < 1.0:
        probs, mass, keep = ref_softmax(xs), 0.0, set()
        for t in sorted(range(len(xs)), key=lambda t: -probs[t]):
            if mass >= p.top_p:
                break
            keep.add(t)
            mass += probs[t]
        xs = [x if t in keep else -math.inf for t, x in enumerate(xs)]
    if p.min_p > 0.0:
        probs = ref_softmax(xs)
        floor = p.min_p * max(probs)
        xs = [x if probs[t] >= floor else -math.inf for t, x in enumerate(xs)]
    return ref_softmax(xs)


PARAM_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=1.1, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=2.0, top_p=0.3),
]


def _vocab_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The filtered distribution of each row, from top_k_probs / nucleus_probs scattered to [R, V]."""
    probs = torch.zeros_like(logits)
    for row, p in enumerate(params):
        ids, kept = (top_k_probs if p.top_k else nucleus_probs)(logits[row:row + 1], [p])
        assert (kept[:, :-1] >= kept[:, 1:]).all(), "candidates must come most likely first"
        probs[row].scatter_(0, ids[0], kept[0])
    return probs


# vocab 64: plain topk; 300: no chunking (not a multiple of CHUNK); 32768: chunk search, and at
# scale 0.05 rows keeping thousands of tokens (the nucleus candidates widen to the whole vocabulary)
@pytest.mark.parametrize("vocab, scale", [(64, 2.0), (300, 1.0), (32768, 5.0), (32768, 0.05)],
                         ids=["small", "odd_vocab", "chunked", "flat_widened"])
def test_filtered_probs_match_the_reference(vocab, scale):
    params = [p for p in PARAM_CASES if p.top_k or p.top_p < 1 or p.min_p]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(0)) * scale
    probs = _vocab_probs(logits, params)
    for row, p in enumerate(params):
        expected = torch.tensor(ref_probs(logits[row].double().tolist(), p), dtype=torch.float64)
        assert ((probs[row] > 0) == (expected > 0)).all(), p
        torch.testing.assert_close(probs[row].double(), expected, atol=1e-6, rtol=1e-5)
    if scale < 0.1:  # the flat rows keep more than WIDEN * FIRST_WIDTH tokens (widened twice at least)
        assert ((probs > 0).sum(dim=-1) > WIDEN * FIRST_WIDTH).any()


def test_pick_is_the_inverse_cdf():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0]])
    cdf = weights.cumsum(dim=-1)
    picks = [int(pick(cdf, torch.tensor([u]))) for u in (0.0, 0.3, 0.5, 0.6, 0.75, 0.9, 0.999999)]
    assert picks == [1, 1, 1, 3, 3, 4, 4]


def test_penalties_match_the_reference():
    cases = [
        (SamplingParams(repetition_penalty=1.3), [3, 4, 4], [4, 9, 9, 9]),
        (SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 2], [2, 2, 7, 11, 2]),
        (SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=1.5), [10] * 7, [10, 12]),
        (SamplingParams(), [1], [1, 1]),
    ]
    logits = torch.randn(len(cases), 32, generator=torch.Generator().manual_seed(1))
    penalized = logits.clone()
    apply_penalties(penalized, [_seq(p, prompt, out) for p, prompt, out in cases])
    for row, (params, prompt, output) in enumerate(cases):
        expected = ref_penalize(logits[row].double().tolist(), prompt, output, params)
        torch.testing.assert_close(penalized[row].double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)


def test_penalties_keep_masked_tokens_masked_and_other_rows_untouched():
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5)
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(8))
    logits[1, [4, 9]] = float("-inf")  # e.g. EOS masked before min_tokens, and in the prompt
    seqs = [_seq(SamplingParams(), [1, 2], [3]), _seq(params, [4, 5, 4], [9, 9, 6]), _seq(params, [31], [])]
    penalized = logits.clone()
    apply_penalties(penalized, seqs)
    assert torch.equal(penalized[0], logits[0])
    assert penalized[1, 4] == penalized[1, 9] == float("-inf") and not penalized.isnan().any()
    for row in (1, 2):
        expected = ref_penalize(logits[row].double().tolist(), seqs[row].prompt_token_ids,
                                seqs[row].output_token_ids, params)
        torch.testing.assert_close(penalized[row].double(), torch.tensor(expected, dtype=torch.float64))


def test_greedy_with_penalties_is_argmax_of_penalized_logits():
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    seqs = [_seq(params, prompt=[i, i + 1], output=[int(logits[i].argmax())] * 2, index=i) for i in range(4)]
    tokens = Sampler(frozenset([EOS])).sample(logits.clone(), seqs).token_ids
    for i, seq in enumerate(seqs):
        ref = ref_penalize(logits[i].double().tolist(), seq.prompt_token_ids, seq.output_token_ids, params)
        assert tokens[i] == max(range(50), key=ref.__getitem__)


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    greedy = [_seq(SamplingParams(temperature=0), index=i) for i in range(16)]
    topk1 = [_seq(SamplingParams(temperature=0.8, top_k=1), index=i) for i in range(16)]
    sampler = Sampler(frozenset([EOS]), seed=0)
    assert sampler.sample(logits.clone(), topk1).token_ids == sampler.sample(logits.clone(), greedy).token_ids


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
                                    SamplingParams(temperature=1.5)], ids=["filtered", "plain"])
def test_draws_follow_the_filtered_distribution(params):
    row = torch.randn(10, generator=torch.Generator().manual_seed(4))
    expected = ref_probs(row.double().tolist(), params)
    num = 20000
    tokens = Sampler(frozenset([EOS]), seed=5).sample(
        row.repeat(num, 1), [_seq(params, index=i) for i in range(num)]).token_ids
    counts = collections.Counter(tokens)
    for t in range(10):
        assert abs(counts[t] / num - expected[t]) < 0.015, (t, counts[t] / num, expected[t])


def _sample_steps(seq: Sequence, companions: list[Sequence], steps: int, vocab: int = 300) -> list[int]:
    """Sample `steps` tokens for seq inside a batch with companions (seq at a varying row)."""
    sampler = Sampler(frozenset([EOS]))
    for step in range(steps):
        batch = companions[: step % (len(companions) + 1)] + [seq] + companions[step % (len(companions) + 1):]
        logits = torch.stack([torch.randn(vocab, generator=torch.Generator().manual_seed(7 * s.num_tokens))
                              for s in batch])
        tokens = sampler.sample(logits, batch).token_ids
        for s, t in zip(batch, tokens):
            s.token_ids.append(t)
    return seq.output_token_ids


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = _sample_steps(_seq(params), [], steps=12)
    companions = [_seq(SamplingParams(temperature=1.0, seed=s), name=f"c{s}") for s in range(3)]
    companions += [_seq(SamplingParams(temperature=0.5), name="u"), _seq(SamplingParams(temperature=0), name="g")]
    batched = _sample_steps(_seq(params), companions, steps=12)
    assert alone == batched
    other_seed = _sample_steps(_seq(SamplingParams(temperature=1.0, top_p=0.95, seed=4321)), [], steps=12)
    assert other_seed != alone


LOGPROB_PARAMS = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5),
                  SamplingParams(temperature=0.7, top_k=4, logprobs=0, seed=3),
                  SamplingParams(temperature=0),
                  SamplingParams(temperature=1.0, logprobs=5, presence_penalty=1.0),
                  SamplingParams(temperature=0, logprobs=2, min_tokens=5, stop_token_ids=[7])]


# the batch: some rows ask for logprobs (a copy); all do, some are edited (a copy); all do, none is edited
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [0, 1, 3, 4], [1]], ids=["some", "all_edited", "all_unedited"])
@pytest.mark.parametrize("vocab", [40, 16 * 64], ids=["small", "chunked"])
def test_logprobs_come_from_the_unmodified_logits(rows, vocab):
    params = [LOGPROB_PARAMS[i] for i in rows]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(6))
    logits[:, 7] = logits.max() + 1  # a stop id, masked for the min_tokens row only
    seqs = [_seq(p, output=[1, 2], index=i) for i, p in enumerate(params)]
    out = Sampler(frozenset([EOS])).sample(logits.clone(), seqs)
    for row, p in enumerate(params):
        lp = out.logprobs[row]
        if p.logprobs is None:
            assert lp is None
            continue
        ref = torch.log_softmax(logits[row].double(), dim=-1)
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-5)
        assert list(lp.top_token_ids) == ref.argsort(descending=True)[:p.logprobs].tolist()
        assert list(lp.top_logprobs) == pytest.approx(ref.sort(descending=True).values[:p.logprobs].tolist(),
                                                      abs=1e-5)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(ignore_eos):
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=ignore_eos)
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 7], logits[0, 3] = 10.0, 9.0, 8.0
    seq = _seq(params)
    sampler = Sampler(frozenset([EOS]))
    first = sampler.sample(logits.clone(), [seq]).token_ids[0]
    assert first == (EOS if ignore_eos else 3)
    seq.token_ids.extend([3, 3])
    assert sampler.sample(logits.clone(), [seq]).token_ids[0] == EOS
