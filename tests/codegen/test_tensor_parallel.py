"""Tensor-parallel artifacts (`kiln compile --tp N`): a tiny Llama and Qwen3 compiled for `cpu`
with tp 2 hold one weights file per rank (rank r's shards of the weights), and their generated
programs, run for both ranks in this process (one thread each, joined by a thread communicator),
give the tp-1 artifact's logits and greedy tokens over a prefill and decode steps; the GPU
programs call the same collectives for every GPU target (and, interpreted, give the unsharded
logits); the artifact refuses a rank it has no weights for and an edited or missing rank file."""

import gc
import importlib.util
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch
import torch
import transformers

from kiln.codegen.cpu import lay_out_weights
from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.kernel_check import kernel_check, kernel_refusal
from kiln.codegen.targets import TARGETS, get_target
from kiln.compiler import CompileOptions, compile_model
from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint
from kiln.frontend.tracer import StepConfig, trace
from kiln.frontend.weights import load_weights, random_weights
from kiln.ir import interpret
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline, shard, shard_weights
from kiln.runtime import kv_groups
from kiln.runtime.artifact import PHASES, load_artifact
from kiln.runtime.executor import import_program
from kiln.runtime.gpu_executor import GpuExecutor
from kiln.runtime.launcher import Launcher
from kiln.runtime.manifest import DIGEST_FIELD, manifest_digest
from kiln.runtime.step_batch import StepBatch

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails, interpreted
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
}
PROMPTS = {"a": [3, 17, 5, 200, 9, 41, 8, 8, 120, 7, 66, 1, 2, 3, 4, 5, 6, 7], "b": [250, 4, 99]}


class ThreadGroup:
    """`size` ranks, one thread each, in this process: `comm(rank)` is rank `rank`'s communicator,
    the kiln.runtime.collectives.Comm contract over shared slots and a barrier. One group per
    step (`run_ranks`)."""

    def __init__(self, size: int):
        self.size, self.slots, self.exchanges = size, [None] * size, 0
        self.barrier = threading.Barrier(size, timeout=60)  # a rank that fails breaks it: no hang

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Copies of every rank's `x`, in rank order, once all have given theirs (a rank may reuse
        its `x`'s buffer as soon as it returns: the next sum of squares of a layer's k norm does)."""
        self.exchanges += rank == 0
        self.slots[rank] = x
        self.barrier.wait()
        values = [v.clone() for v in self.slots]
        self.barrier.wait()  # no rank overwrites its slot before every rank has read them all
        return values

    def comm(self, rank: int) -> "ThreadComm":
        return ThreadComm(self, rank)


def run_ranks(size: int, work, group: ThreadGroup | None = None) -> list:
    """`work(rank, comm)` on `size` ranks at once, a thread each, `comm` the rank's communicator of
    `group` (default: a new ThreadGroup); each rank's result, in rank order."""
    group = group or ThreadGroup(size)
    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(work, rank, group.comm(rank)) for rank in range(size)]
        return [future.result() for future in futures]


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        values = self.group.exchange(self.rank, x)
        return torch.stack([v.float() for v in values]).sum(0).to(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, x), dim=dim)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each MODELS entry saved by transformers with random weights (seed 0)."""
    paths = {}
    for name, (config_class, extra) in MODELS.items():
        torch.manual_seed(0)
        paths[name] = tmp_path_factory.mktemp(name)
        model_class = getattr(transformers, config_class.__name__.replace("Config", "ForCausalLM"))
        model_class(config_class(**TINY, **extra)).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    """(model, tp) -> the model's cpu artifact at that degree (1 and 2)."""
    out = tmp_path_factory.mktemp("tp-artifacts")
    return {(name, tp): compile_model(str(path), out / f"{name}-tp{tp}", CompileOptions(target="cpu", tp=tp),
                                      progress=False).artifact
            for name, path in checkpoints.items() for tp in (1, 2)}


class CpuRanks:
    """A cpu artifact's programs, weights and KV caches for each of its ranks."""

    def __init__(self, path, num_blocks: int = 16):
        artifact = load_artifact(path)
        self.tp = artifact.tensor_parallel
        self.programs = {phase: import_program(artifact, phase) for phase in PHASES}
        self.weights = [safetensors.torch.load_file(artifact.weights_file(rank)) for rank in range(self.tp)]
        groups = kv_groups.manifest_groups(artifact.manifest)
        self.states = [kv_groups.allocate_kv_states(groups, num_blocks, "cpu") for _ in range(self.tp)]

    def step(self, inputs: dict, decode: bool) -> list[torch.Tensor]:
        """Each rank's logits of one step (the ranks at once, on threads)."""
        program = self.programs["decode" if decode else "mixed"]
        return run_ranks(self.tp, lambda rank, comm: program.step(inputs, self.weights[rank], self.states[rank],
                                                                  comm)["logits"])


def _greedy_run(ranks: CpuRanks, steps: int) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """A prefill of PROMPTS, then `steps` decode steps on the greedy tokens: each step's logits per
    rank, and each step's tokens (rank 0's argmax)."""
    pages = PagedSequences(num_blocks=16, block_size=16, seed=1)
    inputs, logits, tokens = pages.step(list(PROMPTS.items())), [], []
    for step in range(steps + 1):
        logits.append(ranks.step(inputs, decode=step > 0))
        tokens.append(logits[-1][0].argmax(-1).tolist())
        inputs = pages.step([(seq, [token]) for seq, token in zip(PROMPTS, tokens[-1])])
    return logits, tokens


@pytest.mark.parametrize("model", list(MODELS))
def test_the_ranks_of_a_tp2_cpu_artifact_give_the_tp1_logits_and_tokens(artifacts, model):
    whole, sharded = CpuRanks(artifacts[model, 1]), CpuRanks(artifacts[model, 2])
    assert sharded.tp == 2 and len(sharded.weights) == 2
    want_logits, want_tokens = _greedy_run(whole, steps=3)
    got_logits, got_tokens = _greedy_run(sharded, steps=3)
    assert got_tokens == want_tokens
    for step, ((want, *_), (rank0, rank1)) in enumerate(zip(want_logits, got_logits)):
        assert rank0.shape == want.shape == (len(PROMPTS), TINY["vocab_size"])
        assert (rank0 - want).abs().max() <= 2e-5 * want.abs().max(), f"step {step}"
        assert torch.equal(rank0, rank1), f"step {step}: the ranks gathered different logits"


def test_a_tp2_artifact_holds_each_ranks_shards_and_per_rank_caches(artifacts, checkpoints):
    path = artifacts["llama", 2]
    artifact = load_artifact(path)
    manifest = artifact.manifest
    assert manifest.tensor_parallel == 2 and manifest.weight_files == ("weights.rank0.safetensors",
                                                                       "weights.rank1.safetensors")
    assert set(manifest.weight_files) <= set(manifest.files) and "weights.safetensors" not in manifest.files
    (group,) = manifest.groups
    assert all(page == (16, 1, 16) for page in group.pages)  # each rank caches 1 of the 2 KV heads
    whole_group = load_artifact(artifacts["llama", 1]).manifest.groups[0]
    assert group.bytes_per_token * 2 == whole_group.bytes_per_token
    for phase in PHASES:
        program = (path / f"program.{phase}.py").read_text()
        assert "def step(inputs, weights, states, comm=None):" in program
        assert program.count("comm.all_reduce(") == 1 + 2 * TINY["num_hidden_layers"]  # embedding; o, down a layer
        assert program.count("comm.all_gather(") == 1  # the logits' vocabulary slices
    ckpt = load_checkpoint(str(checkpoints["llama"]), progress=False)
    spec = build_spec(ckpt.config)
    graph = shard(trace(spec, StepConfig(dtype="f32")), 2)
    phases, _ = run_pipeline(graph, PipelineOptions(phases=PHASES))
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
    for rank in range(2):
        ranked = shard_weights(graph, weights, rank)
        want = lay_out_weights(phases.values(), {name: w for g in phases.values()
                                                 for name, w in materialize_weights(g, ranked).items()})
        got = safetensors.torch.load_file(artifact.weights_file(rank))
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (rank, name)
    assert int(got["model.embed_tokens.weight.vocab_start"]) == TINY["vocab_size"] // 2  # rank 1's first row


def test_tp1_artifacts_keep_one_weights_file_and_programs_ignore_comm(artifacts):
    artifact = load_artifact(artifacts["llama", 1])
    assert artifact.tensor_parallel == 1 and artifact.weights_file() == artifact.path / "weights.safetensors"
    assert artifact.weights_file(0) == artifact.weights_file()
    program = (artifact.path / "program.mixed.py").read_text()
    assert "def step(inputs, weights, states, comm=None):" in program and "comm." not in program


@pytest.mark.parametrize("rank", [-1, 2, 1.0])
def test_a_rank_outside_the_degree_is_refused(artifacts, rank):
    artifact = load_artifact(artifacts["llama", 2], check_hashes=False)
    with pytest.raises(KilnError, match=r"weights of 2 tensor-parallel rank\(s\), 0 to 1, not of rank .*run it with "
                                        r"--tp 2"):
        artifact.weights_file(rank)
    with pytest.raises(KilnError, match="not of rank 1: run it with --tp 1"):
        load_artifact(artifacts["llama", 1], check_hashes=False).weights_file(1)


def test_an_edited_or_missing_rank_weights_file_is_refused(artifacts, tmp_path):
    edited = shutil.copytree(artifacts["llama", 2], tmp_path / "edited")
    with open(edited / "weights.rank1.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(KilnError, match="weights.rank1.safetensors does not match its hash.*recompile"):
        load_artifact(edited)
    in_background = load_artifact(edited, weights_in_background=True)
    with pytest.raises(KilnError, match="weights.rank1.safetensors does not match its hash"):
        in_background.wait_verified()
    missing = shutil.copytree(artifacts["llama", 2], tmp_path / "missing")
    (missing / "weights.rank0.safetensors").unlink()
    with pytest.raises(KilnError, match="weights.rank0.safetensors is missing; recompile"):
        load_artifact(missing)


@pytest.mark.parametrize("degree, lacking", [(3, "weights.rank2.safetensors"), (1, "weights.safetensors")])
def test_a_degree_edited_into_the_manifest_is_refused_even_resealed(artifacts, tmp_path, degree, lacking):
    edited = shutil.copytree(artifacts["llama", 2], tmp_path / "edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["tensor_parallel"] = degree
    manifest[DIGEST_FIELD] = manifest_digest(manifest)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KilnError, match=f"tensor_parallel is {degree}, but the artifact does not hold {lacking}"):
        load_artifact(edited)


# -- GPU targets ----------------------------------------------------------------------------------

GPU_TARGETS = [name for name, target in TARGETS.items() if target.is_gpu]


def _config(family: str) -> dict:
    """The tiny llama of MODELS, or an OLMo2 or a Qwen3-Next (a Gated DeltaNet layer, then a full
    attention layer) of the same sizes."""
    if family == "olmo2":
        return {**transformers.Olmo2Config(**TINY).to_dict(), "architectures": ["Olmo2ForCausalLM"]}
    if family == "qwen3_next":
        config = transformers.Qwen3NextConfig(**TINY, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                              linear_value_head_dim=16, linear_conv_kernel_dim=4, mlp_only_layers=[0, 1])
        return {**config.to_dict(), "architectures": ["Qwen3NextForCausalLM"]}
    config_class, extra = MODELS["llama"]
    return {**config_class(**TINY, **extra).to_dict(), "architectures": ["LlamaForCausalLM"]}


@pytest.mark.parametrize("family, tp", [("llama", 2), ("llama", 4), ("olmo2", 2), ("qwen3_next", 2)])
def test_a_sharded_tiny_model_renders_for_every_gpu_target_with_its_collectives(family, tp):
    """Rendering only: the kernels are the kinds of a tp-1 model at smaller sizes (tests/kernels
    cross-compile each kind for every arch); tests/passes/test_shard.py cross-compiles SmolLM2 at
    tp 3 for h100 through `kiln compile`. A layer sums o_proj and down_proj over the ranks, and
    OLMo2's also the squares of its q and k norms (over every head)."""
    per_layer = {"llama": 2, "olmo2": 4, "qwen3_next": 2}[family]
    graph = shard(trace(build_spec(_config(family)), StepConfig(dtype="bf16")), tp)
    for name in GPU_TARGETS:
        target = get_target(name)
        lowered, _ = run_pipeline(graph, PipelineOptions(phases=PHASES, kernel_check=kernel_check(target)))
        program = build_gpu_program(lowered, target)
        for phase, source in program.sources.items():
            assert "def step(inputs, weights, states, launcher, comm=None):" in source, (name, phase)
            assert source.count("= comm.all_reduce(") == 1 + per_layer * TINY["num_hidden_layers"], (name, phase)
            assert source.count("= comm.all_gather(") == 1, (name, phase)
        assert program.kernels, name


class _OneKernelAtATime:
    """A launcher that runs one interpreted kernel at a time (Triton's interpreter patches its
    language module while a kernel runs); the ranks' threads interleave between launches."""

    def __init__(self, launcher: Launcher, lock: threading.Lock):
        self.launcher, self.lock = launcher, lock

    def launch(self, *args):
        with self.lock:
            return self.launcher.launch(*args)

    def __getattr__(self, name: str):
        return getattr(self.launcher, name)


@pytest.mark.parametrize("family", ["llama", "olmo2", "qwen3_next"])
def test_the_ranks_gpu_programs_interpreted_give_the_unsharded_logits(tmp_path, family):
    """The GPU programs (the cpu target's small tiles, kernels under TRITON_INTERPRET) of a tp-2
    tiny Llama, OLMo2 and Qwen3-Next, both ranks on threads: the vocab-parallel embedding's row
    kernel, the GEMMs on each rank's shards, OLMo2's q/k norms split around the sum of their
    squares (its V written by a KV write of its own), Qwen3-Next's conv and gated delta rule on
    the rank's heads (its states carried from the prefill to the decode step) and the collectives
    between them give the reference interpreter's logits of the unsharded graph."""
    spec = build_spec(_config(family))
    traced = trace(spec, StepConfig(dtype="f32"))
    graph = shard(traced, 2)
    tiles = get_target("cpu")  # fusion asks it as a GPU target would (kernel_check leaves the cpu target free)
    lowered, _ = run_pipeline(graph, PipelineOptions(phases=PHASES, kernel_check=lambda body: kernel_refusal(body, tiles)))
    program = build_gpu_program(lowered, tiles)
    program.write(tmp_path)
    modules = {phase: _import(tmp_path / f"program.{phase}.py") for phase in PHASES}
    launcher = _OneKernelAtATime(Launcher(tmp_path, program.kernel_table(), "cpu"), threading.Lock())
    weights = random_weights(spec)
    ranks = [{k: v for g in lowered.values() for k, v in materialize_weights(g, shard_weights(graph, weights, r)).items()}
             for r in range(2)]
    states, whole_states = [zero_states(lowered["mixed"], 16) for _ in range(2)], zero_states(traced, 16)
    def step(phase: str, inputs: dict) -> list[torch.Tensor]:
        return run_ranks(2, lambda r, comm: modules[phase].step(inputs, ranks[r], states[r], launcher, comm)["logits"])

    pages = PagedSequences(num_blocks=16, block_size=16, seed=1)
    for phase, chunks in (("mixed", list(PROMPTS.items())), ("decode", [("a", [5]), ("b", [7])])):
        inputs = pages.step(chunks)
        got = step(phase, inputs)
        want = interpret(traced, inputs, weights, whole_states)["logits"]
        for logits in got:
            assert (logits - want).abs().max() <= 2e-5 * want.abs().max(), phase


def _import(path):
    module_spec = importlib.util.spec_from_file_location(f"kiln_tp_program_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_ranks_step_graphs_plan_without_communicating_and_replay_like_eager_steps(tmp_path):
    """Two ranks of a tp-2 GPU artifact (interpreted: the step graphs' static buffers, padding and
    buckets without the capture, which needs GPUs) build their graphs once they agree on the
    context, planning every bucket with dry runs that call no collective, then replay padded
    decode and mixed buckets whose collectives give the logits of eager steps."""
    checkpoint = tmp_path / "llama"
    torch.manual_seed(0)
    config_class, extra = MODELS["llama"]
    transformers.LlamaForCausalLM(config_class(**TINY, **extra)).save_pretrained(checkpoint)
    compile_model(str(checkpoint), tmp_path / "h100", CompileOptions(target="h100", tp=2), progress=False)
    artifact = load_artifact(tmp_path / "h100")
    group = ThreadGroup(2)

    def executors(enforce_eager: bool) -> list[GpuExecutor]:
        return [GpuExecutor(artifact, interpret=True, kv_cache_memory=4 << 20, max_model_len=128, max_num_seqs=4,
                            max_num_batched_tokens=32, enforce_eager=enforce_eager, rank=rank, comm=group.comm(rank))
                for rank in range(2)]

    graphed, eager = executors(enforce_eager=False), executors(enforce_eager=True)
    assert all(executor.graphs is None for executor in graphed)  # not before the ranks agree
    lock = threading.Lock()
    for executor in graphed + eager:
        executor.launcher = _OneKernelAtATime(executor.launcher, lock)
        executor.join_group(96)  # one rank after the other: a collective here would wait for the other forever
    assert group.exchanges == 0 and graphed[0].graphs.decode.contexts[-1] == 96
    pages = PagedSequences(num_blocks=16, block_size=16, seed=1)
    steps = [list(PROMPTS.items()), [("a", [5]), ("b", [7])], [("a", [9]), ("b", [11])], [("c", [1, 2, 3]), ("a", [4])]]
    for number, chunks in enumerate(steps):
        batch = StepBatch(**pages.step(chunks), num_decodes=len(chunks) if number in (1, 2) else 0)
        got, want = (run_ranks(2, lambda rank, comm, ranks=ranks, batch=batch: ranks[rank].execute(batch), group)
                     for ranks in (graphed, eager))
        for logits, expected in zip(got, want):
            assert logits.shape == (len(chunks), TINY["vocab_size"])
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=f"step {number}")
    assert graphed[0].graphs.decode.replays == 2 and graphed[0].graphs.mixed.replays == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: tp 2 over NCCL, one GPU a rank")
def test_two_gpu_ranks_replaying_cuda_graphs_give_the_tokens_of_one_eager_gpu(tmp_path, like_the_gpu_machine):
    """On GPUs each rank captures its NCCL collectives in its step graphs (the padded buckets of
    runtime/cuda_graphs.py): their greedy tokens are those of one GPU stepping eagerly."""
    from kiln.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams
    from tests.codegen.test_decode_graphs import word_tokenizer

    torch.manual_seed(0)
    config_class, extra = MODELS["llama"]
    with like_the_gpu_machine():
        transformers.LlamaForCausalLM(config_class(**TINY, **extra)).save_pretrained(tmp_path)
        word_tokenizer(TINY["vocab_size"]).save(str(tmp_path / "tokenizer.json"))
    options = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, progress=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def tokens(llm) -> list[list[int]]:
        return [list(out.outputs[0].token_ids) for out in llm.generate(list(PROMPTS.values()), greedy)]

    one = LLM(str(tmp_path), enforce_eager=True, gpu_memory_utilization=0.3, **options)
    expected = tokens(one)
    del one
    gc.collect()
    torch.cuda.empty_cache()  # its KV cache
    sharded = LLM(str(tmp_path), tp=2, gpu_memory_utilization=0.5, **options)
    try:
        assert tokens(sharded) == expected
    finally:
        sharded.close()
