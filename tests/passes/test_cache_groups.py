"""Cache-group planning (ir/cache_groups.py) and assignment (passes/assign_cache_groups.py): which
layers share a block table, the refusals, and that a graph whose layers read their own group's
tables computes what the one-table graph computes."""

import dataclasses

import pytest
import torch

from kiln.contract import BLOCK_SPARSE, FULL, SLIDING_WINDOW, CacheGroup
from kiln.errors import KilnError
from kiln.ir import NB, AttentionKind, AttentionSpec, BlockSparseLayout, GraphBuilder, T, TensorType, interpret
from kiln.ir.cache_groups import plan_cache_groups
from kiln.ir.step import STEP_INPUTS, PagedSequences, zero_states
from kiln.passes.assign_cache_groups import assign_cache_groups

DENSE = AttentionSpec(AttentionKind.DENSE, num_heads=2, num_kv_heads=1, head_dim=8)
WINDOW = AttentionSpec(AttentionKind.SLIDING_WINDOW, num_heads=2, num_kv_heads=1, head_dim=8, window=5)
SPARSE = AttentionSpec(AttentionKind.BLOCK_SPARSE, num_heads=2, num_kv_heads=1, head_dim=8,
                       block_sparse=BlockSparseLayout(32, local_blocks=1, vertical_stride=2))


def _layers_graph(specs, head_dims=None):
    """A chain of attention layers, layer i with specs[i] (its q, k, v the previous output)."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 16), "f32"))
    context = [b.input(n, STEP_INPUTS[n]) for n in ("query_start", "seq_lens", "block_tables", "slot_mapping")]
    for layer, spec in enumerate(specs):
        d = (head_dims or {}).get(layer, 8)
        spec = dataclasses.replace(spec, num_heads=16 // d, head_dim=d)
        q = b.op("reshape", x, shape=(T, 16 // d, d))
        kv = b.op("reshape", b.op("slice", x, dim=1, start=0, stop=d), shape=(T, 1, d))
        caches = [b.state(f"{n}_cache.{layer}", TensorType((NB, 16, 1, d), "f32")) for n in "kv"]
        x = b.op("reshape", b.op("attention", q, kv, kv, *caches, *context, spec=spec, layer=layer), shape=(T, 16))
    b.output("out", x)
    return b.build()


def _kinds(groups: list[CacheGroup]):
    return [(g.kind, g.layers) for g in groups]


def test_each_kind_is_cut_into_groups_of_the_smallest_kinds_size():
    graph = _layers_graph([WINDOW, WINDOW, DENSE, WINDOW, WINDOW, DENSE, WINDOW])
    groups = plan_cache_groups(graph, max_model_len=1024)
    assert _kinds(groups) == [(FULL, (2, 5)), (SLIDING_WINDOW, (0, 1)), (SLIDING_WINDOW, (3, 4)), (SLIDING_WINDOW, (6,))]
    assert groups[1].states == ("k_cache.0", "v_cache.0", "k_cache.1", "v_cache.1") and groups[1].window == 5
    assert groups[0].bytes_per_token == 4 * 8 * 4  # 2 layers x (k, v) x head_dim 8 x f32
    assert CacheGroup.from_json(groups[3].to_json()) == groups[3]


def test_a_window_that_spans_the_context_is_a_full_layer():
    assert _kinds(plan_cache_groups(_layers_graph([WINDOW, DENSE]), max_model_len=5)) == [(FULL, (0, 1))]


def test_a_block_sparse_layout_gets_its_group_and_must_tile_the_kv_blocks():
    groups = plan_cache_groups(_layers_graph([DENSE, SPARSE]), max_model_len=1024)
    assert _kinds(groups) == [(FULL, (0,)), (BLOCK_SPARSE, (1,))] and groups[1].layout == SPARSE.block_sparse
    odd = AttentionSpec(AttentionKind.BLOCK_SPARSE, 2, 1, 8, block_sparse=BlockSparseLayout(24, 1, 2))
    with pytest.raises(KilnError, match="layer 0: the block-sparse layout's block size 24 is not a multiple of the KV "
                                        "block size 16"):
        plan_cache_groups(_layers_graph([odd]), max_model_len=1024)


def test_layers_whose_pages_differ_share_one_full_group():
    graph = _layers_graph([WINDOW, DENSE], head_dims={1: 16})
    assert _kinds(plan_cache_groups(graph, max_model_len=1024)) == [(FULL, (0, 1))]


def test_layers_read_their_groups_tables_and_compute_what_one_table_computes():
    graph = _layers_graph([WINDOW, DENSE, WINDOW, DENSE])
    groups = plan_cache_groups(graph, max_model_len=1024)
    grouped = assign_cache_groups(graph, groups)
    tables = {n.attrs["layer"]: n.inputs[7].name for n in grouped.nodes if n.op == "attention"}
    assert tables == {0: "block_tables_g1", 1: "block_tables", 2: "block_tables_g1", 3: "block_tables"}
    assert {n.name for n in grouped.inputs} >= {"slot_mapping_g1", "block_tables_g1"}
    inputs = PagedSequences(16, 16, num_groups=2).step([("a", list(range(20))), ("b", list(range(7)))])
    x = torch.randn(27, 16, generator=torch.Generator().manual_seed(0))
    want = interpret(graph, {"x": x, **inputs}, {}, zero_states(graph, 16))["out"]
    got = interpret(grouped, {"x": x, **inputs}, {}, zero_states(grouped, 16))["out"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert assign_cache_groups(graph, plan_cache_groups(_layers_graph([DENSE, DENSE]), 1024)) is graph
