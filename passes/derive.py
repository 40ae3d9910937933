"""Weight transforms as data: a pass that changes weights never touches tensors.

It declares a derived `param` whose `derive` attribute says how to compute it from the original
weights, as a small frozen expression: a weight name (str), `ConcatWeights(parts, dim)`,
`ScaleColumns(weight, by)` or `ElementwiseWeights(op, parts, attrs, dtype)`; expressions nest (a
packed q/k/v weight with a norm folded into it is `ScaleColumns(ConcatWeights(...), by=...)`).
`materialize_weights` evaluates every param of a lowered graph once, when the compiler writes the
artifact (and in tests, to interpret it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import torch

from kiln.errors import KilnError
from kiln.ir import DTYPES, OPS, Graph, Node, TensorType
from kiln.quant import QuantizedTensor, Weight

WeightExpr = Union[str, "ConcatWeights", "ScaleColumns", "ElementwiseWeights"]


@dataclass(frozen=True)
class ConcatWeights:
    """torch.cat(parts, dim): packs the weights of linears that read the same input."""

    parts: tuple[WeightExpr, ...]
    dim: int = 0

    def __str__(self) -> str:
        return f"concat({', '.join(_show(p) for p in self.parts)}; dim={self.dim})"


@dataclass(frozen=True)
class ScaleColumns:
    """weight [N, K] * by [K] along K (in fp32, cast back): a norm weight folded into a linear."""

    weight: WeightExpr
    by: WeightExpr

    def __str__(self) -> str:
        return f"scale_columns({_show(self.weight)}, by={_show(self.by)})"


@dataclass(frozen=True)
class ElementwiseWeights:
    """An elementwise op of the IR registry over weights and scalar constants (floats), with the
    op's attributes as sorted (name, value) pairs, giving `dtype`: a computation that reads no
    step input (Qwen3-Next's and Mamba2's A = -exp(A_log)), done once at compile time."""

    op: str
    parts: tuple[WeightExpr | float, ...]
    attrs: tuple[tuple[str, object], ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.op}({','.join(repr(p) if isinstance(p, float) else _show(p) for p in self.parts)})"


def _show(expr: WeightExpr) -> str:
    return f"@{expr}" if isinstance(expr, str) else str(expr)


def weight_expr(param: Node) -> WeightExpr:
    """How `param` is computed from the original weights: its `derive`, or its own name."""
    return param.attrs.get("derive", param.name)


def packed_name(names: list[str]) -> str:
    """A readable name for weights packed together: the dotted segments they share stay, the
    differing middles are joined by '+': `a.q_proj.weight`, `a.k_proj.weight` -> `a.q_proj+k_proj.weight`."""
    split = [n.split(".") for n in names]
    head = 0
    while all(len(s) > head + 1 for s in split) and len({s[head] for s in split}) == 1:
        head += 1
    tail = 0
    while all(len(s) > head + tail + 1 for s in split) and len({s[-1 - tail] for s in split}) == 1:
        tail += 1
    middles = [".".join(s[head:len(s) - tail]) for s in split]
    return ".".join(split[0][:head] + ["+".join(middles)] + (split[0][len(split[0]) - tail:] if tail else []))


def _evaluate(expr: WeightExpr, weights: Mapping[str, Weight], cache: dict) -> Weight:
    if expr in cache:
        return cache[expr]
    if isinstance(expr, str):
        if expr not in weights:
            raise KilnError(f"the weights have no tensor {expr!r}, which the compiled graph needs: "
                            "load the checkpoint that the graph was traced from")
        value = weights[expr]
    elif isinstance(expr, ConcatWeights):
        parts = [_evaluate(p, weights, cache) for p in expr.parts]
        if isinstance(parts[0], QuantizedTensor) and expr.dim == 0:
            value = QuantizedTensor.cat(parts)
        else:
            value = torch.cat([_dense(p) for p in parts], dim=expr.dim)
    elif isinstance(expr, ElementwiseWeights):
        args = [torch.tensor(p) if isinstance(p, float) else _dense(_evaluate(p, weights, cache)) for p in expr.parts]
        node = Node(expr.op, (), dict(expr.attrs), TensorType((), expr.dtype))  # what the op's reference reads
        value = OPS[expr.op].reference(node, args, {}).to(DTYPES[expr.dtype])
    else:
        w, by = _dense(_evaluate(expr.weight, weights, cache)), _evaluate(expr.by, weights, cache)
        value = (w.float() * by.float()[None, :]).to(w.dtype)
    cache[expr] = value
    return value


def _dense(value: Weight) -> torch.Tensor:
    """A quantized weight read where no quantized form can exist (passes never ask for one)."""
    if isinstance(value, QuantizedTensor):
        raise KilnError(f"a {value.format} weight cannot be rearranged this way: it stays quantized only where "
                        "linears and embeddings read it (a compiler bug; report it)")
    return value


def materialize_weights(graph: Graph, weights: Mapping[str, Weight]) -> dict[str, Weight]:
    """Every param of `graph` (by its name) computed from the original `weights` (by theirs). A
    param marked `quant` is a QuantizedTensor in that format; the others are dense tensors."""
    cache: dict = {}
    out: dict[str, Weight] = {}
    for param in graph.params:
        value = _evaluate(weight_expr(param), weights, cache)
        quant = param.attrs.get("quant")
        found = value.format if isinstance(value, QuantizedTensor) else value.dtype
        if tuple(value.shape) != param.type.concrete_shape({}) or found != (quant or param.type.torch_dtype):
            needs = f"{param.type} as {quant}" if quant else str(param.type)
            raise KilnError(f"weight {param.name!r} computes to {found} {tuple(value.shape)}, but the graph "
                            f"needs {needs}: the weights do not belong to this model")
        out[param.name] = value if isinstance(value, QuantizedTensor) else value.contiguous()
    return out
