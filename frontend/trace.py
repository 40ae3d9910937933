"""Tracing a model spec with torch.fx into an `ir.Graph` of the step function.

The spec's `forward(input_ids, positions)` is traced symbolically; the building blocks of
`frontend.blocks` stay single nodes, and the tracer wires each `Attention` to its own KV-cache
state (`k_cache.<layer>`, `v_cache.<layer>`) and to the step's paged context. Output: a graph
whose inputs are the step inputs of `ir.step.STEP_INPUTS` and whose output is `logits: [B, V]`.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F
from torch import fx, nn

from kiln.errors import KilnError
from kiln.frontend import blocks
from kiln.ir import NB, Graph, GraphBuilder, KVLayout, Node, TensorType, verify
from kiln.ir.ops import TypeError_
from kiln.ir.step import STEP_INPUTS


@dataclass(frozen=True)
class StepConfig:
    """What the traced step graph is specialised for: the activation/weight dtype and the
    KV-cache block size."""

    dtype: str = "f32"
    block_size: int = 16


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, blocks.LEAF_BLOCKS)


_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg", F.silu: "silu", torch.tanh: "tanh", torch.exp: "exp",
    torch.sigmoid: "sigmoid", torch.rsqrt: "rsqrt",
}
_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg", "tanh": "tanh",
            "exp": "exp", "sigmoid": "sigmoid", "rsqrt": "rsqrt"}


class _Converter:
    """Walks an fx graph in order, emitting IR nodes; `env` maps fx nodes to IR nodes (or to
    lists of them, for `split`/`chunk` results)."""

    def __init__(self, spec: nn.Module, config: StepConfig):
        self.spec, self.config = spec, config
        self.builder = GraphBuilder("step")
        self.param_names = {id(p): name for name, p in spec.named_parameters()}
        self.env: dict[fx.Node, object] = {}
        self.num_layers = 0

    def run(self, fx_graph: fx.Graph) -> Graph:
        for fx_node in fx_graph.nodes:
            handler = getattr(self, f"_{fx_node.op}")
            try:
                self.env[fx_node] = handler(fx_node)
            except TypeError_ as e:
                raise KilnError(f"the model spec is ill-typed at {fx_node.format_node()}: {e}") from None
        graph = self.builder.build()
        verify(graph)
        return graph

    # ---- fx node kinds
    def _placeholder(self, n: fx.Node):
        if n.target not in ("input_ids", "positions"):
            raise KilnError(f"a spec's forward takes (input_ids, positions); it also asks for {n.target!r}")
        return self.step_input(n.target)

    def _get_attr(self, n: fx.Node):
        return self.param(self.spec.get_parameter(n.target))

    def _call_module(self, n: fx.Node):
        module = self.spec.get_submodule(n.target)
        args = [self.value(a) for a in n.args]
        return _BLOCKS[type(module)](self, module, *args)

    def _call_function(self, n: fx.Node):
        if n.target is operator.getitem:
            return self.getitem(self.value(n.args[0]), n.args[1])
        if n.target is F.gelu and n.kwargs.get("approximate") == "tanh":
            return self.builder.op("gelu_tanh", self.value(n.args[0]))
        if n.target in _FUNCTIONS:
            return self.elementwise(_FUNCTIONS[n.target], n)
        raise self.unsupported(n, getattr(n.target, "__name__", str(n.target)))

    def _call_method(self, n: fx.Node):
        if n.target in _METHODS:
            return self.elementwise(_METHODS[n.target], n)
        x = self.value(n.args[0])
        rest = [self.value(a) for a in n.args[1:]]
        if n.target in ("view", "reshape"):
            return self.reshape(x, rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        if n.target == "flatten":
            start = rest[0] % x.type.rank if rest else 0
            return self.reshape(x, x.type.shape[:start] + (sympy.Mul(*x.type.shape[start:]),))
        if n.target == "unflatten":
            dim = rest[0] % x.type.rank
            return self.reshape(x, x.type.shape[:dim] + tuple(rest[1]) + x.type.shape[dim + 1 :])
        if n.target in ("split", "chunk"):
            return self.split(x, n.target, rest[0], n.kwargs.get("dim", rest[1] if len(rest) > 1 else 0))
        if n.target in ("float", "to"):
            dtype = "f32" if n.target == "float" else {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[rest[0]]
            return self.builder.op("cast", x, dtype=dtype)
        raise self.unsupported(n, f"Tensor.{n.target}")

    def _output(self, n: fx.Node):
        logits = self.value(n.args[0])
        if not isinstance(logits, Node) or logits.type.shape[0] != STEP_INPUTS["logits_indices"].shape[0]:
            raise KilnError("a spec's forward must return logits [B, vocab]: end it with LastTokens() and the LM head")
        self.builder.output("logits", logits)

    # ---- helpers
    def value(self, a):
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (tuple, list)):
            return type(a)(self.value(x) for x in a)
        return a

    def step_input(self, name: str) -> Node:
        return self.builder.input(name, STEP_INPUTS[name])

    def param(self, p: nn.Parameter) -> Node:
        return self.builder.param(self.param_names[id(p)], TensorType(tuple(p.shape), self.config.dtype))

    def elementwise(self, op: str, n: fx.Node) -> Node:
        args = [self.value(a) for a in n.args]
        dtype = next(a.type.dtype for a in args if isinstance(a, Node))
        args = [a if isinstance(a, Node) else self.builder.op("const", value=float(a), dtype=dtype) for a in args]
        return self.builder.op(op, *args)

    def reshape(self, x: Node, shape) -> Node:
        shape = [sympy.sympify(d) for d in shape]
        if any(d == -1 for d in shape):
            known = sympy.Mul(*[d for d in shape if d != -1])
            shape = [sympy.simplify(x.type.numel / known) if d == -1 else d for d in shape]
        return self.builder.op("reshape", x, shape=tuple(shape))

    def split(self, x: Node, how: str, arg, dim: int) -> list[Node]:
        dim = dim % x.type.rank
        size = int(x.type.shape[dim])
        sizes = [size // arg] * arg if how == "chunk" else ([arg] * (size // arg) if isinstance(arg, int) else list(arg))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self.builder.op("slice", x, dim=dim, start=s, stop=s + z) for s, z in zip(starts, sizes)]

    def getitem(self, x, index):
        if isinstance(x, list):
            return x[index]
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (x.type.rank - len(index) + 1) + index[at + 1 :]
        for dim, s in enumerate(index):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise KilnError(f"a spec indexes a tensor with {index!r}; only plain slices a:b are supported")
            if s != slice(None):
                size = int(x.type.shape[dim])
                start, stop, _ = s.indices(size)
                x = self.builder.op("slice", x, dim=dim, start=start, stop=stop)
        return x

    def unsupported(self, n: fx.Node, what: str) -> KilnError:
        return KilnError(f"the model spec uses {what} (fx node {n.name!r}), which kiln cannot trace: "
                         "write it with kiln.frontend blocks, elementwise ops, view/reshape/flatten/split/chunk")


def _linear(c: _Converter, m: blocks.Linear, x):
    bias = [c.param(m.bias)] if m.bias is not None else []
    return c.builder.op("linear", x, c.param(m.weight), *bias)


def _attention(c: _Converter, m: blocks.Attention, q, k, v):
    spec = dataclasses.replace(m.spec, kv_layout=KVLayout(c.config.block_size))
    layer = c.num_layers
    c.num_layers += 1
    cache = TensorType((NB, spec.kv_layout.block_size, spec.num_kv_heads, spec.head_dim), c.config.dtype)
    caches = [c.builder.state(f"{kv}_cache.{layer}", cache) for kv in "kv"]
    context = [c.step_input(n) for n in ("query_start", "seq_lens", "block_tables", "slot_mapping")]
    sinks = [c.param(m.sinks)] if m.sinks is not None else []
    return c.builder.op("attention", q, k, v, *caches, *context, *sinks, spec=spec, layer=layer)


_BLOCKS = {
    blocks.Linear: _linear,
    blocks.Embedding: lambda c, m, ids: c.builder.op("embedding", c.param(m.weight), ids),
    blocks.RMSNorm: lambda c, m, x: c.builder.op("rms_norm", x, c.param(m.weight), eps=m.eps),
    blocks.Rope: lambda c, m, x, positions: c.builder.op("rope", x, positions, spec=m.spec),
    blocks.Attention: _attention,
    blocks.LastTokens: lambda c, m, x: c.builder.op("gather_rows", x, c.step_input("logits_indices")),
}


def trace(spec: nn.Module, config: StepConfig = StepConfig()) -> Graph:
    """The step graph of `spec` (verified). Raises KilnError for a construct kiln cannot trace."""
    fx_graph = _LeafTracer().trace(spec)
    return _Converter(spec, config).run(fx_graph)
