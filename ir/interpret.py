"""The reference interpreter: runs any Graph with plain torch ops (each op's `reference` in the
op registry, ir/ops.py). It is the oracle every pass
must keep equal, and the baseline that generated kernels are compared with.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

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
    weight (kiln.quant.QuantizedTensor) is read dequantized, in its param's dtype."""
    dense = {p.name: w.dequantize(p.type.torch_dtype) for p in graph.params
             if isinstance(w := weights.get(p.name), QuantizedTensor)}
    weights = {**weights, **dense}
    sources = {"input": inputs, "param": weights, "state": states}
    bindings: dict = {}
    for op, values in sources.items():
        bindings.update(_bind(graph, values, graph.sources(op)))
    env: dict[Node, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op in sources:
            env[node] = sources[node.op][node.name]
        else:
            env[node] = _reference(node.op)(node, [env[i] for i in node.inputs], bindings)
    return {name: env[node] for name, node in graph.outputs.items()}


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
