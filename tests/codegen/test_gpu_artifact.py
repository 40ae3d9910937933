"""GPU artifacts: `kiln compile smollm2-135m --target b200` on this CPU machine (sm_100a binaries,
no spills, the resource table), a truncated SmolLM2 b200 artifact run through its own program with
interpreted kernels vs the cpu target's programs, the launcher's handling of compiled kernels'
arguments, the executor's refusals; and, on a GPU, the binaries loaded without recompiling (on a
random-weight model of the truncated SmolLM2's shape: the GPU machine has no shipped model)."""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from kiln.codegen.aot import cubin_arch
from kiln.compiler import CompileOptions, compile_model
from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint, save_hf_dir
from kiln.ir.step import PagedSequences
from kiln.llm import local_target
from kiln.runtime.artifact import load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.gpu_executor import GpuExecutor
from kiln.runtime.launcher import Launcher
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_batch import StepBatch

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails, interpreted
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]


@pytest.fixture(scope="module")
def smollm2_b200(tmp_path_factory):
    """The real SmolLM2-135M compiled for b200 by the CLI (no TRITON_INTERPRET: as a user runs it)."""
    out = tmp_path_factory.mktemp("smollm2") / "b200"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", "smollm2-135m", "--target", "b200",
                             "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_smollm2_compiles_for_b200_on_a_cpu_machine(smollm2_b200):
    out, stdout = smollm2_b200
    print(stdout)
    artifact = load_artifact(out)
    table = artifact.manifest["kernels"]
    assert "6.0 per decoder layer" in stdout and f"kernels: {len(table)} for sm_100a" in stdout
    assert "0 with register spills" in stdout and "regs  stack B  spill B  shared B" in stdout
    for name, entry in table.items():
        assert (out / "kernels" / f"{name}.py").is_file()
        assert entry["binary"] == "cubin" and cubin_arch((out / "binaries" / f"{name}.cubin").read_bytes()) == "sm_100a", name
        assert entry["resources"]["spill_stores"] + entry["resources"]["spill_loads"] == 0, name
        assert json.loads((out / "binaries" / f"{name}.json").read_text())["name"] == name
    kinds = {entry["kind"] for entry in table.values()}  # the GGUF's Q8_0 embedding stays quantized
    assert kinds == {"rows", "gemm", "embedding_quant", "attention_prefill", "attention_decode", "attention_reduce"}
    assert "decode_splits(" in (out / "program.decode.py").read_text()


def test_compiled_kernels_get_their_constexprs_in_signature_order(smollm2_b200):
    """The compiled path's argument assembly, checked without a GPU: Triton's launcher takes every
    argument in signature order, constexprs included."""
    out, _ = smollm2_b200
    table = load_artifact(out).manifest["kernels"]
    name = next(n for n in table if n.startswith("gemm__bf16__qint8_g32_f16__gather_rows__rms_norm"))  # the LM head
    launcher = Launcher(out, table, "cuda")  # nothing touches the device until a kernel loads its handles
    compiled = launcher._kernel(name)
    # what Triton's launcher reads of the source, from the kernel table alone (the source is not imported)
    source = (out / "kernels" / f"{name}.py").read_text()
    defined = ast.parse(source).body
    parameters = next(f for f in defined if isinstance(f, ast.FunctionDef) and f.name == name).args.args
    assert compiled.kernel.src.fn.arg_names == [a.arg for a in parameters]
    assert compiled.kernel.src.constants == {(i,): table[name]["constexprs"][a.arg] for i, a in enumerate(parameters)
                                             if a.arg in table[name]["constexprs"]}
    calls = []
    compiled.kernel = {(4, 1, 1): lambda *args: calls.append(args)}
    x, w, scales, rows, norm_weight, out_tensor = (torch.empty(1) for _ in range(6))
    compiled((4,), (x, w, scales, rows, norm_weight, out_tensor, 3))
    signature, constexprs = dict(table[name]["compiled_signature"]), table[name]["constexprs"]
    assert list(signature)[:7] == ["p_x", "p_w", "p_wscales", "p_rows", "p_kvec0", "p_out", "M"]
    assert calls == [(x, w, scales, rows, norm_weight, out_tensor, 3, *(constexprs[k] for k in list(signature)[7:]))]
    with pytest.raises(TypeError, match="takes 7 runtime arguments"):
        compiled((4,), (x, w))


@pytest.mark.parametrize("triton_first", [False, True])
def test_interpreting_is_decided_before_triton_is_imported(triton_first):
    """enable_interpreter (what --interpret calls first) switches Triton to its interpreter, or
    says how when triton was already imported compiled."""
    code = ("import triton\n" if triton_first else "") + (
        "from kiln.process import enable_interpreter\n"
        "try:\n    enable_interpreter()\nexcept Exception as e:\n    print(type(e).__name__, e); raise SystemExit\n"
        "from triton.language.standard import cdiv\nfrom triton.runtime.jit import JITFunction\n"
        "print('interpreted' if not isinstance(cdiv, JITFunction) else 'compiled')\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert ("KilnError" in out and "TRITON_INTERPRET=1" in out) if triton_first else out.strip() == "interpreted"


def test_the_gpu_executor_refuses_what_it_cannot_run(smollm2_b200, tmp_path):
    out, _ = smollm2_b200
    if not torch.cuda.is_available():
        with pytest.raises(KilnError, match="no CUDA GPU.*--interpret"):
            GpuExecutor(load_artifact(out, check_hashes=False))
    with pytest.raises(KilnError, match="gpu-memory-utilization"):
        GpuExecutor(load_artifact(out, check_hashes=False), interpret=True, gpu_memory_utilization=1.5)
    with pytest.raises(KilnError, match="raise --kv-cache-memory"):
        GpuExecutor(load_artifact(out, check_hashes=False), interpret=True, kv_cache_memory=1 << 20)


@pytest.fixture(scope="module")
def truncated_smollm2(tmp_path_factory):
    """SmolLM2-135M's real weights cut to its first layer and first 2048 vocabulary rows (the full
    30-layer model takes ~40 s per interpreted step; bench/compile.py --interpret runs it)."""
    ckpt = load_checkpoint("smollm2-135m", progress=False)
    keep = [name for name in ckpt.tensors if not name.startswith("model.layers.") or int(name.split(".")[2]) < 1]
    tensors = {name: ckpt.tensors[name] for name in keep}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:2048]
    config = {**ckpt.config, "num_hidden_layers": 1, "vocab_size": 2048}
    path = tmp_path_factory.mktemp("smollm2-1-layer")
    save_hf_dir(dataclasses.replace(ckpt, config=config, tensors=tensors), path)  # its tokenizer decodes ids < 2048
    return path


# SmolLM2-135M's shape cut to 2 layers and 2048 vocabulary rows (the GPU tests' random model)
TRUNCATED_SMOLLM2 = dict(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         max_position_embeddings=8192, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def random_truncated(tmp_path_factory, like_the_gpu_machine):
    """A Llama of the truncated SmolLM2's shape with random weights (seed 0, fp32), saved by
    transformers: what a GPU test runs, built as on the GPU machine, where no shipped model loads."""
    path = tmp_path_factory.mktemp("random-2-layers")
    torch.manual_seed(0)
    with like_the_gpu_machine():
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**TRUNCATED_SMOLLM2)).save_pretrained(path)
    return path


def _compile_artifacts(ckpt, out, names: tuple[str, ...]):
    """`ckpt` compiled into out/<name> per name: b200 (bf16), cpu-bf16, cpu-f32."""
    builds = {"b200": ("b200", "bf16"), "cpu-bf16": ("cpu", "bf16"), "cpu-f32": ("cpu", "f32")}
    for name in names:
        target, dtype = builds[name]
        compile_model(str(ckpt), out / name, CompileOptions(target=target, dtype=dtype), progress=False)
    return out


@pytest.fixture(scope="module")
def truncated_artifacts(truncated_smollm2, tmp_path_factory):
    """The truncated model compiled for b200 (bf16) and for cpu in bf16 and f32."""
    return _compile_artifacts(truncated_smollm2, tmp_path_factory.mktemp("truncated-artifacts"),
                              ("b200", "cpu-bf16", "cpu-f32"))


@pytest.fixture(scope="module")
def random_references(random_truncated, tmp_path_factory, like_the_gpu_machine):
    """The random model's cpu programs in bf16 and f32: the references of a GPU run."""
    with like_the_gpu_machine():
        return _compile_artifacts(random_truncated, tmp_path_factory.mktemp("random-references"),
                                  ("cpu-bf16", "cpu-f32"))


def _executor(artifacts, name: str):
    artifact = load_artifact(artifacts / name)
    if name == "b200":
        return GpuExecutor(artifact, interpret=True, kv_cache_memory=8 << 20, max_model_len=256)
    return CpuExecutor(artifact, kv_cache_memory=8 << 20, max_model_len=256)


# the tokens of sequences a and b: a prompt each, then one decoded token each
_STEP_TOKENS = {"a": [1, 504, 1353, 282, 1649, 314, 253, 1881, 30, 9, 77, 600], "b": [1, 2, 3, 4, 5, 17]}


def _steps(artifact_blocks: int):
    """A mixed step of the prompts of _STEP_TOKENS, then a decode step of their last tokens."""
    pages = PagedSequences(artifact_blocks, block_size=16, seed=5)
    mixed = StepBatch(**pages.step([(seq, tokens[:-1]) for seq, tokens in _STEP_TOKENS.items()]), num_decodes=0)
    decode = StepBatch(**pages.step([(seq, tokens[-1:]) for seq, tokens in _STEP_TOKENS.items()]), num_decodes=2)
    return [mixed, decode]


@pytest.mark.slow
def test_truncated_smollm2_b200_artifact_interpreted_matches_the_cpu_programs(truncated_artifacts, helpers):
    """The b200 artifact's own program and kernels (bf16, interpreted) vs the cpu target's torch
    programs from the same compiler: as close to the fp32 program as the bf16 one is."""
    runs = {}
    for name in ("b200", "cpu-bf16", "cpu-f32"):
        executor = _executor(truncated_artifacts, name)
        runs[name] = [executor.execute(batch) for batch in _steps(executor.num_blocks)]
    with pytest.raises(KilnError, match="has no GPU kernels"):
        GpuExecutor(load_artifact(truncated_artifacts / "cpu-f32"), interpret=True)
    for step, (got, same_dtype, exact) in enumerate(zip(runs["b200"], runs["cpu-bf16"], runs["cpu-f32"])):
        assert got.shape == (2, 2048) and got.dtype == torch.float32
        helpers.check_close(got.bfloat16(), exact, same_dtype.bfloat16(), slack=2.0)
        assert (got.argmax(-1) == exact.argmax(-1)).all(), f"step {step}: greedy tokens differ"


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    """A 2-layer Llama of hidden size 128 (random weights, seed 0; a word-level tokenizer of 2048
    words) compiled for b200 (bf16) and for cpu in f32: GEMMs too small to be split (cheap to
    interpret), for the tests of what runs around the kernels."""
    from tests.codegen.test_decode_graphs import word_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    word_tokenizer(2048).save(str(path / "tokenizer.json"))
    return _compile_artifacts(path, tmp_path_factory.mktemp("tiny-artifacts"), ("b200", "cpu-f32"))


@pytest.mark.slow
def test_the_engine_generates_through_the_interpreted_gpu_executor(tiny_artifacts):
    """Continuous batching over the b200 artifact (the engine's sampler edits the returned
    logits in place): greedy tokens equal the cpu fp32 program's."""
    tokens = {}
    for name in ("b200", "cpu-f32"):
        executor = _executor(tiny_artifacts, name)
        engine = LLMEngine(executor, Tokenizer.from_file(str(tiny_artifacts / name / "tokenizer.json")),
                           eos_token_ids=[2])
        for request_id, prompt in (("a", [1, 504, 1353, 282, 1649]), ("b", [1, 30, 9, 77, 600, 12])):
            params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0)
            engine.add_request(request_id, prompt, params)  # min_tokens masks EOS in the logits, in place
        finals = {}
        while engine.has_unfinished_requests():
            finals.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
        tokens[name] = finals
    assert tokens["b200"] == tokens["cpu-f32"] and all(len(t) == 4 for t in tokens["b200"].values())


def test_the_gpu_references_match_transformers(random_truncated, random_references):
    """The GPU test's reference, checked here: the random model's cpu f32 program gives transformers'
    fp32 logits on the same weights over the GPU test's steps (its fixtures, built on any machine
    as on the GPU machine, need no shipped model)."""
    executor = _executor(random_references, "cpu-f32")
    got = [executor.execute(batch) for batch in _steps(executor.num_blocks)]
    model = transformers.LlamaForCausalLM.from_pretrained(random_truncated, dtype=torch.float32)
    with torch.inference_mode():
        hf = [model(input_ids=torch.tensor([tokens])).logits[0] for tokens in _STEP_TOKENS.values()]
    for step, position in ((0, -2), (1, -1)):  # the prompts' last tokens, then the decoded ones
        torch.testing.assert_close(got[step], torch.stack([logits[position] for logits in hf]), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_compiled_binaries_load_on_the_gpu_without_recompiling(random_truncated, random_references, tmp_path,
                                                              monkeypatch, helpers):
    """On a GPU: the artifact for this GPU's target runs from its cubins (triton.compile is never
    called), and its logits match the cpu programs' like the interpreted run's do."""
    import triton.compiler.compiler

    from kiln.runtime.launcher import _Compiled

    compile_model(str(random_truncated), tmp_path / "gpu", CompileOptions(target=local_target()), progress=False)

    def no_compile(*args, **kwargs):
        raise AssertionError("a kernel was compiled at serve time")

    monkeypatch.setattr(triton.compiler.compiler, "compile", no_compile)
    monkeypatch.setattr(triton, "compile", no_compile)
    executor = GpuExecutor(load_artifact(tmp_path / "gpu"), gpu_memory_utilization=0.5, max_model_len=512,
                           max_num_batched_tokens=256, max_num_seqs=8)
    assert executor.num_blocks * executor.block_size >= executor.max_model_len
    assert executor.launcher.kernels and all(isinstance(k, _Compiled) for k in executor.launcher.kernels.values())
    got = [executor.execute(batch).cpu() for batch in _steps(executor.num_blocks)]
    exact, same_dtype = ([run.execute(batch) for batch in _steps(run.num_blocks)]
                         for run in (_executor(random_references, "cpu-f32"), _executor(random_references, "cpu-bf16")))
    for step in range(2):
        helpers.check_close(got[step].bfloat16(), exact[step], same_dtype[step].bfloat16(), slack=2.0)


# Run in a fresh interpreter: makes the compiler unimportable, then starts `kiln serve` (argv[1:]).
_SERVE_WITHOUT_THE_COMPILER = """
import importlib.abc, sys

class NoCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["kiln", "codegen"], ["kiln", "passes"], ["kiln", "frontend"], ["kiln", "ir"]):
            raise ImportError(f"{name} is unavailable here: serving must not import the compiler")

sys.meta_path.insert(0, NoCompiler())
from kiln.cli import main
status = main(["serve", *sys.argv[1:]])
print("compiler modules loaded:", sorted(m for m in sys.modules if m.split(".")[:2] == ["kiln", "codegen"]))
sys.exit(status)
"""


@pytest.mark.slow
def test_kiln_serve_runs_a_gpu_artifact_without_the_compiler(tiny_artifacts, tmp_path):
    """A b200 artifact served (interpreted) by a process where kiln.codegen, kiln.passes,
    kiln.frontend and kiln.ir cannot be imported: its programs and kernels need kiln's runtime
    only. Its greedy text equals the cpu f32 artifact's (as the engine's tokens do, test above)."""
    import signal

    import httpx

    from kiln.llm import LLM
    from tests.server.test_cli_serve import free_port, wait_healthy

    prompt = _STEP_TOKENS["a"][:8]
    want = LLM(str(tiny_artifacts / "cpu-f32"), max_model_len=256, kv_cache_memory=8 << 20).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=2))[0].outputs[0]
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-c", _SERVE_WITHOUT_THE_COMPILER, str(tiny_artifacts / "b200"), "--interpret",
               "--port", str(port), "--max-model-len", "256", "--kv-cache-memory", "8", "--max-num-seqs", "2",
               "--served-model-name", "b200"]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=300)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
            "model": "b200", "prompt": prompt, "temperature": 0.0, "max_tokens": 2})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    log = log_path.read_text()
    assert "compiler modules loaded: []" in log, log[-3000:]
    assert len(want.token_ids) == 2 and choice["text"] == want.text
