"""Decode steps replayed per (batch-size bucket, context bucket) (runtime/cuda_graphs.py) against
the eager GPU executor, on a tiny random Llama: on a GPU with real CUDA graphs (this GPU's target),
on a CPU with the same static buffers, padding and bucketed split-K, interpreted (the b200 target:
148 SMs, so the model's one kv head splits its context). One executor lives at a time: on a GPU
each sizes its KV cache from the memory left free. The sharing of graphs between context buckets
is tested on a fake program."""

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
from kiln.runtime.cuda_graphs import DecodeGraphs, capture_sizes, context_buckets
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


def _run_steps(artifact, enforce_eager: bool, batches: list[StepBatch]) -> tuple[list[torch.Tensor], dict | None]:
    """The logits of `batches` on a fresh executor (freed after), and its decode graphs' buckets,
    the bucket pairs that own graphs, the captured ones, the launch plans, the pair each step
    replayed (None for an eager step) and the replays (None without graphs)."""
    executor = _executor(artifact, enforce_eager)
    assert executor.num_blocks >= 96
    generator = torch.Generator().manual_seed(5)
    for cache in executor.states.values():  # the same random keys and values for every executor
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    logits, replayed = [], []
    for batch in batches:
        replays = executor.graphs and executor.graphs.replays
        logits.append(executor.execute(batch).cpu())
        replayed.append(executor.graphs.last_key if executor.graphs and executor.graphs.replays != replays else None)
    graphs = executor.graphs and {"sizes": executor.graphs.sizes, "contexts": executor.graphs.contexts,
                                  "graph_keys": executor.graphs.graph_keys, "captured": sorted(executor.graphs._graphs),
                                  "plans": executor.graphs.plans, "replayed": replayed,
                                  "replays": executor.graphs.replays}
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
    within bf16 noise, with the same greedy tokens. Step 2 pads row 3,
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
    assert graphs["replayed"] == [None, (4, 256), (4, 256), (2, 256), (4, 1024)]
    assert graphs["replays"] == 4
    target = get_target(local_target() if torch.cuda.is_available() else "b200")
    for key in set(filter(None, graphs["replayed"])):
        size, bound = key
        wanted_splits = attention_decode.choose_num_splits(size, 1, bound, target)
        assert _attention_splits(graphs["plans"][key]) == [wanted_splits] * 2, key  # both layers
    short, long = (_attention_splits(graphs["plans"][key])[0] for key in [(4, 256), (4, 1024)])
    assert short == 1 < long  # the short context launches fewer attention programs, and no reduce


def _engine_tokens(artifact, enforce_eager: bool, prompts: list[list[int]]) -> tuple[dict, int]:
    """Greedy tokens of `prompts`, two arriving per step, on a fresh executor (freed after), and
    how many decode steps replayed graphs."""
    executor = _executor(artifact, enforce_eager)
    tokenizer = Tokenizer.from_file(str(artifact.file("tokenizer.json")))
    engine = LLMEngine(executor, tokenizer, eos_token_ids=[], max_num_seqs=8, max_num_batched_tokens=128)
    finals, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for index, prompt in pending[:2]:
            engine.add_request(str(index), prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        pending = pending[2:]
        finals.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    replays = 0 if executor.graphs is None else executor.graphs.replays
    del engine, executor
    _release()
    return finals, replays


@pytest.mark.gpu
def test_the_engine_generates_the_same_tokens_from_cuda_graphs(tiny_gpu_artifact):
    """Continuous batching on the GPU, 6 requests arriving over several steps (decode batches of
    changing sizes, mixed steps between them): the greedy tokens with CUDA graphs equal the eager
    executor's, and decode steps did replay graphs."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (5, 17, 3, 30, 9, 12)]
    (eager, _), (graphs, replays) = (_engine_tokens(tiny_gpu_artifact, enforce_eager, prompts)
                                     for enforce_eager in (True, False))
    assert replays > 0
    assert graphs == eager and all(len(t) == 12 for t in eager.values())
