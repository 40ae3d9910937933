"""The reference interpreter: runs any Graph with plain torch ops. It is the oracle every pass
must keep equal, and the baseline that generated kernels are compared with.
"""

from __future__ import annotations

from typing import Callable, Mapping, MutableMapping

import sympy
import torch
import torch.nn.functional as F

from kiln.ir import reference
from kiln.ir.graph import Graph, Node


class InterpretError(Exception):
    """Inputs that do not fit the graph (missing, wrong dtype or shape)."""


def _bind(graph: Graph, values: Mapping[str, torch.Tensor], nodes: list[Node]) -> dict:
    """Binds the graph's symbols from the given tensors' shapes and checks every dim and dtype."""
    bindings: dict[sympy.Symbol, int] = {}
    for node in nodes:
        if node.name not in values:
            raise InterpretError(f"missing {node.op} {node.name!r} ({node.type})")
        tensor = values[node.name]
        if tensor.dim() != node.type.rank or tensor.dtype != node.type.torch_dtype:
            raise InterpretError(f"{node.op} {node.name!r}: expected {node.type}, got {tensor.dtype} {tuple(tensor.shape)}")
        for dim, size in zip(node.type.shape, tensor.shape):
            if isinstance(dim, sympy.Symbol):
                bindings.setdefault(dim, size)
    for node in nodes:
        expected = node.type.concrete_shape(bindings)
        if tuple(values[node.name].shape) != expected:
            raise InterpretError(f"{node.op} {node.name!r}: expected shape {expected} ({node.type}), got {tuple(values[node.name].shape)}")
    return bindings


def _attention(node: Node, args: list[torch.Tensor], bindings) -> torch.Tensor:
    q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping, *sinks = args
    reference.write_kv(k, v, k_cache, v_cache, slot_mapping)
    spec = node.attrs["spec"]
    return reference.paged_attention(q, k_cache, v_cache, query_start, seq_lens, block_tables, spec, *sinks)


def _attention_decode(node: Node, args: list[torch.Tensor], bindings) -> torch.Tensor:
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = args
    one_query_each = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    return reference.paged_attention(q, k_cache, v_cache, one_query_each, seq_lens, block_tables, node.attrs["spec"], *sinks)


def _fused(node: Node, args: list[torch.Tensor], bindings):
    body = node.attrs["body"]
    outputs = interpret(body, {n.name: a for n, a in zip(body.inputs, args)}, {}, {})
    values = tuple(outputs[name] for name in body.outputs)
    return values[0] if len(values) == 1 else values


_Impl = Callable[[Node, list[torch.Tensor], dict], torch.Tensor]
_UNARY = {"neg": torch.neg, "silu": F.silu, "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
          "rsqrt": torch.rsqrt, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
IMPLS: dict[str, _Impl] = {
    **{op: (lambda fn: lambda node, a, b: fn(a[0]))(fn) for op, fn in _UNARY.items()},
    **{op: (lambda fn: lambda node, a, b: fn(a[0], a[1]))(fn) for op, fn in _BINARY.items()},
    "const": lambda node, a, b: torch.tensor(node.attrs["value"], dtype=node.type.torch_dtype),
    "cast": lambda node, a, b: a[0].to(node.type.torch_dtype),
    "rms_norm": lambda node, a, b: reference.rms_norm(a[0], a[1] if len(a) > 1 else None, node.attrs["eps"]),
    "linear": lambda node, a, b: F.linear(*a),
    "embedding": lambda node, a, b: F.embedding(a[1].long(), a[0]),
    "gather_rows": lambda node, a, b: a[0][a[1].long()],
    "reshape": lambda node, a, b: a[0].reshape(node.type.concrete_shape(b)),
    "slice": lambda node, a, b: a[0].narrow(node.attrs["dim"], node.attrs["start"], node.attrs["stop"] - node.attrs["start"]),
    "rope": lambda node, a, b: reference.rope(a[0], a[1], node.attrs["spec"]),
    "attention": _attention,
    "get": lambda node, a, b: a[0][node.attrs["index"]],
    "kv_write": lambda node, a, b: reference.write_rows(*a),
    "attention_prefill": lambda node, a, b: reference.paged_attention(*a[:6], node.attrs["spec"], *a[6:]),
    "attention_decode": _attention_decode,
    "fused": _fused,
}


def interpret(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    states: MutableMapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Runs `graph`. `inputs` holds the step inputs by name, `weights` the params, `states` the
    KV-cache buffers (updated in place by attention and kv_write). Returns the named outputs.
    A multi-output node's value is a tuple of tensors; a `fused` node runs its body."""
    sources = {"input": inputs, "param": weights, "state": states}
    bindings: dict = {}
    for op, values in sources.items():
        bindings.update(_bind(graph, values, graph.sources(op)))
    env: dict[Node, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op in sources:
            env[node] = sources[node.op][node.name]
        elif node.op in IMPLS:
            env[node] = IMPLS[node.op](node, [env[i] for i in node.inputs], bindings)
        else:
            raise InterpretError(f"the interpreter has no implementation of op {node.op!r}")
    return {name: env[node] for name, node in graph.outputs.items()}
