"""A Llama whose every layer attends through a block-sparse layout (a test-only architecture that
reads Phi-3-small's layout keys from its config): compiled for the `cpu` target and served by
kiln.LLM (chunked prefills beside decodes, two prompts batched), its greedy tokens equal those of
the IR interpreter running the traced step graph step by step, which differ from the dense
model's; and the same spec compiles for a GPU target."""

import dataclasses
import json

import pytest
import torch
import transformers

import kiln
from kiln.compiler import CompileOptions, compile_model
from kiln.frontend import load_checkpoint, trace
from kiln.frontend.blocks import Attention
from kiln.frontend.weights import load_weights
from kiln.ir import AttentionKind, BlockSparseLayout, interpret
from kiln.ir.step import PagedSequences, zero_states
from kiln.models import ARCHITECTURES
from kiln.models.llama import LlamaConfig, LlamaForCausalLM

LAYOUT_KEYS = ("blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride")
LAYOUT = dict(zip(LAYOUT_KEYS, (16, 2, 3)))  # KV blocks of 16: a query in block 8 sees blocks 2, 5, 7, 8
NEW_TOKENS = 40


class BlockSparseLlamaForCausalLM(LlamaForCausalLM):
    """Llama with every layer's attention restricted to one BlockSparseLayout, read from the
    config's `blocksparse_block_size`, `blocksparse_num_local_blocks`, `blocksparse_vert_stride`."""

    def __init__(self, cfg: LlamaConfig, layout: BlockSparseLayout):
        super().__init__(cfg)
        for layer in self.model.layers:
            spec = layer.self_attn.attn.spec
            layer.self_attn.attn = Attention(dataclasses.replace(spec, kind=AttentionKind.BLOCK_SPARSE, block_sparse=layout))

    @classmethod
    def from_hf_config(cls, config: dict) -> "BlockSparseLlamaForCausalLM":
        return cls(LlamaConfig.from_hf(config), BlockSparseLayout(*(config[k] for k in LAYOUT_KEYS)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple:
    """(directory, HF config dict) of a tiny random BlockSparseLlamaForCausalLM checkpoint with
    SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.3, bos_token_id=1, eos_token_id=2, **LAYOUT)
    path = tmp_path_factory.mktemp("block-sparse-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    config_dict = {**json.loads((path / "config.json").read_text()), "architectures": [BlockSparseLlamaForCausalLM.__name__]}
    (path / "config.json").write_text(json.dumps(config_dict))
    (path / "tokenizer.json").write_text(load_checkpoint("smollm2-135m", progress=False).tokenizer.to_str())
    return path, config_dict


def _interpreter_greedy(spec, tensors, prompts: list[list[int]]) -> list[list[int]]:
    """NEW_TOKENS greedy tokens for each prompt from `spec`'s traced step graph run by the
    reference interpreter: the prompts in one step, then one step of their decodes per token."""
    graph = trace(spec)
    weights = load_weights(spec, spec.WEIGHTS, tensors, torch.float32, progress=False)
    pages, states = PagedSequences(num_blocks=32, block_size=16), zero_states(graph, 32)
    tokens, new = [[] for _ in prompts], prompts
    for _ in range(NEW_TOKENS):
        logits = interpret(graph, pages.step(list(enumerate(new))), weights, states)["logits"]
        for seq, row in zip(tokens, logits):
            seq.append(int(row.argmax()))
        new = [seq[-1:] for seq in tokens]
    return tokens


def test_served_greedy_tokens_equal_the_interpreters_and_differ_from_the_dense_models(checkpoint, tmp_path,
                                                                                       monkeypatch):
    path, config = checkpoint
    monkeypatch.setitem(ARCHITECTURES, BlockSparseLlamaForCausalLM.__name__, BlockSparseLlamaForCausalLM)
    compile_model(str(path), tmp_path / "artifact", CompileOptions(target="cpu"), progress=False)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (101, 77)]
    # a 32-token budget: the prompts prefill in chunks that start mid-sequence, beside decodes
    llm = kiln.LLM(str(tmp_path / "artifact"), kv_cache_memory=8 << 20, max_num_batched_tokens=32, progress=False)
    outs = llm.generate(prompts, kiln.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    tensors = load_checkpoint(str(path), progress=False).tensors
    want = _interpreter_greedy(BlockSparseLlamaForCausalLM.from_hf_config(config), tensors, prompts)
    assert [list(out.outputs[0].token_ids) for out in outs] == want
    dense = _interpreter_greedy(LlamaForCausalLM.from_hf_config(config), tensors, prompts)
    assert all(d != w for d, w in zip(dense, want))  # the layout matters


def test_the_spec_renders_for_a_gpu_target_and_its_attention_kernels_cross_compile(checkpoint):
    """The other kernels are those of any Llama (tests/codegen/test_gpu_families.py)."""
    from kiln.codegen.gpu_program import build_gpu_program  # imports triton
    from kiln.codegen.kernel_check import kernel_check
    from kiln.codegen.targets import get_target
    from kiln.frontend.tracer import StepConfig
    from kiln.passes import PipelineOptions, run_pipeline

    target = get_target("h100")
    graph = trace(BlockSparseLlamaForCausalLM.from_hf_config(checkpoint[1]), StepConfig(dtype="bf16"))
    lowered, _ = run_pipeline(graph, PipelineOptions(kernel_check=kernel_check(target)))
    program = build_gpu_program(lowered, target)
    attention = {name: kernel for name, kernel in program.kernels.items() if kernel[0].KIND.startswith("attention")}
    layouts = {kind.KIND: variant.attn.block_sparse for kind, variant in attention.values() if hasattr(variant, "attn")}
    assert layouts == {"attention_prefill": (16, 2, 3), "attention_decode": (16, 2, 3)}
    compiled, _ = dataclasses.replace(program, kernels=attention).start_compile().result()
    assert len(compiled) == len(attention) and not any(kernel.resources.spills for kernel in compiled)
