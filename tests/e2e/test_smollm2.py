"""The real SmolLM2-135M-Instruct (shipped offline): kiln's greedy continuation equals
transformers' token for token, fp32, three prompts decoded together in one batch."""

import pytest
import torch
import transformers

import kiln
from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.frontend import load_checkpoint, load_weights, save_hf_dir, trace
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import build_spec
from kiln.passes import materialize_weights, run_pipeline

NEW_TOKENS = 32
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    ckpt = load_checkpoint("smollm2-135m", progress=False)
    hf_dir = tmp_path_factory.mktemp("smollm2-hf")
    save_hf_dir(ckpt, hf_dir)  # tests/frontend checks these tensors equal transformers' own GGUF load
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return ckpt, model, tokenizer


def prompts(tokenizer) -> list[list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    texts = [chat, "The three primary colors are", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def kiln_greedy(ckpt, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy tokens from the compiled model's `cpu` programs, driven by hand (no engine)."""
    spec = build_spec(ckpt.config)
    graph = trace(spec)
    phases, _ = run_pipeline(graph)
    weights = load_weights(spec, spec.WEIGHTS, ckpt.tensors, torch.float32, progress=False)
    packed = lay_out_weights(phases.values(), {k: w for g in phases.values() for k, w in materialize_weights(g, weights).items()})
    programs = {p: load_kernel_module(render_cpu_program(g), f"test_smollm2_{p}") for p, g in phases.items()}
    pages, states = PagedSequences(num_blocks=64, block_size=16), zero_states(graph, 64)
    outputs = [[] for _ in prompt_ids]
    chunks = list(enumerate(prompt_ids))
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            phase = "decode" if all(len(tokens) == 1 for _, tokens in chunks) else "mixed"
            logits = programs[phase].step(pages.step(chunks), packed, states)["logits"]
            for out, token in zip(outputs, logits.argmax(-1).tolist()):
                out.append(token)
            chunks = [(i, [out[-1]]) for i, out in enumerate(outputs)]
    return outputs


@pytest.fixture(scope="module")
def reference(smollm2, hf_greedy):
    """(prompt token ids, transformers' greedy continuations) for the three prompts."""
    _, model, tokenizer = smollm2
    prompt_ids = prompts(tokenizer)
    return prompt_ids, [hf_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids]


def test_greedy_tokens_equal_transformers(smollm2, reference):
    ckpt, _, tokenizer = smollm2
    prompt_ids, wants = reference
    got = kiln_greedy(ckpt, prompt_ids)
    for tokens, want in zip(got, wants):
        assert tokens == want, f"kiln: {tokenizer.decode(tokens)!r}\ntransformers: {tokenizer.decode(want)!r}"
    answer = tokenizer.decode(got[0], skip_special_tokens=True)
    print(f"\nkiln's answer: {answer!r}")
    assert answer.startswith("The capital of France is Paris.")


def test_llm_api_greedy_equals_transformers(smollm2, reference):
    """The same through kiln.LLM: compile to an artifact, serve it with the engine (scheduler,
    paged KV cache, sampler), all three requests batched."""
    _, _, tokenizer = smollm2
    prompt_ids, wants = reference
    llm = kiln.LLM("smollm2-135m", kv_cache_memory=64 << 20, max_model_len=1024, progress=False)
    params = kiln.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_ids, params)
    for out, want in zip(outs, wants):
        assert list(out.outputs[0].token_ids) == want, f"kiln: {out.outputs[0].text!r}\ntransformers: {tokenizer.decode(want)!r}"
