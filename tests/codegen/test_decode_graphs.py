"""Decode steps replayed per batch-size bucket (runtime/cuda_graphs.py) against the eager GPU
executor, on a tiny random Llama: on a GPU with real CUDA graphs (this GPU's target), on a CPU
with the same static buffers, padding and fixed split-K, interpreted (the b200 target). One
executor lives at a time: on a GPU each sizes its KV cache from the memory left free."""

import gc

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from kiln.compiler import CompileOptions, compile_model
from kiln.ir.step import PagedSequences
from kiln.llm import local_target
from kiln.runtime.artifact import load_artifact
from kiln.runtime.cuda_graphs import capture_sizes
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


def _bucket_steps() -> list[StepBatch]:
    """A prefill of 4 prompts, then decode steps of 4, 3 and 2 of those sequences."""
    pages = PagedSequences(64, block_size=16, seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [(seq, torch.randint(0, VOCAB, (n,), generator=generator).tolist())
               for seq, n in (("a", 70), ("b", 20), ("c", 5), ("d", 7))]
    steps = [prompts, [(seq, [11]) for seq in "abcd"], [(seq, [12]) for seq in "abc"], [("d", [13]), ("b", [14])]]
    return [StepBatch(**pages.step(chunks), num_decodes=0 if number == 0 else len(chunks))
            for number, chunks in enumerate(steps)]


def _run_steps(artifact, enforce_eager: bool, batches: list[StepBatch]) -> tuple[list[torch.Tensor], dict | None]:
    """The logits of `batches` on a fresh executor (freed after), and its decode graphs' bucket
    sizes, captured sizes and replays (None without graphs)."""
    executor = _executor(artifact, enforce_eager)
    assert executor.num_blocks >= 64
    logits = [executor.execute(batch).cpu() for batch in batches]
    graphs = executor.graphs and {"sizes": executor.graphs.sizes, "captured": sorted(executor.graphs._graphs),
                                  "replays": executor.graphs.replays}
    del executor
    _release()
    return logits, graphs


def test_decode_buckets_replay_like_eager_steps(tiny_gpu_artifact):
    """Decode steps of 4, 3 and 2 sequences replay buckets 4, 4 and 2 (split-K sized for a
    1024-token context); their logits equal the eager executor's within bf16 noise, with the same
    greedy tokens. Step 2 pads row 3, which step 1 gave to sequence d: were the padding's KV slot
    not reset to -1, d's last key and value would be overwritten, and step 3 would differ."""
    batches = _bucket_steps()
    (wanted, no_graphs), (gotten, graphs) = (_run_steps(tiny_gpu_artifact, eager, batches) for eager in (True, False))
    assert no_graphs is None and graphs["sizes"] == [1, 2, 4, 8]
    assert graphs["captured"] == ([1, 2, 4, 8] if torch.cuda.is_available() else [])  # captured on a GPU only
    for number, (batch, got, want) in enumerate(zip(batches, gotten, wanted)):
        assert got.shape == want.shape == (batch.num_seqs, VOCAB) and got.dtype == torch.float32
        assert (got.argmax(-1) == want.argmax(-1)).all(), f"step {number}: greedy tokens differ"
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item(), msg=f"step {number}")
    assert graphs["replays"] == 3


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
