"""Readable, stable text for a graph (golden tests and `--dump-ir` compare it).

    graph step(T, B, M, NB)
      %input_ids = input : i32[T]
      @model.norm.weight = param : f32[576]
      &k_cache.0 = state : f32[NB, 16, 3, 64]
      %0 = embedding(@model.embed_tokens.weight, %input_ids) : f32[T, 576]
      %1 = rms_norm(%0, @model.layers.0.input_layernorm.weight, eps=1e-05) : f32[T, 576]
      return logits=%93

Step inputs print as `%name`, weights as `@name`, state as `&name`, other nodes are numbered
in order. Attributes print sorted by key. A source with more attributes than its name (a derived
weight) prints them: `@w = param(derive=...) : f32[..]`. A node holding a sub-graph (a `fused`
node's `body`) names it in its attributes and prints it indented below itself. A memory plan
prints as `buffer bN : f32[576*T]` lines after the return.
"""

from __future__ import annotations

from kiln.ir.graph import Graph, Node
from kiln.ir.types import STEP_SYMBOLS, tensor_types

_SIGIL = {"input": "%", "param": "@", "state": "&"}


def format_attr(value) -> str:
    if isinstance(value, Graph):
        return value.name
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_attr(v) for v in value) + ")"
    return str(value)


def node_names(graph: Graph) -> dict[Node, str]:
    """The printed name of every node (`%3`, `@weight`, `%input_ids`, `&k_cache.0`)."""
    names, counter = {}, 0
    for node in graph.nodes:
        if node.op in _SIGIL:
            names[node] = _SIGIL[node.op] + node.name
        else:
            names[node] = f"%{counter}"
            counter += 1
    return names


def format_node(node: Node, names: dict[Node, str]) -> str:
    if node.op in _SIGIL:
        extra = [f"{k}={format_attr(v)}" for k, v in sorted(node.attrs.items()) if k not in ("name", "type")]
        return f"{names[node]} = {node.op}{'(' + ', '.join(extra) + ')' if extra else ''} : {node.type}"
    args = [names[i] for i in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in sorted(node.attrs.items())]
    return f"{names[node]} = {node.op}({', '.join(args)}) : {node.type}"


def print_graph(graph: Graph) -> str:
    names = node_names(graph)
    used = set().union(*(d.free_symbols for n in graph.nodes for t in tensor_types(n.type) for d in t.shape))
    symbols = [s for s in STEP_SYMBOLS if s in used] + sorted(used - set(STEP_SYMBOLS), key=str)
    lines = [f"graph {graph.name}({', '.join(map(str, symbols))})"]
    for n in graph.nodes:
        lines.append("  " + format_node(n, names))
        for body in (v for _, v in sorted(n.attrs.items()) if isinstance(v, Graph)):
            lines += ["    " + line for line in print_graph(body).splitlines()]
    lines.append("  return " + ", ".join(f"{k}={names[v]}" for k, v in graph.outputs.items()))
    lines += [f"  buffer b{i} : {t}" for i, t in enumerate(graph.buffers)]
    return "\n".join(lines) + "\n"


def op_counts(graph: Graph) -> dict[str, int]:
    """How many nodes of each non-source op the graph holds, most frequent first."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op not in _SIGIL and n.op != "const":
            counts[n.op] = counts.get(n.op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


__all__ = ["print_graph", "format_node", "format_attr", "node_names", "op_counts"]
