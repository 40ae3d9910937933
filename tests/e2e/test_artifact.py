"""The artifact: compile -> load round trip, kiln.LLM on it equals transformers, and every kind
of damage or mismatch is refused with a clear message."""

import json
import shutil

import pytest
import torch
import transformers

import kiln
from kiln.compiler import CompileOptions, compile_cached, compile_model
from kiln.errors import KilnError
from kiln.runtime.artifact import FORMAT_VERSION, load_artifact
from kiln.runtime.executor import CpuExecutor


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny-cpu"
    compile_model(str(tiny_model_dir), out, CompileOptions(target="cpu"), progress=False)
    return out


@pytest.fixture
def damaged(artifact_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact_dir, copy)
    return copy


def test_round_trip_and_generation_equal_transformers(artifact_dir, tiny_model_dir):
    artifact = load_artifact(artifact_dir)
    assert artifact.target == "cpu"
    assert {"weights.safetensors", "graph.txt", "program.mixed.py", "program.decode.py", "tokenizer.json",
            "chat_template.jinja"} <= set(artifact.manifest["files"])
    graphs = (artifact_dir / "graph.txt").read_text()
    assert "graph step_mixed(" in graphs and "graph step_decode(" in graphs and "= fused(" in graphs
    llm = kiln.LLM(str(artifact_dir), kv_cache_memory=16 << 20, progress=False)
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Hello"]
    outs = llm.generate(prompts, kiln.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        ids = llm.encode(prompt)
        tokens = list(ids)
        with torch.inference_mode():
            for _ in range(12):
                tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert list(out.outputs[0].token_ids) == tokens[len(ids):]


def test_compile_cache_reuses_the_artifact(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    cold = compile_cached(str(tiny_model_dir), progress=False)
    warm = compile_cached(str(tiny_model_dir), progress=False)
    assert not cold.cached and warm.cached and warm.artifact == cold.artifact


def test_corrupted_weights_are_refused(damaged):
    with open(damaged / "weights.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(KilnError, match="weights.safetensors does not match its hash.*recompile"):
        load_artifact(damaged)


def test_an_edited_program_is_refused(damaged):
    program = damaged / "program.decode.py"
    program.write_text(program.read_text().replace("return {", "return  {"))
    with pytest.raises(KilnError, match="program.decode.py does not match its hash"):
        load_artifact(damaged)


def test_missing_and_extra_files_are_refused(damaged, artifact_dir, tmp_path):
    (damaged / "graph.txt").unlink()
    with pytest.raises(KilnError, match="graph.txt is missing"):
        load_artifact(damaged)
    extra = tmp_path / "extra"
    shutil.copytree(artifact_dir, extra)
    (extra / "kernels.py").write_text("print('hi')\n")
    with pytest.raises(KilnError, match="files the compiler did not write"):
        load_artifact(extra)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_version_mismatches_are_refused(damaged):
    _edit_manifest(damaged, kiln_version="0.0.1")
    with pytest.raises(KilnError, match="compiled by kiln 0.0.1.*recompile"):
        load_artifact(damaged)
    _edit_manifest(damaged, kiln_version=kiln.__version__, format=99)
    with pytest.raises(KilnError, match="artifact format 99"):
        load_artifact(damaged)
    _edit_manifest(damaged, format=FORMAT_VERSION, target="h100", triton_version="3.1.0")
    with pytest.raises(KilnError, match="triton 3.1.0"):
        load_artifact(damaged)


def test_a_wrong_target_is_refused(damaged):
    _edit_manifest(damaged, target="b200")
    with pytest.raises(KilnError, match="targets 'b200'.*recompile with --target cpu"):
        CpuExecutor(load_artifact(damaged))


def test_not_an_artifact(tmp_path):
    with pytest.raises(KilnError, match="not a kiln artifact"):
        load_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(KilnError, match="unreadable"):
        load_artifact(tmp_path)


def test_kv_budget_too_small_is_a_clear_error(artifact_dir):
    with pytest.raises(KilnError, match="raise --kv-cache-memory"):
        CpuExecutor(load_artifact(artifact_dir), kv_cache_memory=1 << 16)


def test_batch_invariance_on_the_compiled_model(artifact_dir):
    """Each request's greedy output through the real compiled model is the same alone and inside
    a batch of 32 requests of mixed lengths arriving at different steps (chunked prefill on)."""
    llm = kiln.LLM(str(artifact_dir), kv_cache_memory=32 << 20, max_num_batched_tokens=64, progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49152, (int(n),), generator=g).tolist() for n in torch.randint(1, 90, (32,), generator=g)]
    params = kiln.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    engine, done = llm.engine, {}
    for step in range(10_000):
        if step % 3 == 0 and step // 3 < len(prompts):  # a new request every third step
            engine.add_request(str(step // 3), prompts[step // 3], params)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        if len(done) == len(prompts):
            break
    assert [done[i] for i in range(len(prompts))] == alone


def test_a_default_context_that_does_not_fit_is_lowered_to_what_fits(artifact_dir, caplog):
    from kiln.runtime.executor import MIN_DEFAULT_CONTEXT

    artifact = load_artifact(artifact_dir)
    artifact.manifest["max_model_len"] = 4 * MIN_DEFAULT_CONTEXT  # as a long-context model's would be
    per_token = sum(g["bytes_per_token"] for g in artifact.manifest["cache_groups"])
    budget = (MIN_DEFAULT_CONTEXT + 512) * per_token
    with caplog.at_level("WARNING"):
        executor = CpuExecutor(artifact, kv_cache_memory=budget)
    assert executor.max_model_len == executor.num_blocks * executor.block_size == MIN_DEFAULT_CONTEXT + 512
    assert "max_model_len lowered" in caplog.text
    with pytest.raises(KilnError, match="raise --kv-cache-memory"):  # asked for explicitly: an error
        CpuExecutor(artifact, kv_cache_memory=budget, max_model_len=4 * MIN_DEFAULT_CONTEXT)
