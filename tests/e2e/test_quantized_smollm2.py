"""SmolLM2-135M-Instruct's GGUF (Q4_1, with Q8_0 tensors) compiled for the `cpu` target with its
weights kept quantized (the default) against the same file compiled with `dequantize=True` (dense
fp32, the values the quantized codes stand for): the mean per-token log-likelihood of a fixed
~2k-token text (tests/data/loglik_text.txt, original prose) agrees within 1%. Batch-1 decode steps
multiply int16 activations by default (runtime/cpu_quant.py): read token by token, the text's
log-likelihoods agree with fp32 activations' (`--quant-activations fp32`) far within that.

The greedy chat answer of the kept-quantized model ("The capital of France is Paris.") is checked
by tests/e2e/test_smollm2.py::test_llm_api_greedy_equals_transformers: it serves the default
compile of smollm2-135m, which `test_default_compile_keeps_gguf_weights_quantized` shows is the
kept-quantized one, token for token against transformers (dequantized fp32).
"""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from kiln.compile_cache import CompileOptions, compile_cached
from kiln.runtime.artifact import load_artifact
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.step_batch import StepBatch

TEXT = Path(__file__).resolve().parents[1] / "data" / "loglik_text.txt"
CHUNK = 512  # tokens per mixed step
MAX_LEN = 2048  # the text's tokens fit
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts() -> dict[str, Path]:
    """The two compiles through the session's compile cache (test_smollm2's kiln.LLM("smollm2-135m")
    compiles the same default one)."""
    return {name: compile_cached("smollm2-135m", CompileOptions(target="cpu", dequantize=dequantize),
                                 progress=False).artifact
            for name, dequantize in (("quantized", False), ("dequantized", True))}


@pytest.fixture(scope="module")
def text_ids(artifacts) -> list[int]:
    tokenizer = Tokenizer.from_file(str(artifacts["quantized"] / "tokenizer.json"))
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert 1500 <= len(ids) <= MAX_LEN, len(ids)
    return ids


def text_batch(ids: list[int], start: int, end: int, block_size: int) -> StepBatch:
    """One sequence's tokens [start, end) after `start` cached ones, KV block b in physical block b,
    logits for every one of its tokens (a decode step when it is one token)."""
    positions = torch.arange(start, end, dtype=torch.int32)
    blocks = math.ceil(end / block_size)
    return StepBatch(input_ids=torch.tensor(ids[start:end], dtype=torch.int32), positions=positions,
                     query_start=torch.tensor([0, end - start], dtype=torch.int32),
                     seq_lens=torch.tensor([end], dtype=torch.int32),
                     block_tables=torch.arange(blocks, dtype=torch.int32)[None], slot_mapping=positions,
                     logits_indices=torch.arange(end - start, dtype=torch.int32), num_decodes=int(end - start == 1))


def decode_log_likelihoods(artifact: Path, ids: list[int]) -> torch.Tensor:
    """log P(ids[p + 1] | ids[:p + 1]) for each p, the text fed one token per batch-1 decode step
    (the step graph's path): float64 [len(ids) - 1]."""
    executor = CpuExecutor(load_artifact(artifact), kv_cache_memory=32 << 20, max_model_len=256)
    out = []
    for p in range(len(ids) - 1):
        logits = executor.execute(text_batch(ids, p, p + 1, executor.block_size))[0].double()
        out.append(float(torch.log_softmax(logits, dim=-1)[ids[p + 1]]))
    return torch.tensor(out, dtype=torch.float64)


def mean_log_likelihood(artifact: Path, ids: list[int]) -> float:
    """Mean over positions p of log P(ids[p + 1] | ids[:p + 1]) under the artifact's cpu executor,
    the text read in chunks of CHUNK tokens through the paged KV cache."""
    executor = CpuExecutor(load_artifact(artifact), kv_cache_memory=160 << 20, max_model_len=MAX_LEN)
    total = 0.0
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids))
        logits = executor.execute(text_batch(ids, start, end, executor.block_size))  # [end - start, vocab]
        targets = torch.tensor(ids[start + 1:end + 1])  # the last token has no successor
        log_probs = torch.log_softmax(logits[:len(targets)].double(), dim=-1)
        total += float(log_probs.gather(1, targets[:, None]).sum())
    return total / (len(ids) - 1)


def test_default_compile_keeps_gguf_weights_quantized(artifacts):
    quantized = load_artifact(artifacts["quantized"], check_hashes=False).manifest.quantized_weights
    assert {"int4-g32-f16", "int8-g32-f16"} <= set(quantized.values())  # Q4_1 and Q8_0 tensors
    assert not load_artifact(artifacts["dequantized"], check_hashes=False).manifest.quantized_weights


def test_log_likelihood_within_one_percent_of_dequantized(artifacts, text_ids):
    got = {name: mean_log_likelihood(path, text_ids) for name, path in artifacts.items()}
    print(f"\nmean log-likelihood per token over {len(text_ids)} tokens: {got} "
          f"(perplexity {math.exp(-got['dequantized']):.2f})")
    assert got["dequantized"] > -4.0, "the model should read ordinary prose with perplexity < 55"
    assert abs(got["quantized"] - got["dequantized"]) <= 0.01 * abs(got["dequantized"])


def test_int16_decode_activations_match_fp32(text_ids):
    """The default int16 activations against exact fp32 ones over 160 batch-1 decode steps."""
    ids = text_ids[:161]
    got = {mode: decode_log_likelihoods(compile_cached("smollm2-135m", CompileOptions(
        target="cpu", quant_activations=mode), progress=False).artifact, ids) for mode in ("int16", "fp32")}
    delta = (got["int16"] - got["fp32"]).abs()
    print(f"\nint16 vs fp32 activations: per-token log-likelihood |delta| max {delta.max():.2e}, "
          f"mean {delta.mean():.2e}; means {got['int16'].mean():.4f} / {got['fp32'].mean():.4f}")
    assert delta.max() < 1e-2 and delta.mean() < 1e-3
