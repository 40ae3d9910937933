"""Shared helpers of the pass tests, as fixtures: structural graph comparison, random weights for
a spec, and a scenario runner that interprets a graph over a paged KV cache step by step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kiln.frontend.weights import random_weights
from kiln.ir import Graph, Node, interpret, print_graph
from kiln.ir.step import PagedSequences, zero_states


@pytest.fixture(autouse=True)
def one_thread():
    """The pass tests run tiny tensors, for which torch's thread pool only adds synchronisation
    (seconds per test on a busy 2-core machine): use one thread, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ref(node: Node, index: dict[Node, int]):
    if node.name is not None and not node.inputs:
        return (node.op, node.name)
    return index[node]


def _attrs_differ(a: dict, b: dict) -> str | None:
    if set(a) != set(b):
        return f"attribute names {sorted(a)} != {sorted(b)}"
    for key in a:
        if isinstance(a[key], Graph) and isinstance(b[key], Graph):
            why = graph_difference(a[key], b[key])
            if why:
                return f"body {key}: {why}"
        elif a[key] != b[key]:
            return f"{key}={a[key]!r} != {b[key]!r}"
    return None


def graph_difference(got: Graph, want: Graph) -> str | None:
    """Why two graphs differ structurally (None if they do not): sources compare by (op, name),
    type and attributes; other nodes in order by op, attributes, type and inputs; then outputs
    and the memory plan."""
    def sources(g):
        return {(n.op, n.name): n for n in g.nodes if n.name is not None and not n.inputs}

    got_src, want_src = sources(got), sources(want)
    if set(got_src) != set(want_src):
        return f"sources differ: extra {sorted(set(got_src) - set(want_src))}, missing {sorted(set(want_src) - set(got_src))}"
    for key, node in got_src.items():
        if node.type != want_src[key].type or _attrs_differ(dict(node.attrs), dict(want_src[key].attrs)):
            return f"source {key}: {node.attrs} != {want_src[key].attrs}"
    got_ops = [n for n in got.nodes if (n.op, n.name) not in got_src]
    want_ops = [n for n in want.nodes if (n.op, n.name) not in want_src]
    if len(got_ops) != len(want_ops):
        return f"{len(got_ops)} nodes != {len(want_ops)} nodes"
    got_index, want_index = {n: i for i, n in enumerate(got_ops)}, {n: i for i, n in enumerate(want_ops)}
    for i, (g, w) in enumerate(zip(got_ops, want_ops)):
        where = f"node {i} ({g.op})"
        if g.op != w.op:
            return f"{where}: op {g.op} != {w.op}"
        if g.type != w.type:
            return f"{where}: type {g.type} != {w.type}"
        if [_ref(x, got_index) for x in g.inputs] != [_ref(x, want_index) for x in w.inputs]:
            return f"{where}: inputs differ"
        why = _attrs_differ(dict(g.attrs), dict(w.attrs))
        if why:
            return f"{where}: {why}"
    outs = {k: _ref(v, got_index) for k, v in got.outputs.items()}
    if outs != {k: _ref(v, want_index) for k, v in want.outputs.items()}:
        return "outputs differ"
    if got.buffers != want.buffers:
        return f"buffers {got.buffers} != {want.buffers}"
    return None


@pytest.fixture
def assert_graph_equal():
    def check(got: Graph, want: Graph):
        why = graph_difference(got, want)
        assert why is None, f"{why}\n--- got:\n{print_graph(got)}--- want:\n{print_graph(want)}"
    return check



class Scenario:
    """Three steps over two to three sequences: a mixed prefill, a decode-only step, and a
    mixed step (a decode, a chunk that starts mid-context, a fresh prompt). `run(graphs)`
    interprets step i with graphs[i] on one shared paged KV cache and returns the logits."""

    def __init__(self, vocab: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        a, b, c = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 12, 3))
        self.steps = [
            [("a", a[:17]), ("b", b[:5])],
            [("a", [a[17]]), ("b", [b[5]])],
            [("a", [a[18]]), ("b", b[6:]), ("c", c)],
        ]

    def run(self, graphs: list[Graph], weights: list[dict]) -> list[torch.Tensor]:
        pages = PagedSequences(num_blocks=48, block_size=16)
        states = zero_states(graphs[0], 48)
        return [interpret(graph, pages.step(chunks), w, states)["logits"]
                for graph, w, chunks in zip(graphs, weights, self.steps)]


@pytest.fixture
def helpers():
    """The module-level helpers (pytest's importlib mode keeps test files from importing conftest)."""
    return SimpleNamespace(random_weights=random_weights, Scenario=Scenario, graph_difference=graph_difference)
