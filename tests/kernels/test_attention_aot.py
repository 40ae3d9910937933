"""The attention kernels cross-compile for sm_80, sm_89, sm_90a and sm_100a without spills,
with each target's own tiles, for head_dim 64/128/256, dense, sliding-window and block-sparse
(run with -s to see the resource tables)."""

from kiln.codegen.kernels import attention_decode, attention_prefill, attention_reduce
from kiln.codegen.kernels.attention import AttentionParams

LAYERS = [
    AttentionParams("bf16", num_heads=9, num_kv_heads=3, head_dim=64, page_size=16),  # SmolLM2-135M
    AttentionParams("bf16", num_heads=32, num_kv_heads=8, head_dim=128, page_size=16, window=4096, softcap=50.0),
    AttentionParams("bf16", num_heads=4, num_kv_heads=1, head_dim=256, page_size=16, window=512),  # Gemma-3 local
    AttentionParams("bf16", num_heads=64, num_kv_heads=8, head_dim=64, page_size=16, window=128, sinks=True),  # gpt-oss-like
    # block-sparse: Phi-3-small-like (blocks of 64, 16 local, every 8th), with sinks, and a 3-page block
    AttentionParams("bf16", num_heads=32, num_kv_heads=8, head_dim=128, page_size=16, block_sparse=(64, 16, 8)),
    AttentionParams("bf16", num_heads=16, num_kv_heads=4, head_dim=64, page_size=16, sinks=True, softcap=30.0,
                    block_sparse=(128, 2, 4)),
    AttentionParams("bf16", num_heads=9, num_kv_heads=3, head_dim=64, page_size=16, block_sparse=(48, 1, 3)),
]


def test_prefill_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(attention_prefill, lambda target: [attention_prefill.choose(target, attn) for attn in LAYERS])


def test_decode_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(attention_decode, lambda target: [
        attention_decode.choose(target, attn, split_k=split_k) for attn in LAYERS for split_k in (False, True)
    ])


def test_split_k_reduce_cross_compiles_for_every_gpu_arch(cross_compile):
    cross_compile(attention_reduce, lambda target: [
        attention_decode.reduce_variant(attention_decode.choose(target, attn, split_k=True)) for attn in LAYERS
    ])
