"""`kiln compile --quant`: a tiny model's linear weights quantized at compile time, served on the
cpu target through the artifact's compiled kernels; every prompt position's logits against the
same model compiled dense, within stated error bounds."""

import pytest
import torch

from kiln.compiler import CompileOptions, compile_cached
from kiln.errors import KilnError
from kiln.runtime.artifact import load_artifact
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.step_batch import StepBatch

PROMPT = 40  # tokens, in one prefill chunk


def _prompt_logits(artifact_dir) -> torch.Tensor:
    """Logits [PROMPT, V] of every position of one random prompt, prefilled in one step."""
    executor = CpuExecutor(load_artifact(artifact_dir), kv_cache_memory=4 << 20)
    ids = torch.randint(100, 49152, (PROMPT,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    blocks = -(-PROMPT // executor.block_size)
    i32 = dict(dtype=torch.int32)
    batch = StepBatch(input_ids=ids, positions=torch.arange(PROMPT, **i32), query_start=torch.tensor([0, PROMPT], **i32),
                      seq_lens=torch.tensor([PROMPT], **i32), block_tables=torch.arange(blocks, **i32)[None],
                      slot_mapping=torch.arange(PROMPT, **i32), logits_indices=torch.arange(PROMPT, **i32),
                      num_decodes=0)
    return executor.execute(batch)


@pytest.fixture(scope="module")
def dense_logits(tiny_model_dir):
    return _prompt_logits(compile_cached(str(tiny_model_dir), CompileOptions(), progress=False).artifact)


# kind -> the largest relative error (Frobenius norm over all positions) of the logits; measured
# 0.0098 (int8, per channel), 0.078 (int4, groups of 64) and 0.044 (fp8 e4m3, per channel, converted
# in software by the cpu kernels) on the tiny model's N(0, 0.02) weights, its tied embedding / LM
# head table quantized too (int8 under int4)
BOUNDS = {"int8": 0.015, "int4": 0.12, "fp8": 0.06}


@pytest.mark.parametrize("kind", BOUNDS)
def test_quantized_logits_stay_within_bounds(kind, tiny_model_dir, dense_logits):
    summary = compile_cached(str(tiny_model_dir), CompileOptions(quant=kind), progress=False)
    manifest = load_artifact(summary.artifact).manifest
    formats = dict(manifest.quantized_weights)
    tied = formats.pop("model.embed_tokens.weight")  # the table is also the LM head's weight: int8 under int4
    assert tied.startswith("int8" if kind == "int4" else kind)
    assert formats and all(f.startswith(kind) for f in formats.values())
    assert set(manifest.cpu_kernels or {}) == {"quant", "step_ops"}
    program = (summary.artifact / "program.decode.py").read_text()
    assert "cpu_quant.linear(" in program and "cpu_ops.silu_mul(" in program and "F.silu(" not in program
    assert all(file.startswith("cpu_kernels/") for file in manifest.cpu_kernels["quant"].values())
    assert any("quantized" in line for line in summary.lines())
    logits = _prompt_logits(summary.artifact)
    error = float((logits - dense_logits).norm() / dense_logits.norm())
    assert 0 < error < BOUNDS[kind]


@pytest.mark.parametrize("target", ["a100", "mi300x"])
def test_fp8_is_refused_on_gpus_without_fp8_conversion(target, tiny_model_dir, tmp_path):
    with pytest.raises(KilnError, match=f"target {target} lacks; targets that have them: .*h100"):
        compile_cached(str(tiny_model_dir), CompileOptions(target=target, quant="fp8"), out=tmp_path / "a",
                       progress=False)
