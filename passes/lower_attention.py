"""Attention lowering: each layer's `attention` node becomes its paged KV write plus the paged
attention op of the phase.

    attention(q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping[, sinks])
    ->  k_cache' = kv_write(k, k_cache, slot_mapping)        (returns the cache it wrote)
        v_cache' = kv_write(v, v_cache, slot_mapping)
        mixed:  attention_prefill(q, k_cache', v_cache', query_start, seq_lens, block_tables[, sinks])
        decode: attention_decode(q, k_cache', v_cache', seq_lens, block_tables[, sinks], split="auto")

Both attention ops keep the layer's AttentionSpec (`spec`) and `layer`. The prefill op serves
any mix of prefill chunks and decodes (dense causal over the paged context); the decode op has
one query per sequence and splits the context across programs (flash-decoding) with a split
count chosen at run time from the context length (`split="auto"`). A sliding-window spec keeps
its `window`, a block-sparse spec its `block_sparse` layout: the kernels read only the KV blocks
that some query of theirs sees (the runtime may point the other block-table entries anywhere).
(Linear attention is not an `attention` node: its `linear_attention` op keeps its state in the
state pool and needs no lowering.) The KV writes are separate ops so that the
fusion pass can put them with the rope that produces k. Run after specialize_phase.
"""

from __future__ import annotations

from kiln.ir import Graph, GraphBuilder, Node
from kiln.passes.context import PassContext


def lower_attention(graph: Graph, ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node.op != "attention":
            return None
        spec, layer = node.attrs["spec"], node.attrs["layer"]
        q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping, *sinks = inputs
        k_cache = builder.op("kv_write", k, k_cache, slot_mapping, layer=layer)
        v_cache = builder.op("kv_write", v, v_cache, slot_mapping, layer=layer)
        if ctx.phase == "decode":
            return builder.op("attention_decode", q, k_cache, v_cache, seq_lens, block_tables, *sinks,
                              spec=spec, layer=layer, split="auto")
        return builder.op("attention_prefill", q, k_cache, v_cache, query_start, seq_lens, block_tables, *sinks,
                          spec=spec, layer=layer)

    result = graph.rebuild(rewrite)
    ctx.note(f"lowered attention for the {ctx.phase} phase")
    return result
