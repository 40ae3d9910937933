"""Steps replayed from CUDA graphs (runtime/cuda_graphs.py) against the eager GPU executor, on a
tiny random Llama: decode steps per (batch-size bucket, context bucket), mixed steps (prefill
chunks + decodes) per (token bucket, sequence bucket). On a GPU with real CUDA graphs (this GPU's
target), on a CPU with the same static buffers, padding and bucketed split-K, interpreted (the
b200 target: 148 SMs, so the model's one kv head splits its context). One executor lives at a
time: on a GPU each sizes its KV cache from the memory left free. The sharing of graphs between
context buckets and the padding of mixed steps are tested on fake programs."""

import gc

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from kiln.codegen.kernels import attention_decode
from kiln.codegen.targets import get_target
from kiln.compiler import CompileOptions, compile_model
from kiln.ir.step import PagedSequences
from kiln.llm import local_target
from kiln.runtime.artifact import load_artifact
from kiln.runtime.cuda_graphs import (
    DecodeGraphs,
    MixedGraphs,
    StepGraphs,
    capture_sizes,
    context_buckets,
    mixed_buckets,
    padding_counts,
    sequence_buckets,
    token_buckets,
)
from kiln.runtime.engine import LLMEngine
from kiln.runtime.gpu_executor import GpuExecutor
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_batch import StepBatch

VOCAB = 512
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails, interpreted
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]


def word_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer of `vocab` words "w0" ... (id i <-> "wi", whitespace-separated):
    what the engine needs to turn ids into text, built here (no model wheel, no download)."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@pytest.fixture(scope="module")
def tiny_gpu_artifact(tmp_path_factory, like_the_gpu_machine):
    """A 2-layer Llama (2 query heads of 64 over 1 kv head; random weights, a word-level tokenizer
    of VOCAB words) compiled for this GPU, or for b200; built as on the GPU machine, where no
    shipped model loads."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-llama")
    with like_the_gpu_machine():
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        word_tokenizer(VOCAB).save(str(path / "tokenizer.json"))
        target = local_target() if torch.cuda.is_available() else "b200"
        compile_model(str(path), path / "artifact", CompileOptions(target=target), progress=False)
    return load_artifact(path / "artifact")


def _executor(artifact, enforce_eager: bool) -> GpuExecutor:
    interpret = not torch.cuda.is_available()
    return GpuExecutor(artifact, interpret=interpret, kv_cache_memory=8 << 20, gpu_memory_utilization=0.3,
                       max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=8, enforce_eager=enforce_eager)


def _release() -> None:
    """Frees the device memory of dropped executors (one with CUDA graphs is a reference cycle)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def test_capture_sizes_follow_vllm_buckets():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1000)[-1] == 256


def test_context_buckets_are_powers_of_two_up_to_max_model_len():
    assert context_buckets(1024) == [256, 512, 1024]
    assert context_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert context_buckets(200) == [200]
    assert context_buckets(4096, floor=512) == [512, 1024, 2048, 4096]


class _FakeLauncher:
    """A CPU launcher whose kernels only count their launches (kernel name, grid, args)."""

    device = torch.device("cpu")

    def __init__(self):
        self.launched = []

    def to_device(self, tensor):
        return tensor

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def max_context(self, seq_lens):
        return int(seq_lens.max())

    def launch(self, kernel, grid, *args):
        self.launched.append((kernel, grid, args))


def _fake_program(inputs: dict, launcher) -> torch.Tensor:
    """Launches "attention" over splits that stop growing past 512 keys (as split-K saturates),
    then "head"; with input id 99 in the step, also "surprise" (launches that depend on values)."""
    batch = inputs["input_ids"].shape[0]
    splits = min(launcher.max_context(inputs["seq_lens"]) // 256, 2) or 1
    out = launcher.empty((batch, 4), torch.float32)
    launcher.launch("attention", (batch, 1, splits), inputs["block_tables"], out, splits)
    if (inputs["input_ids"] == 99).any():
        launcher.launch("surprise", (1,))
    launcher.launch("head", (batch,), out)
    return out.fill_(float(splits))


def test_context_buckets_with_the_same_launches_share_a_graph():
    """Dry runs launch nothing; (size, 512) and (size, 1024) launch the same, so they share the
    graph of (size, 1024); (size, 256) owns its own. A step replays its context's bucket and runs
    (interpreted) the launches its dry run recorded; one that launches otherwise is refused."""
    launcher = _FakeLauncher()
    graphs = DecodeGraphs(_fake_program, launcher, [1, 2, 4], max_model_len=1024, block_size=16, capture=False)
    assert launcher.launched == []
    assert graphs.contexts == [256, 512, 1024]
    assert graphs.graph_keys == [(4, 1024), (4, 256), (2, 1024), (2, 256), (1, 1024), (1, 256)]
    assert graphs.shared[2, 512] == graphs.shared[2, 1024] == (2, 1024) and graphs.shared[2, 256] == (2, 256)
    assert graphs.plans[1, 256] == (("attention", (1, 1, 1), ("tensor", (1, 64), torch.int32),
                                     ("tensor", (1, 4), torch.float32), 1), ("head", (1,), ("tensor", (1, 4), torch.float32)))
    pages = PagedSequences(64, block_size=16)
    pages.step([("a", [1] * 299), ("b", [1] * 9)])
    for chunks, key, splits in [([("b", [2])], (1, 256), 1), ([("a", [2]), ("b", [3])], (2, 1024), 2)]:
        launcher.launched.clear()
        logits = graphs.execute(StepBatch(**pages.step(chunks), num_decodes=len(chunks)))
        assert graphs.last_key == key and (logits == splits).all() and logits.shape == (len(chunks), 4)
        assert [(name, grid) for name, grid, _ in launcher.launched] == [("attention", (key[0], 1, splits)),
                                                                        ("head", (key[0],))]
    with pytest.raises(RuntimeError, match="other kernels"):
        graphs.execute(StepBatch(**pages.step([("b", [99])]), num_decodes=1))


def _bucket_steps() -> list[StepBatch]:
    """A prefill of 4 prompts, then decode steps of 4, 3 and 2 of those sequences (contexts <= 72),
    then a decode step of a sequence e at context 520 with b and a. e's first 519 keys and values
    are the random cache contents `_run_steps` writes (an interpreted prefill of them is slow)."""
    pages = PagedSequences(96, block_size=16, seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [(seq, torch.randint(0, VOCAB, (n,), generator=generator).tolist())
               for seq, n in (("a", 70), ("b", 20), ("c", 5), ("d", 7))]
    pages.step([("e", [0] * 519)])  # e's blocks, never run
    steps = [prompts, [(seq, [11]) for seq in "abcd"], [(seq, [12]) for seq in "abc"], [("d", [13]), ("b", [14])],
             [("e", [15]), ("b", [16]), ("a", [17])]]
    return [StepBatch(**pages.step(chunks), num_decodes=0 if number == 0 else len(chunks))
            for number, chunks in enumerate(steps)]


def _run_steps(artifact, enforce_eager: bool, batches: list[StepBatch],
               caches: list | None = None) -> tuple[list[torch.Tensor], dict | None]:
    """The logits of `batches` on a fresh executor (freed after), and its decode graphs' buckets,
    the bucket pairs that own graphs, the captured ones, the launch plans, the mixed graphs' plans
    and captured pairs, (family, pair) each step replayed (None for an eager step) and the decode
    and mixed replays (None without graphs). With `caches`, appends the KV caches (on the CPU)
    before the first step and after each."""
    executor = _executor(artifact, enforce_eager)
    assert executor.num_blocks >= 96
    generator = torch.Generator().manual_seed(5)
    for cache in executor.states.values():  # the same random keys and values for every executor
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    families = [] if executor.graphs is None else [executor.graphs.decode, executor.graphs.mixed]
    logits, replayed = [], []
    for batch in [None, *batches]:
        if batch is not None:
            replays = [family.replays for family in families]
            logits.append(executor.execute(batch).cpu())
            replayed.append(next(((family.kind, family.last_key) for family, before in zip(families, replays)
                                  if family.replays != before), None))
        if caches is not None:
            caches.append({name: cache.cpu().clone() for name, cache in executor.states.items()})
    graphs = None
    if executor.graphs is not None:
        decode, mixed = executor.graphs.decode, executor.graphs.mixed
        graphs = {"sizes": decode.sizes, "contexts": decode.contexts, "graph_keys": decode.graph_keys,
                  "captured": sorted(decode._graphs), "plans": decode.plans, "replayed": replayed,
                  "replays": decode.replays, "mixed_plans": mixed.plans, "mixed_captured": sorted(mixed._graphs),
                  "mixed_replays": mixed.replays}
    del executor
    _release()
    return logits, graphs


def _attention_splits(plan) -> list[int]:
    """The split counts of a plan's decode-attention launches: S when the split-K kernel launches,
    then the reduce of its S partials (its last argument), 1 for the kernel without split-K."""
    splits = []
    for launch, following in zip(plan, plan[1:]):
        if launch[0].startswith("attention_decode"):
            split_k = "__splitk" in launch[0]
            assert split_k == following[0].startswith("attention_reduce"), (launch[0], following[0])
            splits.append(following[-1] if split_k else 1)
    return splits


def test_decode_buckets_replay_like_eager_steps(tiny_gpu_artifact):
    """Decode steps of 4, 3 and 2 sequences at contexts <= 72 replay the graphs of (4, 256),
    (4, 256) and (2, 256), with one split (no reduce); a decode step of 3 sequences at context 520
    replays (4, 1024), whose split-K is the target's for 1024 keys (4 splits on b200, then the
    reduce). Their logits equal the eager executor's (which splits for the step's own context)
    within bf16 noise, with the same greedy tokens. The prefill before them (102 tokens over 4
    sequences) replays the mixed pair (128, 8). Step 2 pads row 3,
    which step 1 gave to sequence d: were the padding's KV slot not reset to -1, d's last key and
    value would be overwritten, and step 3 would differ."""
    batches = _bucket_steps()
    (wanted, no_graphs), (gotten, graphs) = (_run_steps(tiny_gpu_artifact, eager, batches) for eager in (True, False))
    assert no_graphs is None and graphs["sizes"] == [1, 2, 4, 8] and graphs["contexts"] == [256, 512, 1024]
    # a captured (on a GPU only) graph per distinct plan; here every bucket pair splits differently
    assert graphs["captured"] == (sorted(graphs["graph_keys"]) if torch.cuda.is_available() else [])
    assert sorted(graphs["graph_keys"]) == [(size, bound) for size in (1, 2, 4, 8) for bound in (256, 512, 1024)]
    for number, (batch, got, want) in enumerate(zip(batches, gotten, wanted)):
        assert got.shape == want.shape == (batch.num_seqs, VOCAB) and got.dtype == torch.float32
        assert (got.argmax(-1) == want.argmax(-1)).all(), f"step {number}: greedy tokens differ"
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item(), msg=f"step {number}")
    assert graphs["replayed"] == [("mixed", (128, 8)), *(("decode", key) for key in [(4, 256), (4, 256), (2, 256), (4, 1024)])]
    assert graphs["replays"] == 4
    target = get_target(local_target() if torch.cuda.is_available() else "b200")
    for key in {key for kind, key in graphs["replayed"][1:]}:
        size, bound = key
        wanted_splits = attention_decode.choose_num_splits(size, 1, bound, target)
        assert _attention_splits(graphs["plans"][key]) == [wanted_splits] * 2, key  # both layers
    short, long = (_attention_splits(graphs["plans"][key])[0] for key in [(4, 256), (4, 1024)])
    assert short == 1 < long  # the short context launches fewer attention programs, and no reduce


def _engine_tokens(artifact, enforce_eager: bool, prompts: list[list[int]], max_tokens: int) -> tuple[dict, tuple]:
    """Greedy tokens of `prompts`, two arriving per step, on a fresh executor (freed after), and
    how many decode and mixed steps replayed graphs."""
    executor = _executor(artifact, enforce_eager)
    tokenizer = Tokenizer.from_file(str(artifact.file("tokenizer.json")))
    engine = LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_seqs=8, max_num_batched_tokens=128)
    finals, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for index, prompt in pending[:2]:
            engine.add_request(str(index), prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        pending = pending[2:]
        finals.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    graphs = executor.graphs
    replays = (0, 0) if graphs is None else (graphs.decode.replays, graphs.mixed.replays)
    del engine, executor, graphs
    _release()
    return finals, replays


def test_the_engine_generates_the_same_tokens_with_mixed_graphs(tiny_gpu_artifact):
    """Continuous batching (interpreted on a CPU: few, short requests): prompts of 5 and 17 tokens
    prefill together (22 tokens: the mixed pair (32, 4)); then their decodes run beside the 30-token
    prompt of a third request (32 tokens over 3 sequences: the pair (32, 4), whose padding sequence
    is empty); then that request decodes alone (a decode graph). The greedy tokens equal those of
    the eager executor."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (5, 17, 30)]
    (eager, no_replays), (graphs, replays) = (_engine_tokens(tiny_gpu_artifact, enforce_eager, prompts, 2)
                                              for enforce_eager in (True, False))
    assert no_replays == (0, 0) and replays == (1, 2)
    assert graphs == eager and all(len(t) == 2 for t in eager.values())


@pytest.mark.gpu
def test_the_engine_generates_the_same_tokens_from_cuda_graphs(tiny_gpu_artifact):
    """Continuous batching on the GPU, 6 requests arriving over several steps (decode batches of
    changing sizes, mixed steps between them): the greedy tokens with CUDA graphs equal the eager
    executor's, and both decode and mixed steps did replay graphs."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (5, 17, 3, 30, 9, 12)]
    (eager, _), (graphs, (decode_replays, mixed_replays)) = (
        _engine_tokens(tiny_gpu_artifact, enforce_eager, prompts, 12) for enforce_eager in (True, False))
    assert decode_replays > 0 and mixed_replays > 0
    assert graphs == eager and all(len(t) == 12 for t in eager.values())


def test_mixed_buckets_cover_the_token_budget_and_the_decode_batches():
    """Token buckets: powers of two from 16, then max_num_batched_tokens; sequence buckets: powers
    of two up to the largest decode bucket, then one more; pairs a step can reach (B <= T)."""
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(100) == [16, 32, 64, 100] and token_buckets(8) == [8]
    assert sequence_buckets(capture_sizes(256)[-1]) == [2, 4, 8, 16, 32, 64, 128, 256, 257]
    assert sequence_buckets(8) == [2, 4, 8, 9] and sequence_buckets(20) == [2, 4, 8, 16, 21] and sequence_buckets(1) == [2]
    assert mixed_buckets([16, 32], [2, 4, 8, 16, 32, 33]) == [(16, 2), (16, 4), (16, 8), (16, 16),
                                                             (32, 2), (32, 4), (32, 8), (32, 16), (32, 32)]
    assert len(mixed_buckets(token_buckets(2048), sequence_buckets(256))) == 57  # SmolLM2 at the defaults
    assert padding_counts(3, 7).tolist() == [5, 1, 1] and padding_counts(3, 1).tolist() == [1, 0, 0]
    assert padding_counts(2, 0).tolist() == [0, 0] and padding_counts(0, 0).tolist() == []
    with pytest.raises(ValueError):
        padding_counts(0, 3)


def _fake_mixed_program(seen: list):
    """A mixed program that launches by T and B only; records its inputs (copies) in `seen` and
    returns, per row, (seq_len, logits index, input id at that index, position there)."""

    def run(inputs: dict, launcher) -> torch.Tensor:
        tokens, seqs = inputs["input_ids"].shape[0], inputs["seq_lens"].shape[0]
        launcher.launch("gemm", (tokens,), inputs["input_ids"])
        launcher.launch("attention", (tokens // 4 + seqs,), inputs["query_start"], inputs["block_tables"])
        launcher.launch("logits", (seqs,), inputs["logits_indices"])
        seen.append({name: value.clone() for name, value in inputs.items()})
        rows = inputs["logits_indices"].long()
        return torch.stack([inputs["seq_lens"], rows, inputs["input_ids"][rows], inputs["positions"][rows]], 1)

    return run


def test_mixed_steps_pad_to_token_and_sequence_buckets():
    """Steps of T tokens over B sequences replay (smallest token bucket >= T, smallest sequence
    bucket >= B + 1 if tokens are padded, else >= B) with the padding laid out as a prompt of its
    own per padding sequence (positions 0.., slot -1, block-table row 0, logits at its last token),
    empty padding sequences past the padding tokens, and every row of the previous, larger step
    reset; the logits of the real rows come back. Steps past the largest buckets, or asking for a
    context, do not replay."""
    seen: list = []
    launcher = _FakeLauncher()
    graphs = MixedGraphs(_fake_mixed_program(seen), launcher, [16, 32], [2, 4, 5], max_model_len=64, block_size=4,
                         capture=False)
    assert launcher.launched == [] and sorted(graphs.plans) == [(16, 2), (16, 4), (16, 5), (32, 2), (32, 4), (32, 5)]
    assert graphs.graph_keys == [(32, 5), (32, 4), (32, 2), (16, 5), (16, 4), (16, 2)]  # shapes differ: no sharing
    seen.clear()
    pages = PagedSequences(64, block_size=4, seed=1)
    pages.step([("a", [1] * 9), ("b", [1] * 3)])
    steps = [([("a", [7]), ("b", [8]), ("c", [9] * 7)], (16, 4)),  # T 9 B 3: one padding sequence of 7 tokens
             ([("b", [6]), ("d", [5] * 29), ("a", [6] * 2)], (32, 4)),  # T 32 = the bound: an empty padding sequence
             ([("c", [4]), ("e", [3] * 14)], (16, 4)),  # T 15, B 2: padding 1 token, 2 sequences: one empty
             ([("a", [2]), ("b", [2]), ("c", [2]), ("d", [2]), ("e", [2] * 5)], None)]  # B 5 + 1 > 5: eager
    for chunks, key in steps:
        batch = StepBatch(**pages.step(chunks), num_decodes=sum(len(tokens) == 1 for _, tokens in chunks))
        assert graphs.fits(batch) == (key is not None)
        if key is None:
            continue
        logits = graphs.execute(batch)
        assert graphs.last_key == key and [launch[:2] for launch in launcher.launched[-3:]] == [
            ("gemm", (key[0],)), ("attention", (key[0] // 4 + key[1],)), ("logits", (key[1],))]
        inputs = seen[-1]
        b, t = batch.num_seqs, batch.num_tokens
        for name, value in batch.inputs().items():  # the real rows as given
            rows = inputs[name][: value.shape[0]]
            assert torch.equal(rows[:, : value.shape[1]] if rows.dim() == 2 else rows, value), name
        counts = padding_counts(key[1] - b, key[0] - t)
        ends = t + counts.cumsum(0)
        assert inputs["query_start"][b + 1:].tolist() == ends.tolist()
        assert inputs["seq_lens"][b:].tolist() == counts.tolist()
        assert inputs["logits_indices"][b:].tolist() == (ends - 1).tolist()
        assert (inputs["slot_mapping"][t:] == -1).all() and (inputs["input_ids"][t:] == 0).all()
        first = int(counts[0])
        assert inputs["positions"][t: t + first].tolist() == list(range(first))
        assert (inputs["positions"][t + first:] == 0).all()
        assert (inputs["block_tables"][b:, 0] == 0).all() and (inputs["block_tables"][b, : -(-first // 4)] == 0).all()
        last = batch.logits_indices.long()
        wanted = torch.stack([batch.seq_lens, batch.logits_indices, batch.input_ids[last], batch.positions[last]], 1)
        assert torch.equal(logits, wanted)
    too_long = StepBatch(**pages.step([("f", [1] * 33)]), num_decodes=0)
    assert not graphs.fits(too_long)

    def asks_a_context(inputs, launcher):
        launcher.max_context(inputs["seq_lens"])
        return _fake_program(inputs, launcher)

    step_graphs = StepGraphs(_fake_program, asks_a_context, launcher, max_num_seqs=4, max_num_batched_tokens=32,
                             max_model_len=64, block_size=4, capture=False)
    assert step_graphs.mixed is None and step_graphs.family(too_long) is None
    decode = StepBatch(**pages.step([("a", [1]), ("b", [1])]), num_decodes=2)
    assert step_graphs.family(decode) is step_graphs.decode


def _mixed_steps() -> list[StepBatch]:
    """Mixed steps over sequences whose earlier keys and values are the random cache contents that
    `_run_steps` writes (a, b, c were never run): decodes of a (context 40) and b (300) beside a
    10-token chunk of c; two prefills (d's 9-token prompt, c's next 14-token chunk); decodes of a
    and b beside d's 30-token chunk: T = 32, at a bucket bound; decodes of 8 sequences beside a
    2-token chunk: 9 + 1 sequences, past the largest sequence bucket."""
    pages = PagedSequences(96, block_size=16, seed=4)
    generator = torch.Generator().manual_seed(6)
    tokens = lambda n: torch.randint(0, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    pages.step([("a", [0] * 40), ("b", [0] * 300), ("c", [0] * 20), *((f"s{i}", [0] * 5) for i in range(6))])
    steps = [[("a", tokens(1)), ("b", tokens(1)), ("c", tokens(10))],
             [("d", tokens(9)), ("c", tokens(14))],
             [("a", tokens(1)), ("b", tokens(1)), ("d", tokens(30))],
             [("a", tokens(1)), ("b", tokens(1)), *((f"s{i}", tokens(1)) for i in range(6)), ("c", tokens(2))]]
    return [StepBatch(**pages.step(chunks), num_decodes=sum(len(t) == 1 for _, t in chunks)) for chunks in steps]


def _written_slots(before: dict, after: dict) -> set[int]:
    """The KV slots (block * block_size + offset) whose keys or values a step changed."""
    changed = set()
    for name, cache in after.items():
        rows = (cache != before[name]).reshape(cache.shape[0] * cache.shape[1], -1).any(1)
        changed |= set(rows.nonzero().flatten().tolist())
    return changed


def test_mixed_buckets_replay_like_eager_steps(tiny_gpu_artifact):
    """Mixed steps of 12 tokens over 3 sequences (pair (16, 4): a padding prompt of 4 tokens), 23
    over 2 (two prefills: (32, 4), padding prompts of 8 and 1 tokens) and 32 over 3 (T at the
    bucket bound: (32, 4), an empty padding sequence) give the eager executor's greedy tokens and
    logits within bf16 noise, and write the KV cache exactly at their real tokens' slots (the
    padding writes nothing), as close to the eager cache as the logits; a step of 10 sequences
    (past the largest sequence bucket, 9) runs eagerly."""
    batches = _mixed_steps()
    (wanted, wanted_caches), (gotten, gotten_caches) = ([], []), ([], [])
    (wanted, no_graphs), (gotten, graphs) = (_run_steps(tiny_gpu_artifact, eager, batches, caches)
                                             for eager, caches in ((True, wanted_caches), (False, gotten_caches)))
    assert no_graphs is None
    assert graphs["replayed"] == [("mixed", (16, 4)), ("mixed", (32, 4)), ("mixed", (32, 4)), None]
    assert graphs["mixed_replays"] == 3 and graphs["replays"] == 0
    assert sorted(graphs["mixed_plans"]) == [(t, s) for t in (16, 32, 64, 128) for s in (2, 4, 8, 9)]
    assert graphs["mixed_captured"] == (sorted(graphs["mixed_plans"]) if torch.cuda.is_available() else [])
    for number, (batch, got, want) in enumerate(zip(batches, gotten, wanted)):
        assert got.shape == want.shape == (batch.num_seqs, VOCAB) and got.dtype == torch.float32
        assert (got.argmax(-1) == want.argmax(-1)).all(), f"step {number}: greedy tokens differ"
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item(), msg=f"step {number}")
        slots = set(batch.slot_mapping.tolist())
        for caches in (gotten_caches, wanted_caches):
            assert _written_slots(caches[number], caches[number + 1]) == slots, f"step {number}"
        for name, cache in gotten_caches[number + 1].items():
            want_cache = wanted_caches[number + 1][name].float()
            torch.testing.assert_close(cache.float(), want_cache, rtol=0, atol=0.02 * want_cache.abs().max().item())
