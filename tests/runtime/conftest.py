"""Runtime test fixtures: a toy executor that really pages, its unpaged reference, a small real
byte-level BPE tokenizer, and an engine factory.

The toy "model": the logits for a context are pseudo-random numbers seeded by a hash of the
WHOLE context. The executor stores each step's input_ids in a per-block token store shaped like
a KV cache ([num_blocks, block_size]) at slot_mapping, and reads every sequence's context back
through its block table, so a paging, prefix-caching or scheduling bug changes the logits.
"""

import hashlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Un café crème, s'il vous plaît — merci beaucoup!",
    "日本語のテキストも少し入れておきます。",
    "Emoji make bytes long: 🦊🐶🎉 and 👩‍💻 too.",
    "def add(a, b):\n    return a + b\n",
    "Streaming text should never show half a character or a stop word.",
] * 4


def toy_logits(context: list[int], vocab_size: int) -> torch.Tensor:
    """[V] fp32 logits that depend on every token of the context (and nothing else)."""
    digest = hashlib.blake2b(torch.tensor(context, dtype=torch.int64).numpy().tobytes(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(vocab_size, generator=gen) * 3.0


class ToyExecutor:
    """Executor protocol over a token store; checks the step calling convention on every call."""

    def __init__(self, *, num_blocks: int, block_size: int, vocab_size: int, max_model_len: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.store = torch.full((num_blocks, block_size), -1, dtype=torch.int64)
        self.num_steps = 0
        self.max_step_tokens = 0
        self.max_step_seqs = 0

    def execute(self, batch) -> torch.Tensor:
        for name in ("input_ids", "positions", "query_start", "seq_lens", "block_tables", "slot_mapping",
                     "logits_indices"):
            assert getattr(batch, name).dtype == torch.int32, name
        qs, seq_lens = batch.query_start.tolist(), batch.seq_lens.tolist()
        num_seqs = len(seq_lens)
        assert qs[0] == 0 and qs[-1] == batch.num_tokens and len(qs) == num_seqs + 1
        assert batch.logits_indices.tolist() == [q - 1 for q in qs[1:]]
        q_lens = [qs[b + 1] - qs[b] for b in range(num_seqs)]
        assert all(q == 1 for q in q_lens[: batch.num_decodes])
        assert all(q != 1 for q in q_lens[batch.num_decodes:])
        for b in range(num_seqs):
            expected = list(range(seq_lens[b] - q_lens[b], seq_lens[b]))
            assert batch.positions[qs[b]:qs[b + 1]].tolist() == expected
        written = batch.slot_mapping >= 0
        slots = batch.slot_mapping[written].long()
        assert len(set(slots.tolist())) == len(slots), "two new tokens write the same KV slot"
        self.store.view(-1)[slots] = batch.input_ids[written].long()
        logits = torch.empty(num_seqs, self.vocab_size)
        for b in range(num_seqs):
            num_blocks = -(-seq_lens[b] // self.block_size)
            blocks = batch.block_tables[b, :num_blocks].long()
            context = self.store[blocks].reshape(-1)[: seq_lens[b]]
            assert (context >= 0).all(), "the context reads a KV slot that was never written"
            logits[b] = toy_logits(context.tolist(), self.vocab_size)
        self.num_steps += 1
        self.max_step_tokens = max(self.max_step_tokens, batch.num_tokens)
        self.max_step_seqs = max(self.max_step_seqs, num_seqs)
        return logits


def reference_greedy(prompt: list[int], params: SamplingParams, vocab_size: int, eos: int) -> list[int]:
    """Greedy generation with the toy model, no paging, no batching, no scheduler."""
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < params.max_tokens:
        token = int(toy_logits(tokens, vocab_size).argmax())
        tokens.append(token)
        out.append(token)
        if token == eos and not params.ignore_eos:
            break
    return out


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained on a few sentences; id 0 is <eos>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


EOS = 0


@pytest.fixture
def make_engine(tokenizer):
    """make_engine(num_blocks=..., block_size=..., max_model_len=..., **engine kwargs) -> LLMEngine."""

    def make(*, num_blocks=256, block_size=4, max_model_len=512, eos_token_ids=(EOS,), **kwargs) -> LLMEngine:
        executor = ToyExecutor(num_blocks=num_blocks, block_size=block_size,
                               vocab_size=tokenizer.get_vocab_size(), max_model_len=max_model_len)
        return LLMEngine(executor, tokenizer, eos_token_ids=eos_token_ids, **kwargs)

    return make


@pytest.fixture
def greedy_reference(tokenizer):
    """greedy_reference(prompt, params) -> the toy model's greedy output token ids."""
    return lambda prompt, params: reference_greedy(prompt, params, tokenizer.get_vocab_size(), EOS)


def run_to_completion(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None,
                      max_steps: int = 10_000) -> dict[str, object]:
    """Step until idle, adding arrivals[step] before that step; the final RequestOutput per id."""
    arrivals = arrivals or {}
    finals, step = {}, 0
    while engine.has_unfinished_requests() or any(s >= step for s in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
        assert step < max_steps, "engine did not finish"
    return finals


@pytest.fixture
def run():
    return run_to_completion
