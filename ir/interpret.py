"""The reference interpreter: runs any Graph with plain torch ops (each op's `reference` in the
op registry, ir/ops.py). It is the oracle every pass must keep equal, and the baseline that
generated kernels are compared with. `interpret_ranks` runs a tensor-parallel graph's ranks
side by side in one process, its collectives combining their values.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import sympy
import torch

from kiln.ir.graph import Graph, Node
from kiln.ir.ops import OPS
from kiln.quant import QuantizedTensor


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
            got = tuple(values[node.name].shape)
            raise InterpretError(f"{node.op} {node.name!r}: expected shape {expected} ({node.type}), got {got}")
    return bindings


def _fused(node: Node, args: list[torch.Tensor], bindings):
    body = node.attrs["body"]
    outputs = interpret(body, {n.name: a for n, a in zip(body.inputs, args)}, {}, {})
    values = tuple(outputs[name] for name in body.outputs)
    return values[0] if len(values) == 1 else values


def _reference(op: str):
    """The reference meaning of `op` (the registry's, or the fused node's body)."""
    if op == "fused":
        return _fused
    if op in OPS and OPS[op].collective is not None:
        raise InterpretError(f"{op} is a collective: only interpret_ranks runs it (with every rank's inputs)")
    if op not in OPS or OPS[op].reference is None:
        raise InterpretError(f"the interpreter has no implementation of op {op!r}")
    return OPS[op].reference


def interpret(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor | QuantizedTensor],
    states: MutableMapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Runs `graph`. `inputs` holds the step inputs by name, `weights` the params, `states` the
    KV-cache buffers (updated in place by attention and kv_write). Returns the named outputs.
    A multi-output node's value is a tuple of tensors; a `fused` node runs its body. A quantized
    weight (kiln.quant.QuantizedTensor) is read dequantized, in its param's dtype. A graph with
    collectives over several ranks runs with `interpret_ranks`."""
    return interpret_ranks(graph, inputs, [weights], [states])[0]


def interpret_ranks(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    weights: Sequence[Mapping[str, torch.Tensor | QuantizedTensor]],
    states: Sequence[MutableMapping[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Runs `graph` as the ranks of a tensor-parallel group, simulated in this process: rank r
    reads `weights[r]` and `states[r]` (its shards, passes/shard.py) and every rank the same step
    `inputs`. The ranks advance in lockstep, node by node: an ordinary node runs on each rank
    alone; a collective (all_reduce, all_gather) takes every rank's inputs at once and gives each
    rank its output, as its op's `collective` says. Returns each rank's outputs, in rank order."""
    if len(weights) != len(states) or not weights:
        raise InterpretError(f"{len(weights)} ranks of weights but {len(states)} of states")
    ranks = [_Rank(graph, inputs, w, s) for w, s in zip(weights, states)]
    for node in graph.nodes:
        opdef = OPS.get(node.op)
        if opdef is not None and opdef.collective is not None:
            if node.attrs["ranks"] != len(ranks):
                raise InterpretError(f"{node.op} combines {node.attrs['ranks']} ranks; {len(ranks)} were simulated")
            for rank, value in zip(ranks, opdef.collective(node, [rank.args(node) for rank in ranks])):
                rank.env[node] = value
        else:
            for rank in ranks:
                rank.run(node)
    return [{name: rank.env[node] for name, node in graph.outputs.items()} for rank in ranks]


class _Rank:
    """One rank's sources (bound to the graph's symbols) and the values it has computed."""

    def __init__(self, graph: Graph, inputs: Mapping[str, torch.Tensor],
                 weights: Mapping[str, torch.Tensor | QuantizedTensor], states: MutableMapping[str, torch.Tensor]):
        dense = {p.name: w.dequantize(p.type.torch_dtype) for p in graph.params
                 if isinstance(w := weights.get(p.name), QuantizedTensor)}
        self.sources = {"input": inputs, "param": {**weights, **dense}, "state": states}
        self.bindings: dict = {}
        for op, values in self.sources.items():
            self.bindings.update(_bind(graph, values, graph.sources(op)))
        self.env: dict[Node, torch.Tensor] = {}

    def args(self, node: Node) -> list[torch.Tensor]:
        return [self.env[i] for i in node.inputs]

    def run(self, node: Node) -> None:
        if node.op in self.sources:
            self.env[node] = self.sources[node.op][node.name]
        else:
            self.env[node] = _reference(node.op)(node, self.args(node), self.bindings)


def run_body(graph: Graph, tensors: list[torch.Tensor], compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Runs `graph` (typically a kernel body) on positional input tensors, op by op through the
    registry's references, without the interpreter's dtype checks: in the tensors' own dtypes, or
    with the float inputs cast to `compute_dtype` (float64: an exact oracle for kernel tests).
    Returns the outputs in order."""
    bindings: dict[sympy.Symbol, int] = {}
    for node, tensor in zip(graph.inputs, tensors):
        bindings.update({d: size for d, size in zip(node.type.shape, tensor.shape) if isinstance(d, sympy.Symbol)})
    env: dict[Node, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op == "input":
            tensor = tensors[graph.inputs.index(node)]
            env[node] = tensor.to(compute_dtype) if compute_dtype and tensor.is_floating_point() else tensor
        else:
            env[node] = _reference(node.op)(node, [env[i] for i in node.inputs], bindings)
    return [env[node] for node in graph.outputs.values()]
