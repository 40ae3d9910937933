"""Tensor parallelism end to end on the CPU: a tiny random Llama, Qwen3, Qwen3-MoE, OLMo2, Qwen3-Next (linear
attention) and Mamba2 (no attention at all) compiled with tp 2 and
served by two processes over gloo (rank 1 spawned by kiln) give the same greedy tokens as tp 1,
through continuous batching, and so does the Llama with --quant int4 (its weights cut still
quantized); a rank that dies is reported instead of hanging; a degree the
artifact was not compiled for is refused before any process starts."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch.distributed as dist
import transformers

from kiln.cli import main
from kiln.compile_cache import CompileOptions, compile_cached
from kiln.errors import KilnError
from kiln.llm import LLM, open_artifact, rank_setup
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tensor_parallel import start_ranks

from .conftest import TINY_QWEN3_MOE

PROMPTS = [[1, 504, 1353, 282, 1649, 314], [1, 30, 9, 77, 600, 12, 5000, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
           [1, 2]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_dir(save_tiny):
    """A 2-layer random Qwen3 (4 heads, 2 KV heads, q/k norms)."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    return save_tiny(transformers.Qwen3ForCausalLM(config), "tiny-qwen3")


@pytest.fixture(scope="module")
def olmo2_dir(save_tiny):
    """A 2-layer random OLMo2 (q/k norms over every head: each rank's sum of squares, summed)."""
    torch.manual_seed(0)
    config = transformers.Olmo2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return save_tiny(transformers.Olmo2ForCausalLM(config), "tiny-olmo2")


@pytest.fixture(scope="module")
def qwen3_moe_dir(save_tiny):
    """A 2-layer random Qwen3-MoE (8 experts, top 2)."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=49152, **TINY_QWEN3_MOE)
    return save_tiny(transformers.Qwen3MoeForCausalLM(config), "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def qwen3_next_dir(save_tiny):
    """A 3-layer random Qwen3-Next (Gated DeltaNet, gated full attention, Gated DeltaNet): its
    recurrent and conv states cut by heads, in each rank's state pool."""
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, mlp_only_layers=[0, 1, 2], max_position_embeddings=512, initializer_range=0.1)
    return save_tiny(transformers.Qwen3NextForCausalLM(config), "tiny-qwen3-next")


@pytest.fixture(scope="module")
def mamba2_dir(save_tiny):
    """A 2-layer random Mamba2 of one group (no attention: no KV cache, only each rank's state
    pool; its gated norm over every head sums its squares over the ranks)."""
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                       expand=2, state_size=16, n_groups=1, conv_kernel=4, chunk_size=32,
                                       residual_in_fp32=False, tie_word_embeddings=True)
    return save_tiny(transformers.Mamba2ForCausalLM(config), "tiny-mamba2")


def _tokens(llm: LLM) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "olmo2", "qwen3_next", "mamba2"])
def test_two_ranks_give_the_tokens_of_one(family, request):
    path = str(request.getfixturevalue({"llama": "tiny_model_dir"}.get(family, f"{family}_dir")))
    options = dict(kv_cache_memory=8 << 20, max_model_len=256, progress=False)
    expected = _tokens(LLM(path, **options))
    threads = torch.get_num_threads()
    sharded = LLM(path, tp=2, **options)
    try:
        assert sharded.artifact.tensor_parallel == 2
        assert _tokens(sharded) == expected
    finally:
        sharded.close()
    assert not dist.is_initialized() and torch.get_num_threads() == threads  # the ranks shared the cores meanwhile


def test_two_ranks_of_a_quantized_model_give_the_tokens_of_one(tiny_model_dir):
    options = dict(kv_cache_memory=8 << 20, max_model_len=256, progress=False)
    artifacts = {tp: str(compile_cached(str(tiny_model_dir), CompileOptions(target="cpu", quant="int4", tp=tp),
                                        progress=False).artifact) for tp in (1, 2)}
    expected = _tokens(LLM(artifacts[1], **options))
    sharded = LLM(artifacts[2], tp=2, **options)
    try:
        quantized = sharded.artifact.manifest.quantized_weights
        assert quantized["model.layers.0.mlp.down_proj.weight"] == "int4-g64-f16"  # 64 of 128 columns a rank
        assert _tokens(sharded) == expected
    finally:
        sharded.close()


def test_a_rank_that_dies_is_reported(tiny_model_dir):
    artifact = open_artifact(str(tiny_model_dir), target="cpu", progress=False, tp=2)
    setup = rank_setup(artifact, 2, kv_cache_memory=8 << 20, max_model_len=256, host_cache_memory=0, interpret=False,
                       enforce_eager=False, gpu_memory_utilization=0.9, max_num_seqs=8, max_num_batched_tokens=256)
    reports, threads = [], torch.get_num_threads()
    executor = start_ranks(setup, on_rank_failure=reports.append)
    try:
        executor.processes[0].kill()
        for _ in range(50):  # the watchdog polls every second
            if reports:
                break
            time.sleep(0.1)
        assert reports and "rank 1" in reports[0] and "exited" in reports[0]
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def test_kiln_generate_tp_2_prints_what_tp_1_prints(tiny_model_dir, capsys):
    args = ["generate", str(tiny_model_dir), "--prompt", "The capital of France is", "--max-tokens", "8",
            "--ignore-eos", "--max-model-len", "256", "--kv-cache-memory", "8"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert main(args + ["--tp", "2"]) == 0
    assert capsys.readouterr().out == expected and len(expected) > 8
    assert not dist.is_initialized()


def test_a_degree_the_artifact_was_not_compiled_for_is_refused(tiny_model_dir):
    artifact = open_artifact(str(tiny_model_dir), target="cpu", progress=False)
    with pytest.raises(KilnError, match="compiled for tensor-parallel degree 1"):
        rank_setup(artifact, 2, kv_cache_memory=8 << 20, max_model_len=256, host_cache_memory=0, interpret=False,
                   enforce_eager=False, gpu_memory_utilization=0.9, max_num_seqs=8, max_num_batched_tokens=256)


def test_kiln_serve_tp_2_answers_and_stops_on_ctrl_c_to_its_process_group(tiny_model_dir, tmp_path):
    """As a terminal does, Ctrl-C reaches every process of the group, rank 1 included: rank 1
    follows rank 0's shutdown, and the server exits 0 with no rank left behind."""
    from tests.server.test_cli_serve import free_port, wait_healthy

    [expected] = LLM(str(tiny_model_dir), kv_cache_memory=8 << 20, max_model_len=256, progress=False).generate(
        [PROMPTS[1]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    port, log_path = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "kiln.cli", "serve", str(tiny_model_dir), "--tp", "2", "--port", str(port),
               "--max-model-len", "256", "--kv-cache-memory", "8"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected.outputs[0].text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode == 0, log
    assert "tensor parallelism: 2 ranks (spawned here)" in log and "Traceback" not in log
    assert _group_gone(proc.pid, within=15.0), "a process of the server's group outlived it"


def _group_gone(pgid: int, within: float) -> bool:
    """Whether process group `pgid` is empty within `within` seconds (multiprocessing's resource
    tracker leaves a moment after the server)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
