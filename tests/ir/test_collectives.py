"""The collectives all_reduce and all_gather: their types, and their meaning when the interpreter
simulates a tensor-parallel group's ranks in one process (interpret_ranks)."""

import pytest
import torch

from kiln.ir import GraphBuilder, InterpretError, T, TensorType, interpret, interpret_ranks, print_graph, verify
from kiln.ir.interpret import run_body
from kiln.ir.op_types import TypeError_


def _graph(ranks: int):
    """y = all_reduce(x @ w^T), z = all_gather(x, dim=1): x [T, 4], w [3, 4] per rank."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 4), "f32"))
    w = b.param("w", TensorType((3, 4), "f32"))
    b.output("y", b.op("all_reduce", b.op("linear", x, w), ranks=ranks))
    b.output("z", b.op("all_gather", x, dim=1, ranks=ranks))
    return b.build()


def test_the_collectives_types_and_text():
    graph = _graph(ranks=4)
    verify(graph)
    assert print_graph(graph).splitlines()[4:6] == [
        "  %1 = all_reduce(%0, ranks=4) : f32[T, 3]",
        "  %2 = all_gather(%x, dim=1, ranks=4) : f32[T, 16]",
    ]
    b = GraphBuilder()
    ids = b.input("ids", TensorType((T,), "i32"))
    with pytest.raises(TypeError_, match="all_reduce of i32"):
        b.op("all_reduce", ids, ranks=2)
    with pytest.raises(TypeError_, match="dim 1 out of range"):
        b.op("all_gather", ids, dim=1, ranks=2)


def test_ranks_run_in_lockstep_and_collectives_combine_their_values():
    x = torch.randn(5, 4)
    weights = [{"w": torch.randn(3, 4)} for _ in range(3)]
    outs = interpret_ranks(_graph(ranks=3), {"x": x}, weights, [{}, {}, {}])
    want_sum = sum(x @ w["w"].T for w in weights)
    for out in outs:  # every rank gets the same sum and the same gathered value
        torch.testing.assert_close(out["y"], want_sum)
        torch.testing.assert_close(out["z"], torch.cat([x, x, x], dim=1))


def test_all_gather_concatenates_in_rank_order():
    b = GraphBuilder()
    w = b.param("w", TensorType((2, 3), "f32"))
    b.output("out", b.op("all_gather", w, dim=0, ranks=2))
    shards = [torch.zeros(2, 3), torch.ones(2, 3)]
    outs = interpret_ranks(b.build(), {}, [{"w": s} for s in shards], [{}, {}])
    torch.testing.assert_close(outs[1]["out"], torch.cat(shards))


def test_one_rank_is_the_plain_interpreter_and_other_counts_are_refused():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    out = interpret(_graph(ranks=1), {"x": x}, {"w": w}, {})
    torch.testing.assert_close(out["y"], x @ w.T)
    with pytest.raises(InterpretError, match="all_reduce combines 2 ranks; 1 were simulated"):
        interpret(_graph(ranks=2), {"x": x}, {"w": w}, {})
    with pytest.raises(InterpretError, match="2 ranks of weights but 1 of states"):
        interpret_ranks(_graph(ranks=2), {"x": x}, [{"w": w}] * 2, [{}])
    body = GraphBuilder("k0")
    body.output("out0", body.op("all_reduce", body.input("in0", TensorType((T, 4), "f32")), ranks=1))
    with pytest.raises(InterpretError, match="all_reduce is a collective: only interpret_ranks runs it"):
        run_body(body.build(), [x])
