"""Cache groups: the attention layers that share one kind of KV memory, and so one block table.

A group's kind says which of a sequence's KV blocks its layers can still read, and so which
blocks the runtime must keep:
  full            every block of the context;
  sliding_window  the blocks holding the last `window` positions (and the chunk being computed);
  block_sparse    the blocks a `BlockSparseLayout` lets some future query see: the local blocks
                  of the current query block and every vertical block before them.
The recurrent layers (linear attention and the causal conv1d in front of it) keep their state
per sequence, not per block: `plan_state_groups` lists those states as one `StateGroup` of the
state pool.

All groups draw blocks from ONE pool (vLLM's hybrid KV cache manager): a block id names one page
in each of a group's layers, and layer i of every group shares the same physical tensor, "slot"
i. So each group has the same number of layers (the smallest kind's count; larger kinds are cut
into several groups, and a short last group leaves slots unused) and every layer's page has the
same shape. A model whose layers' pages differ in shape gets one full group: correct, but
windows and layouts then bound compute and not memory.

The group record itself (`CacheGroup`) and the step inputs each group reads
(`group_input_names`) are part of kiln.contract: the runtime reads them from the artifact.
"""

from __future__ import annotations

from kiln.contract import BLOCK_SPARSE, FULL, SLIDING_WINDOW, CacheGroup, StateGroup
from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node
from kiln.ir.specs import AttentionKind, BlockSparseLayout


def plan_cache_groups(graph: Graph, max_model_len: int) -> list[CacheGroup]:
    """The cache groups of a traced step graph's `attention` nodes (full ones first).

    A window of at least `max_model_len` tokens reads the whole context: a full layer. Raises
    KilnError for a block-sparse layout whose block size is not a multiple of the KV block size."""
    layers = [n for n in graph.nodes if n.op == "attention"]
    if not layers:
        return []
    keyed: dict[tuple, list[Node]] = {}
    for node in layers:
        keyed.setdefault(_group_key(node, max_model_len), []).append(node)
    pages = {(tuple(n.inputs[3].type.shape[1:]), n.inputs[3].type.dtype) for n in layers}
    if len(keyed) > 1 and len(pages) > 1:
        keyed = {(FULL, None, None): layers}  # pages of different shapes cannot share a pool's slots
    size = min(len(nodes) for nodes in keyed.values())
    groups = []
    for (kind, window, layout), nodes in sorted(keyed.items(), key=lambda item: item[0][0] != FULL):
        for start in range(0, len(nodes), size):
            chunk = nodes[start:start + size]
            caches = [c for n in chunk for c in n.inputs[3:5]]
            groups.append(CacheGroup(kind, tuple(n.attrs["layer"] for n in chunk), tuple(c.name for c in caches),
                                     int(caches[0].type.shape[1]),
                                     tuple(tuple(int(d) for d in c.type.shape[1:]) for c in caches),
                                     caches[0].type.dtype, window, layout))
    return groups


RECURRENT_STATE_INPUT = {"linear_attention": 4, "causal_conv1d": 2}  # each recurrent op's state input


def plan_state_groups(graph: Graph) -> list[StateGroup]:
    """The state pool's group of a traced step graph's recurrent ops (none without any)."""
    states = {n.inputs[RECURRENT_STATE_INPUT[n.op]]: n.attrs["layer"] for n in graph.nodes if n.op in RECURRENT_STATE_INPUT}
    if not states:
        return []
    ordered = sorted(states, key=lambda s: (states[s], s.name))
    return [StateGroup(tuple(sorted(set(states.values()))), tuple(s.name for s in ordered),
                       tuple(tuple(int(d) for d in s.type.shape[1:]) for s in ordered), tuple(s.type.dtype for s in ordered))]


def _group_key(node: Node, max_model_len: int) -> tuple[str, int | None, BlockSparseLayout | None]:
    spec, block_size = node.attrs["spec"], int(node.inputs[3].type.shape[1])
    if spec.kind is AttentionKind.BLOCK_SPARSE:
        layout = spec.block_sparse
        if layout.block_size % block_size:
            raise KilnError(f"layer {node.attrs['layer']}: the block-sparse layout's block size {layout.block_size} "
                            f"is not a multiple of the KV block size {block_size}; make the layout's block size a "
                            f"multiple of {block_size} or compile with a --block-size that divides it")
        return BLOCK_SPARSE, None, layout
    if spec.window is not None and spec.window < max_model_len:
        return SLIDING_WINDOW, spec.window, None
    return FULL, None, None
