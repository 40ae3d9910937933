"""CPU step graphs (runtime/cpu_graph.py): decode steps replayed from the C calls recorded at their
first run give the Python step program's logits bit for bit (the same kernels on the same
addresses), step after step as the KV cache and the block tables grow, per batch size; a program
that computes in torch (dense fp32 linears on oneDNN) is not captured and runs as Python; a step a
kernel refuses in the replay (a negative slot) runs as Python, which handles it."""

import logging

import pytest
import torch

from kiln.compiler import CompileOptions, compile_cached
from kiln.runtime import cpu_graph
from kiln.runtime.artifact import load_artifact
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.step_batch import StepBatch

I32 = dict(dtype=torch.int32)
PROMPTS = (13, 5, 22)  # tokens of each sequence's prompt


def _executors(artifact) -> tuple[CpuExecutor, CpuExecutor]:
    """Two executors of `artifact`: the first replays decode steps from graphs, the second runs
    every step as Python."""
    graphed, eager = (CpuExecutor(load_artifact(artifact), kv_cache_memory=4 << 20, max_model_len=256)
                      for _ in range(2))
    eager.graphs = None
    return graphed, eager


def _prefill(lengths: tuple[int, ...], block_size: int, blocks_per_seq: int) -> StepBatch:
    """One mixed step prefilling random prompts of `lengths`; sequence i owns pages i * blocks_per_seq.."""
    ids = torch.randint(100, 49152, (sum(lengths),), generator=torch.Generator().manual_seed(1), **I32)
    positions = torch.cat([torch.arange(n, **I32) for n in lengths])
    owner = torch.cat([torch.full((n,), i, **I32) for i, n in enumerate(lengths)])
    starts = torch.tensor([0, *lengths], **I32).cumsum(0, **I32)
    return StepBatch(input_ids=ids, positions=positions, query_start=starts, seq_lens=torch.tensor(lengths, **I32),
                     block_tables=_tables(len(lengths), blocks_per_seq, lengths, block_size),
                     slot_mapping=owner * blocks_per_seq * block_size + positions, logits_indices=starts[1:] - 1,
                     num_decodes=0)


def _tables(seqs: int, blocks_per_seq: int, lengths, block_size: int) -> torch.Tensor:
    """Block tables as wide as the longest sequence needs (they widen as contexts grow)."""
    width = -(-max(lengths) // block_size)
    return (torch.arange(seqs, **I32)[:, None] * blocks_per_seq + torch.arange(width, **I32))


def _decode(tokens: list[int], lengths: list[int], block_size: int, blocks_per_seq: int) -> StepBatch:
    """One decode step: sequence i's token tokens[i] at position lengths[i] - 1."""
    seqs = len(tokens)
    positions = torch.tensor(lengths, **I32) - 1
    return StepBatch(input_ids=torch.tensor(tokens, **I32), positions=positions,
                     query_start=torch.arange(seqs + 1, **I32), seq_lens=torch.tensor(lengths, **I32),
                     block_tables=_tables(seqs, blocks_per_seq, lengths, block_size),
                     slot_mapping=torch.arange(seqs, **I32) * blocks_per_seq * block_size + positions,
                     logits_indices=torch.arange(seqs, **I32), num_decodes=seqs)


def _count_python_steps(executor: CpuExecutor) -> list[int]:
    """A counter of the decode program's runs (as Python, or under the recorder of a capture)."""
    program, calls = executor.programs["decode"], [0]
    step = program.step

    def counted(*args):
        calls[0] += 1
        return step(*args)

    program.step = counted
    return calls


@pytest.fixture(scope="module")
def quantized_artifact(tiny_model_dir):
    """The tiny Llama with int4 linears: every op of its decode step runs on the C kernels."""
    return compile_cached(str(tiny_model_dir), CompileOptions(quant="int4"), progress=False).artifact


@pytest.fixture(scope="module", params=["int4", "f32"])
def all_c_artifact(request, tiny_model_dir, quantized_artifact):
    """The tiny Llama with int4 linears, or dense fp32 ones (the C linear of few rows)."""
    if request.param == "int4":
        return quantized_artifact
    return compile_cached(str(tiny_model_dir), CompileOptions(), progress=False).artifact


def test_replayed_decode_steps_equal_the_python_program(all_c_artifact):
    graphed, eager = _executors(all_c_artifact)
    block_size, per_seq = graphed.block_size, 8
    python_steps = _count_python_steps(graphed)
    first = [torch.equal(*(ex.execute(_prefill(PROMPTS, block_size, per_seq)) for ex in (graphed, eager)))]
    assert first == [True]
    lengths, tokens = [n + 1 for n in PROMPTS], [7, 8, 9]
    steps = 0
    for seqs in (3, 3, 3, 1, 1, 3):  # batch 3, then 1 (a second graph), then 3 again (the first graph)
        batch = _decode(tokens[:seqs], lengths[:seqs], block_size, per_seq)
        got, want = graphed.execute(batch), eager.execute(batch)
        assert torch.equal(got, want), f"decode step {steps}"
        tokens = [int(t) for t in want.argmax(-1)] + tokens[seqs:]
        lengths = [n + 1 for n in lengths[:seqs]] + lengths[seqs:]
        steps += 1
    assert sorted(key[0][1][0] for key in graphed.graphs.graphs) == [1, 3]  # input_ids' shape per graph
    assert python_steps[0] == 2  # the two captures (each runs the program once); the other 4 steps replayed


def test_a_step_the_replay_refuses_runs_as_python(quantized_artifact):
    graphed, eager = _executors(quantized_artifact)
    block_size, per_seq = graphed.block_size, 8
    for ex in (graphed, eager):
        ex.execute(_prefill(PROMPTS[:2], block_size, per_seq))
    python_steps = _count_python_steps(graphed)
    lengths = [n + 1 for n in PROMPTS[:2]]
    batch = _decode([5, 6], lengths, block_size, per_seq)
    assert torch.equal(graphed.execute(batch), eager.execute(batch))  # captured
    lengths = [n + 1 for n in lengths]
    batch = _decode([7, 8], lengths, block_size, per_seq)
    batch.slot_mapping[1] = -1  # "do not store this token's KV": the C slots kernel refuses, Python skips it
    assert torch.equal(graphed.execute(batch), eager.execute(batch))
    assert python_steps[0] == 2  # the capture, then this step


def test_bf16_programs_are_not_captured(tiny_model_dir, caplog):
    """bf16 linears run on torch: the program cannot be replayed, and runs as Python."""
    artifact = compile_cached(str(tiny_model_dir), CompileOptions(dtype="bf16"), progress=False).artifact
    graphed, eager = _executors(artifact)
    block_size = graphed.block_size
    for ex in (graphed, eager):
        ex.execute(_prefill(PROMPTS[:1], block_size, 8))
    batch = _decode([5], [PROMPTS[0] + 1], block_size, 8)
    with caplog.at_level(logging.INFO, logger="kiln.cpu_graph"):
        assert torch.equal(graphed.execute(batch), eager.execute(batch))
    assert not graphed.graphs.capturable and not graphed.graphs.graphs
    assert "which a CPU step graph cannot replay" in caplog.text


def test_capture_refuses_torch_computation():
    a, b = torch.randn(4), torch.randn(4)

    class Program:
        @staticmethod
        def step(inputs, weights, states):
            return {"logits": inputs["input_ids"].float() + a + b}

    with pytest.raises(cpu_graph.NotCapturable, match="float"):
        cpu_graph.CpuGraph.capture(Program, {"input_ids": torch.zeros(2, **I32)}, {}, {}, 4, replay_fn=print)
    assert cpu_graph.recording is None
