"""Tracing a model spec with torch.fx into an `ir.Graph` of the step function.

The spec's `forward(input_ids, positions)` is traced symbolically; the building blocks of
`frontend.blocks` stay single nodes, and the tracer wires each `Attention` to its own KV-cache
state (`k_cache.<layer>`, `v_cache.<layer>`) and to the step's paged context, each
`LinearAttention` to its recurrent state (`recurrent_state.<layer>`, f32[NS, Hv, Dk, Dv]) and each
`CausalConv1d` to its input window (`conv_state.<layer>`, [NS, K - 1, C]) in the state pool. Output: a graph
whose inputs are the step inputs of `ir.step.STEP_INPUTS` and whose output is `logits: [B, V]`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from kiln.errors import KilnError
from kiln.frontend import blocks, trace_ops
from kiln.frontend.trace_ops import Unsupported
from kiln.ir import NB, NS, Graph, GraphBuilder, KVLayout, Node, TensorType, verify
from kiln.ir.op_types import TypeError_
from kiln.ir.step import STEP_INPUTS


@dataclass(frozen=True)
class StepConfig:
    """What the traced step graph is specialised for: the activation/weight dtype and the
    KV-cache block size."""

    dtype: str = "f32"
    block_size: int = 16


class _LeafTracer(fx.Tracer):
    """Keeps kiln's blocks as leaves (and subclasses that keep their block's forward); records
    each node's source line, so refusals can name the spec's file and line."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _block_of(m) is not None


def _block_of(module: nn.Module) -> type | None:
    """The kiln block whose meaning `module` has: its class or a base class whose forward it
    keeps (a subclass that overrides forward is traced through, as any module)."""
    for base in type(module).__mro__:
        if base in _BLOCKS:
            return base if type(module).forward is base.forward else None
    return None


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
                raise KilnError(f"the model spec is ill-typed at {_where(fx_node)} (`{fx_node.format_node()}`): {e}") from None
            except Unsupported as e:
                raise KilnError(f"the model spec calls {_what(fx_node)} at {_where(fx_node)}, which kiln cannot "
                                f"trace: {e}") from None
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
        return _BLOCKS[_block_of(module)](self, module, *args)

    def _call_function(self, n: fx.Node):
        return self._call(n, n.target, is_method=False)

    def _call_method(self, n: fx.Node):
        return self._call(n, n.target, is_method=True)

    def _call(self, n: fx.Node, target, is_method: bool):
        args, kwargs = self.value(n.args), {k: self.value(v) for k, v in n.kwargs.items()}
        form = (trace_ops.METHODS if is_method else trace_ops.FUNCTIONS).get(target)
        if form is not None:
            try:
                return form(self.builder, *args, **kwargs)
            except TypeError as e:  # a Python signature mismatch of the form
                raise Unsupported(str(e)) from None
        op = trace_ops.lookup(target, is_method)
        if op is None:
            raise self.unsupported(n)
        return trace_ops.bind(self.builder, op, args, kwargs)

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
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        return a

    def step_input(self, name: str) -> Node:
        return self.builder.input(name, STEP_INPUTS[name])

    def param(self, p: nn.Parameter) -> Node:
        return self.builder.param(self.param_names[id(p)], TensorType(tuple(p.shape), self.config.dtype))

    def unsupported(self, n: fx.Node) -> KilnError:
        return KilnError(f"the model spec calls {_what(n)} at {_where(n)}, which kiln cannot trace. kiln traces its "
                         f"blocks (kiln.frontend: Linear, Embedding, RMSNorm, Rope, Attention, LinearAttention, CausalConv1d, "
                         f"Experts, LastTokens) and "
                         f"{trace_ops.supported_calls()}. Write it with those, or add the op to kiln/ir/ops.py")


def _what(n: fx.Node) -> str:
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    name = getattr(n.target, "__name__", str(n.target))
    for prefix, module in (("torch.", torch), ("F.", F)):
        if getattr(module, name, None) is n.target:
            return prefix + name
    return name


def _where(n: fx.Node) -> str:
    """The spec's file:line of fx node `n` (from its recorded stack trace), or its fx name."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', n.stack_trace or "")
    own = [f"{file}:{line}" for file, line in frames if f"{os.sep}torch{os.sep}" not in file]
    return own[-1] if own else f"fx node {n.name!r}"


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


def _linear_attention(c: _Converter, m: blocks.LinearAttention, q, k, v, g, beta=None):
    layer = c.num_layers
    c.num_layers += 1
    state = c.builder.state(f"recurrent_state.{layer}", TensorType((NS, *m.spec.state_shape), "f32"))
    context = [c.step_input(n) for n in ("query_start", "seq_lens", "state_indices")]
    return c.builder.op("linear_attention", q, k, v, g, state, *context, *([beta] if beta is not None else []),
                        spec=m.spec, layer=layer)


def _causal_conv1d(c: _Converter, m: blocks.CausalConv1d, x):
    channels, _, width = m.weight.shape
    state = c.builder.state(f"conv_state.{c.num_layers}", TensorType((NS, width - 1, channels), c.config.dtype))
    weight = c.builder.op("reshape", c.param(m.weight), shape=(channels, width))
    context = [c.step_input(n) for n in ("query_start", "seq_lens", "state_indices")]
    bias = [c.param(m.bias)] if m.bias is not None else []
    return c.builder.op("causal_conv1d", x, weight, state, *context, *bias, activation=m.activation,
                        layer=c.num_layers)


def _experts(c: _Converter, m: blocks.Experts, x, weights, ids):
    params = [m.gate_up_proj, m.down_proj] + ([m.gate_up_proj_bias, m.down_proj_bias] if m.gate_up_proj_bias is not None
                                              else [])
    return c.builder.op("moe", x, weights, ids, *(c.param(p) for p in params), activation=m.activation,
                        alpha=m.alpha, limit=m.limit)


_BLOCKS = {
    blocks.Linear: _linear,
    blocks.Embedding: lambda c, m, ids: c.builder.op("embedding", c.param(m.weight), ids),
    blocks.RMSNorm: lambda c, m, x: c.builder.op("rms_norm", x, *([] if m.weight is None else [c.param(m.weight)]),
                                                 eps=m.eps),
    blocks.Rope: lambda c, m, x, positions: c.builder.op("rope", x, positions, spec=m.spec),
    blocks.Attention: _attention,
    blocks.LinearAttention: _linear_attention,
    blocks.CausalConv1d: _causal_conv1d,
    blocks.Experts: _experts,
    blocks.LastTokens: lambda c, m, x: c.builder.op("gather_rows", x, c.step_input("logits_indices")),
}


def trace(spec: nn.Module, config: StepConfig = StepConfig()) -> Graph:
    """The step graph of `spec` (verified). Raises KilnError for a construct kiln cannot trace."""
    fx_graph = _LeafTracer().trace(spec)
    return _Converter(spec, config).run(fx_graph)
