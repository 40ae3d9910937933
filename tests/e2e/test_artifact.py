"""The artifact: compile -> load round trip, kiln.LLM on it equals transformers, and every kind
of damage or mismatch is refused with a clear message."""

import dataclasses
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
from kiln.runtime.manifest import DIGEST_FIELD, Manifest, manifest_digest


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny-cpu"
    compile_model(str(tiny_model_dir), out, CompileOptions(target="cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def gpu_artifact_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model compiled for b200 (cross-compiled: no GPU needed)."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-b200"
    compile_model(str(tiny_model_dir), out, CompileOptions(target="b200"), progress=False)
    return out


@pytest.fixture
def damaged(artifact_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact_dir, copy)
    return copy


def test_round_trip_and_generation_equal_transformers(artifact_dir, tiny_model_dir):
    artifact = load_artifact(artifact_dir)
    assert artifact.target == "cpu" and isinstance(artifact.manifest, Manifest)
    assert artifact.manifest.block_size == artifact.manifest["block_size"] == 16 and artifact.manifest.dtype == "f32"
    assert artifact.manifest.format == FORMAT_VERSION and artifact.manifest.kernels is None
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
    _edit_manifest(cold.artifact, block_size=32)  # an edited manifest is not reused: recompiled in place
    again = compile_cached(str(tiny_model_dir), progress=False)
    assert not again.cached and again.artifact == cold.artifact
    assert load_artifact(again.artifact).manifest.block_size == 16


def test_kiln_compile_to_a_directory_reuses_the_compile_cache(tiny_model_dir, monkeypatch, tmp_path):
    """`kiln compile -o DIR` of unchanged inputs copies the cached artifact (hard links) and says so;
    each copy loads on its own, and an older artifact at DIR is replaced."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    cold = compile_cached(str(tiny_model_dir), out=out, progress=False)
    _edit_manifest(out, block_size=32)  # the copy is replaced, the cache is untouched
    warm = compile_cached(str(tiny_model_dir), out=out, progress=False)
    assert not cold.cached and warm.cached and warm.artifact == cold.artifact == out.absolute()
    assert warm.seconds < cold.seconds and "reused from the compile cache" in warm.lines()[0]
    assert load_artifact(out).manifest.block_size == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no staging left behind


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


def _edit_manifest(path, edit=None, *, reseal=False, **changes):
    """Changes fields of the manifest at `path` (`edit(manifest)` for nested ones); `reseal`
    updates its own hash too, as a careful editor would."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    if edit:
        edit(manifest)
    if reseal:
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _each(key, **changes):
    """An edit that changes fields of every entry of `manifest[key]` (the cache groups or the
    kernel table)."""
    def edit(manifest):
        entries = manifest[key]
        for entry in entries.values() if isinstance(entries, dict) else entries:
            entry.update(changes)
    return edit


def _drop_layer_1(manifest):
    group = manifest["cache_groups"][0]
    group.update(layers=group["layers"][:1], states=group["states"][:2], pages=group["pages"][:2])


def _pages_of_32(manifest):
    for group in manifest["cache_groups"]:
        group.update(block_size=32, pages=[[32, *page[1:]] for page in group["pages"]])


EDITS = {  # name: (changes, edit, what the resealed manifest is refused for)
    "block_size": ({"block_size": 32}, None, r"block_size is 32, but cache group 0 has blocks of 16 tokens"),
    "block_size and pages": ({"block_size": 32}, _pages_of_32,
                             r"step_mixed in graph.txt declares the states k_cache.0 f32\[16, 2, 16\].* where the "
                             r"cache groups in manifest.json hold k_cache.0 f32\[32, 2, 16\]"),
    "dtype": ({"dtype": "bf16"}, None, "dtype is bf16, but cache group 0 holds f32"),
    "dtype and groups": ({"dtype": "bf16"}, _each("cache_groups", dtype="bf16"),
                         "manifest.json says dtype bf16, but weights.safetensors holds F32 tensors"),
    "target": ({"target": "b200"}, None, "says target b200, but program.mixed.py was generated for cpu"),
    "cache_groups": ({}, _drop_layer_1, r"graph.txt declares the states k_cache.1 f32\[16, 2, 16\], v_cache.1 "
                                        r"f32\[16, 2, 16\] where the cache groups in manifest.json hold none"),
    "state names": ({}, _each("cache_groups", states=["k.0", "v.0", "k.1", "v.1"]),
                    "graph.txt declares the states k_cache.0"),
    "vocab_size": ({"vocab_size": 1000}, None,
                   "says vocab_size 1000, but step_mixed in graph.txt returns logits of 49152 columns"),
    "kernels": ({"kernels": {"gemm": {"arch": "sm_100a", "binary": "cubin"}}}, None,
                "says target cpu, but the artifact holds GPU kernels"),
    "binary": ({"kernels": {"gemm": {"arch": "sm_100a", "binary": "exe"}}}, None, "names its binary .exe., not one of"),
    "field type": ({"block_size": "16"}, None, "'block_size' is '16', not an integer"),
    "missing field": ({}, lambda manifest: manifest.pop("max_model_len"), "has no 'max_model_len'"),
}


def _page_size_32(manifest):
    for entry in manifest["kernels"].values():
        if "PAGE_SIZE" in entry["constexprs"]:
            entry["constexprs"]["PAGE_SIZE"] = 32


GPU_EDITS = {
    "target": ({"target": "h100"}, None, "says target h100, but program.mixed.py was generated for b200"),
    "to cpu": ({"target": "cpu"}, None, "says target cpu, but program.mixed.py was generated for b200"),
    "no kernel table": ({}, lambda manifest: manifest.pop("kernels"), "says target b200, but has no kernel table"),
    "kernel table": ({}, lambda manifest: manifest["kernels"].popitem(),
                     r"the kernel table in manifest.json and kernels/\*.py differ in rows__"),
    "arch": ({}, lambda manifest: next(iter(manifest["kernels"].values())).update(arch="sm_90a"),
             r"the kernels of target b200 name the architectures \['sm_100a', 'sm_90a'\], not one GPU architecture"),
    "page size": ({}, _page_size_32, "says block_size 16, but kernel attention_.* reads pages of 32 tokens"),
}


@pytest.mark.parametrize("target, name", [("cpu", name) for name in EDITS] + [("b200", name) for name in GPU_EDITS])
def test_an_edited_manifest_is_refused(target, name, request, tmp_path):
    """Without its hash updated, an edit is refused as such; with it updated, for what it breaks
    (also when the files' hashes are not checked)."""
    damaged = tmp_path / "copy"
    shutil.copytree(request.getfixturevalue("artifact_dir" if target == "cpu" else "gpu_artifact_dir"), damaged)
    changes, edit, reason = (EDITS if target == "cpu" else GPU_EDITS)[name]
    _edit_manifest(damaged, edit, **changes)
    with pytest.raises(KilnError, match="manifest.json was modified after compilation.*recompile the artifact rather "
                                        "than editing it"):
        load_artifact(damaged)
    _edit_manifest(damaged, reseal=True)
    with pytest.raises(KilnError, match=f"{reason}.*recompile the artifact"):
        load_artifact(damaged, check_hashes=False)


def test_a_resealed_manifest_with_the_same_content_loads(damaged):
    """The hash covers the manifest's content, not its formatting."""
    _edit_manifest(damaged, reseal=True)
    assert load_artifact(damaged).manifest.block_size == 16


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
    _edit_manifest(damaged, target="cpu", runtime_source="0123456789abcdef")
    with pytest.raises(KilnError, match="compiled against other kiln runtime sources .fingerprint 0123456789abcdef.*"
                                        "stale or foreign; recompile it"):
        load_artifact(damaged)


def test_the_cpu_executor_refuses_another_target(artifact_dir):
    artifact = load_artifact(artifact_dir)
    gpu = dataclasses.replace(artifact, manifest=dataclasses.replace(artifact.manifest, target="b200"))
    with pytest.raises(KilnError, match="targets 'b200'.*recompile with --target cpu"):
        CpuExecutor(gpu)


def test_interpreting_a_cpu_artifact_is_refused(artifact_dir):
    with pytest.raises(KilnError, match="--interpret runs a GPU artifact's Triton kernels .* give a GPU --target"):
        kiln.LLM(str(artifact_dir), interpret=True)


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
    long_context = dataclasses.replace(artifact.manifest, max_model_len=4 * MIN_DEFAULT_CONTEXT)  # a long-context model's
    artifact = dataclasses.replace(artifact, manifest=long_context)
    per_token = sum(g["bytes_per_token"] for g in artifact.manifest["cache_groups"])
    budget = (MIN_DEFAULT_CONTEXT + 512) * per_token
    with caplog.at_level("WARNING"):
        executor = CpuExecutor(artifact, kv_cache_memory=budget)
    assert executor.max_model_len == executor.num_blocks * executor.block_size == MIN_DEFAULT_CONTEXT + 512
    assert "max_model_len lowered" in caplog.text
    with pytest.raises(KilnError, match="raise --kv-cache-memory"):  # asked for explicitly: an error
        CpuExecutor(artifact, kv_cache_memory=budget, max_model_len=4 * MIN_DEFAULT_CONTEXT)
