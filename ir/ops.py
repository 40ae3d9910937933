"""The op registry: every IR op is defined here, once.

An `OpDef` holds all that kiln knows about an op:
  - its kind (fusion decides by kind: elementwise ops fuse into producers and consumers,
    reductions fuse with the elementwise ops around them, matmuls absorb prologues/epilogues),
    arity and type rule (`ir/op_types.py`);
  - its reference meaning (`reference(node, args, bindings)`: what the interpreter runs);
  - its torch spelling for tracing: the torch functions and `Tensor` method names that mean it,
    and its `signature` (argument names in torch's order; `%name` marks a tensor input, other
    names are attributes, with `defaults`);
  - its CPU emission (`cpu`: a torch expression, `{0}`, `{1}` .. the input expressions and
    `{attr}` the node's attributes; or a function of (args, node) for the few that need more);
  - for ops allowed inside a generated row kernel, its Triton expression (`triton`): over fp32
    values `{0}`, `{1}`, .., attributes by name; reductions also read `{mask}` (the valid lanes
    of the row) and `{width}` (the reduced length) and keep the reduced dim (size 1);
  - for collectives (ops across the ranks of a tensor-parallel group), instead of `reference`,
    `collective(node, args_per_rank) -> outputs_per_rank`: what the interpreter runs when it
    simulates the ranks in one process (ir/interpret.interpret_ranks).
Adding an elementwise or row-reduction op is one entry below; the tracer, interpreter, fusion
and both code generators read this table. Composite ops (linear, rope, attention, KV writes)
have kernel templates of their own in codegen.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from kiln.ir import linear_rules, reference
from kiln.ir import op_types as types_
from kiln.ir.types import DTYPES


class OpKind(str, Enum):
    SOURCE = "source"  # graph inputs, weights, mutable state, constants
    ELEMENTWISE = "elementwise"  # pointwise with broadcasting; fuse freely
    REDUCTION = "reduction"  # along one dim (a row kernel renders the last dim): norms, sums, softmax
    MATMUL = "matmul"
    DATA = "data"  # gathers, reshapes, slices: move data, compute nothing
    SHUFFLE = "shuffle"  # reorders or selects across a dim (sort, topk, cat, gather): its own kernel
    POSITIONAL = "positional"  # rotary embedding
    EXPERTS = "experts"  # a mixture of experts: routed tokens through per-expert gated MLPs, one kernel family
    ATTENTION = "attention"  # reads (and, before lowering, writes) the paged KV cache
    STORE = "store"  # writes rows into a state buffer (the paged KV write)
    RECURRENT = "recurrent"  # reads and writes per-sequence state in the state pool (linear attention, conv1d)
    FUSED = "fused"  # a fused group: one kernel whose body is a sub-graph (see FusionPattern)
    COLLECTIVE = "collective"  # combines a value across the ranks of a tensor-parallel group (passes/shard.py)


Reference = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]  # (node, args: list[Tensor], bindings)
CpuEmit = str | Callable[[list[str], Any], str]  # format string, or (args, node: ir.Node) -> expression
Collective = Callable[..., "list[torch.Tensor]"]  # (node, args_per_rank: list[list[Tensor]]) -> one output per rank


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: OpKind
    arity: tuple[int, int]  # (min, max) number of inputs
    infer: Callable  # (input types, attrs) -> output type (ir/op_types.py)
    reference: Reference | None = None  # None: the interpreter runs it specially (sources, fused)
    torch: tuple = ()  # torch callables and "method" names the tracer maps to this op
    signature: tuple[str, ...] = ()  # torch argument names, `%` marks tensor inputs
    defaults: dict = field(default_factory=dict)  # attribute defaults (absent: required)
    cpu: CpuEmit | None = None  # None: codegen/cpu.py renders it (composite ops)
    triton: str | None = None  # fp32 Triton expression inside a row kernel; None: not row-fusable
    side_effects: bool = False  # writes state inputs: never dead-code eliminated
    view: bool = False  # a view of input 0 (reshape, slice, get): moves no data, launches nothing
    aliases: int | None = None  # the output shares the storage of this input (views; kv_write's cache)
    variadic: bool = False  # the first torch argument is a list of tensors (cat)
    collective: Collective | None = None  # a collective's meaning across ranks (it has no `reference`)

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.signature if not n.startswith("%"))


@dataclass(frozen=True)
class FusionPattern:
    """What a `fused` node computes, for codegen to pick a template: the anchor op (the one
    matmul, reduction, gather or attention of the group; None for a purely elementwise group),
    the ops before it (prologue) and after it (epilogue), in body order, views left out.
    Printed as `rms_norm > linear > silu, mul`."""

    anchor: str | None
    prologue: tuple[str, ...] = ()
    epilogue: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.anchor is None:
            return ", ".join(self.epilogue)
        parts = [", ".join(self.prologue), self.anchor, ", ".join(self.epilogue)]
        return " > ".join(p for p in parts if p)


TORCH_DTYPE_NAMES = {name: str(dtype) for name, dtype in DTYPES.items()}  # "f32" -> "torch.float32"


def _ref(fn: Callable, *attrs: str) -> Reference:
    """A reference that calls fn(*args, *attribute values) (attributes in the given order)."""
    return lambda node, args, bindings: fn(*args, *(node.attrs[a] for a in attrs))


def _unary(name, fn, cpu, triton, torch_, infer=types_.same) -> OpDef:
    return OpDef(name, OpKind.ELEMENTWISE, (1, 1), infer, _ref(fn), torch_, ("%x",), cpu=cpu, triton=triton)


def _binary(name, fn, cpu, triton, torch_, infer=types_.broadcast) -> OpDef:
    return OpDef(name, OpKind.ELEMENTWISE, (2, 2), infer, _ref(fn), torch_, ("%x", "%y"), cpu=cpu, triton=triton)


def _masked(reduction: str, fill: str) -> str:
    """A row reduction over the valid lanes of {0}, keeping the reduced dim."""
    return f"tl.{reduction}(tl.where({{mask}}, {{0}}, {fill}), axis=-1, keep_dims=True)"


def _reduction(name, fn, cpu, triton, infer=types_.reduce, defaults=None) -> OpDef:
    return OpDef(name, OpKind.REDUCTION, (1, 1), infer, _ref(fn, "dim", "keepdim"), (getattr(torch, name), name),
                 ("%x", "dim", "keepdim"), defaults or {"keepdim": False}, cpu=cpu, triton=triton)


def _literal(value) -> str:
    """Python source for a constant, infinities and NaN included."""
    return f"float('{value}')" if isinstance(value, float) and not math.isfinite(value) else repr(value)


def _cast_cpu(args, node) -> str:
    return f"{args[0]}.to({TORCH_DTYPE_NAMES[node.attrs['dtype']]})"


def _reshape_cpu(args, node) -> str:
    return f"{args[0]}.reshape({', '.join(str(d) for d in node.type.shape)})"


def _gelu_erf(x):
    return F.gelu(x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _recurrence_args(spec) -> str:
    """The keyword arguments cpu_ops.linear_attention takes for a LinearAttentionSpec."""
    return (f"rule={spec.rule!r}, group={spec.num_v_heads // spec.num_k_heads}, scale={spec.effective_scale!r}, "
            f"qk_l2norm={spec.qk_l2norm!r}")


def _layer_norm(node, args, bindings):
    x, *affine = args
    weight = affine[0] if node.attrs["weight"] else None
    bias = affine[-1] if node.attrs["bias"] else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, node.attrs["eps"])


_OPS = [
    # sources: `input` (step inputs), `param` (weights), `state` (KV cache), `const` (a scalar)
    OpDef("input", OpKind.SOURCE, (0, 0), types_.source),
    OpDef("param", OpKind.SOURCE, (0, 0), types_.source),
    OpDef("state", OpKind.SOURCE, (0, 0), types_.source),
    OpDef("const", OpKind.SOURCE, (0, 0), types_.const,
          lambda node, args, bindings: torch.tensor(node.attrs["value"], dtype=node.type.torch_dtype),
          cpu=lambda args, node: f"torch.tensor({_literal(node.attrs['value'])}, "
                                 f"dtype={TORCH_DTYPE_NAMES[node.type.dtype]})"),
    # elementwise, unary (float)
    _unary("neg", torch.neg, "torch.neg({0})", "-{0}", (torch.neg, operator.neg, "neg"), types_.same_any),
    _unary("abs", torch.abs, "torch.abs({0})", "tl.abs({0})", (torch.abs, operator.abs, "abs"), types_.same_any),
    _unary("exp", torch.exp, "torch.exp({0})", "tl.exp({0})", (torch.exp, "exp")),
    _unary("log", torch.log, "torch.log({0})", "tl.log({0})", (torch.log, "log")),
    _unary("sqrt", torch.sqrt, "torch.sqrt({0})", "tl.sqrt({0})", (torch.sqrt, "sqrt")),
    _unary("rsqrt", torch.rsqrt, "torch.rsqrt({0})", "tl.rsqrt({0})", (torch.rsqrt, "rsqrt")),
    _unary("tanh", torch.tanh, "torch.tanh({0})", "tanh({0})", (torch.tanh, F.tanh, "tanh")),
    _unary("sigmoid", torch.sigmoid, "torch.sigmoid({0})", "tl.sigmoid({0})", (torch.sigmoid, F.sigmoid, "sigmoid")),
    _unary("relu", torch.relu, "torch.relu({0})", "tl.maximum({0}, 0.0)", (torch.relu, F.relu, "relu")),
    _unary("silu", F.silu, "F.silu({0})", "silu({0})", (F.silu,)),
    _unary("gelu", _gelu_erf, "F.gelu({0})", "gelu_erf({0})", ()),  # F.gelu: frontend/trace_ops.py
    _unary("gelu_tanh", _gelu_tanh, "F.gelu({0}, approximate='tanh')", "gelu_tanh({0})", ()),  # F.gelu(approximate="tanh")
    OpDef("softplus", OpKind.ELEMENTWISE, (1, 1), types_.same, _ref(F.softplus, "beta", "threshold"), (F.softplus,),
          ("%x", "beta", "threshold"), {"beta": 1.0, "threshold": 20.0},
          cpu="F.softplus({0}, beta={beta!r}, threshold={threshold!r})", triton="softplus({0}, {beta!r}, {threshold!r})"),
    OpDef("clamp", OpKind.ELEMENTWISE, (1, 1), types_.same_any, _ref(torch.clamp, "min", "max"),
          (torch.clamp, torch.clip, "clamp", "clip"), ("%x", "min", "max"), {"min": None, "max": None},
          cpu="torch.clamp({0}, min={min!r}, max={max!r})", triton="clamp({0}, {min!r}, {max!r})"),
    OpDef("cast", OpKind.ELEMENTWISE, (1, 1), types_.cast, lambda node, a, b: a[0].to(node.type.torch_dtype),
          cpu=_cast_cpu, triton="{0}"),  # kernels compute in fp32 and round when they store
    # elementwise, binary with broadcasting (a Python scalar operand becomes a `const`)
    _binary("add", torch.add, "cpu_ops.add({0}, {1})", "{0} + {1}", (operator.add, torch.add, "add")),
    _binary("sub", torch.sub, "{0} - {1}", "{0} - {1}", (operator.sub, torch.sub, "sub")),
    _binary("mul", torch.mul, "{0} * {1}", "{0} * {1}", (operator.mul, torch.mul, "mul")),
    _binary("div", torch.div, "{0} / {1}", "{0} / {1}", (operator.truediv, torch.div, "div")),
    _binary("pow", torch.pow, "torch.pow({0}, {1})", "pow_({0}, {1})", (operator.pow, torch.pow, "pow")),
    _binary("maximum", torch.maximum, "torch.maximum({0}, {1})", "tl.maximum({0}, {1})", (torch.maximum, "maximum")),
    _binary("minimum", torch.minimum, "torch.minimum({0}, {1})", "tl.minimum({0}, {1})", (torch.minimum, "minimum")),
    *(_binary(name, getattr(torch, name), f"{{0}} {sym} {{1}}", f"{{0}} {sym} {{1}}",
              (getattr(operator, name), getattr(torch, name), name), types_.compare)
      for name, sym in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="))),
    OpDef("where", OpKind.ELEMENTWISE, (3, 3), types_.where, _ref(torch.where), (torch.where,), ("%condition", "%x", "%y"),
          cpu="torch.where({0}, {1}, {2})", triton="tl.where({0}, {1}, {2})"),
    # reductions along `dim` (a row kernel renders those over the last dim)
    _reduction("sum", torch.sum, "torch.sum({0}, dim={dim}, keepdim={keepdim})", _masked("sum", "0.0")),
    _reduction("mean", torch.mean, "torch.mean({0}, dim={dim}, keepdim={keepdim})", _masked("sum", "0.0") + " / {width}"),
    _reduction("amax", torch.amax, "torch.amax({0}, dim={dim}, keepdim={keepdim})", _masked("max", "float('-inf')")),
    _reduction("amin", torch.amin, "torch.amin({0}, dim={dim}, keepdim={keepdim})", _masked("min", "float('inf')")),
    _reduction("argmax", torch.argmax, "torch.argmax({0}, dim={dim}, keepdim={keepdim})", None, types_.arg_reduce),
    _reduction("argmin", torch.argmin, "torch.argmin({0}, dim={dim}, keepdim={keepdim})", None, types_.arg_reduce),
    OpDef("softmax", OpKind.REDUCTION, (1, 1), types_.along_dim, _ref(torch.softmax, "dim"),
          (torch.softmax, F.softmax, "softmax"), ("%x", "dim"), cpu="torch.softmax({0}, dim={dim})",
          triton="softmax({0}, {mask})"),
    OpDef("log_softmax", OpKind.REDUCTION, (1, 1), types_.along_dim, _ref(torch.log_softmax, "dim"),
          (torch.log_softmax, F.log_softmax, "log_softmax"), ("%x", "dim"), cpu="torch.log_softmax({0}, dim={dim})",
          triton="log_softmax({0}, {mask})"),
    OpDef("cumsum", OpKind.REDUCTION, (1, 1), types_.along_dim, _ref(torch.cumsum, "dim"), (torch.cumsum, "cumsum"),
          ("%x", "dim"), cpu="torch.cumsum({0}, dim={dim})", triton=None),
    # norms over the last dim. rms_norm without weight: the weight was folded into the consuming
    # linear (passes/fold_norm_weights); in kernels {1} is the weight, if any, applied by the template
    OpDef("rms_norm", OpKind.REDUCTION, (1, 2), types_.rms_norm,
          lambda node, a, b: reference.rms_norm(a[0], a[1] if len(a) > 1 else None, node.attrs["eps"]),
          signature=("%x", "%weight"), cpu=lambda a, n: f"cpu_ops.rms_norm({a[0]}, {a[1] if len(a) > 1 else None}, "
                                                        f"{n.attrs['eps']!r})",
          triton="rms_norm({0}, {mask}, {width}, {eps!r})"),
    OpDef("layer_norm", OpKind.REDUCTION, (1, 3), types_.layer_norm, _layer_norm,
          cpu=lambda a, n: f"F.layer_norm({a[0]}, {a[0]}.shape[-1:], {a[1] if n.attrs['weight'] else None}, "
                           f"{a[-1] if n.attrs['bias'] else None}, {n.attrs['eps']!r})",
          triton="layer_norm({0}, {mask}, {width}, {eps!r})"),
    # matmul: x [..., K] @ w[N, K]^T (+ bias[N])
    OpDef("linear", OpKind.MATMUL, (2, 3), types_.linear, _ref(F.linear)),
    # data movement
    OpDef("embedding", OpKind.DATA, (2, 2), types_.embedding, lambda node, a, b: F.embedding(a[1].long(), a[0])),
    OpDef("gather_rows", OpKind.DATA, (2, 2), types_.gather_rows, lambda node, a, b: a[0][a[1].long()],
          cpu="cpu_ops.gather_rows({0}, {1})"),
    OpDef("reshape", OpKind.DATA, (1, 1), types_.reshape, lambda node, a, b: a[0].reshape(node.type.concrete_shape(b)),
          cpu=_reshape_cpu, view=True, aliases=0),
    OpDef("slice", OpKind.DATA, (1, 1), types_.slice,
          lambda node, a, b: a[0].narrow(node.attrs["dim"], node.attrs["start"], node.attrs["stop"] - node.attrs["start"]),
          cpu=lambda a, n: f"{a[0]}.narrow({n.attrs['dim']}, {n.attrs['start']}, {n.attrs['stop'] - n.attrs['start']})",
          view=True, aliases=0),
    # element `index` of a multi-output node
    OpDef("get", OpKind.DATA, (1, 1), types_.get, lambda node, a, b: a[0][node.attrs["index"]], cpu="{0}[{index}]",
          view=True, aliases=0),
    # selections and reorderings across a dim: each is its own kernel (a torch op on every target)
    OpDef("topk", OpKind.SHUFFLE, (1, 1), types_.top_k,
          lambda node, a, b: tuple(torch.topk(a[0], node.attrs["k"], node.attrs["dim"], node.attrs["largest"],
                                              node.attrs["sorted"])),
          (torch.topk, "topk"), ("%x", "k", "dim", "largest", "sorted"), {"dim": -1, "largest": True, "sorted": True},
          cpu="tuple(torch.topk({0}, {k}, dim={dim}, largest={largest}, sorted={sorted}))"),
    OpDef("sort", OpKind.SHUFFLE, (1, 1), types_.sort,
          lambda node, a, b: tuple(torch.sort(a[0], dim=node.attrs["dim"], descending=node.attrs["descending"],
                                              stable=node.attrs["stable"])),
          (torch.sort, "sort"), ("%x", "dim", "descending", "stable"), {"dim": -1, "descending": False, "stable": False},
          cpu="tuple(torch.sort({0}, dim={dim}, descending={descending}, stable={stable}))"),
    OpDef("cat", OpKind.SHUFFLE, (1, 1 << 16), types_.cat, lambda node, a, b: torch.cat(a, node.attrs["dim"]),
          (torch.cat, torch.concat, torch.concatenate), ("%tensors", "dim"), {"dim": 0}, variadic=True,
          cpu=lambda a, n: f"torch.cat([{', '.join(a)}], dim={n.attrs['dim']})"),
    OpDef("gather", OpKind.SHUFFLE, (2, 2), types_.gather,
          lambda node, a, b: torch.gather(a[0], node.attrs["dim"], a[1].long()),
          (torch.gather, "gather"), ("%x", "dim", "%index"), cpu="torch.gather({0}, {dim}, {1}.long())"),
    OpDef("index_select", OpKind.SHUFFLE, (2, 2), types_.index_select,
          lambda node, a, b: torch.index_select(a[0], node.attrs["dim"], a[1].long()),
          (torch.index_select, "index_select"), ("%x", "dim", "%index"),
          cpu="torch.index_select({0}, {dim}, {1}.long())"),
    # positional
    OpDef("rope", OpKind.POSITIONAL, (2, 2), types_.rope, lambda node, a, b: reference.rope(a[0], a[1], node.attrs["spec"])),
    # attention over the paged KV cache: writes k, v at slot_mapping, then attends
    OpDef("attention", OpKind.ATTENTION, (9, 10), types_.attention, reference.attention_node, side_effects=True),
    # lowered attention (passes/lower_attention): the KV write, then a paged attention per phase.
    # kv_write(x [T, Hkv, D], cache, slot_mapping) stores the rows and returns the updated cache.
    OpDef("kv_write", OpKind.STORE, (3, 3), types_.kv_write, lambda node, a, b: reference.write_rows(*a),
          side_effects=True, aliases=1),
    # (q, k_cache, v_cache, query_start, seq_lens, block_tables[, sinks]): any mix of chunks
    OpDef("attention_prefill", OpKind.ATTENTION, (6, 7), types_.attention_prefill,
          lambda node, a, b: reference.paged_attention(*a[:6], node.attrs["spec"], *a[6:])),
    # (q [B, H, D], k_cache, v_cache, seq_lens, block_tables[, sinks]): one query per sequence
    OpDef("attention_decode", OpKind.ATTENTION, (5, 6), types_.attention_decode, reference.attention_decode_node),
    # recurrent layers over the state pool (ir/linear_rules.py): each reads its sequence's state at
    # state_indices, or zeros when its chunk starts the sequence, and writes the state after the chunk
    OpDef("linear_attention", OpKind.RECURRENT, (8, 9), types_.linear_attention, linear_rules.linear_attention_node,
          side_effects=True, cpu=lambda a, n: f"cpu_ops.linear_attention({', '.join(a[:8])}, "
                                              f"{a[8] if len(a) > 8 else None}, {_recurrence_args(n.attrs['spec'])})"),
    OpDef("causal_conv1d", OpKind.RECURRENT, (6, 7), types_.causal_conv1d, linear_rules.causal_conv1d_node,
          signature=("activation",), side_effects=True,
          cpu=lambda a, n: f"cpu_ops.causal_conv1d({', '.join(a)}, activation={n.attrs['activation']!r})"),
    # mixture of experts (x [T, K], routing weights [T, k], expert ids [T, k], w_gate_up [E, 2I, K],
    # w_down [E, N, I][, b_gate_up [E, 2I], b_down [E, N]]) -> [T, N]: reference.moe says what it computes
    OpDef("moe", OpKind.EXPERTS, (5, 7), types_.moe, reference.moe_node, signature=("activation", "alpha", "limit"),
          defaults={"alpha": None, "limit": None},
          cpu=lambda a, n: f"cpu_ops.moe({', '.join(a)}, activation={n.attrs['activation']!r}, "
                           f"alpha={n.attrs['alpha']!r}, limit={n.attrs['limit']!r})"),
    # collectives over the `ranks` of a tensor-parallel group (reference.all_reduce, reference.all_gather);
    # a step program calls its communicator `comm` (kiln.runtime.collectives.Comm) for them, on every target
    OpDef("all_reduce", OpKind.COLLECTIVE, (1, 1), types_.all_reduce, cpu="comm.all_reduce({0})",
          collective=lambda node, args: reference.all_reduce([a[0] for a in args])),
    OpDef("all_gather", OpKind.COLLECTIVE, (1, 1), types_.all_gather, cpu="comm.all_gather({0}, {dim})",
          collective=lambda node, args: reference.all_gather([a[0] for a in args], node.attrs["dim"])),
    # one kernel: `body` (a Graph whose inputs in0..inN are this node's inputs), `pattern`
    OpDef("fused", OpKind.FUSED, (1, 1 << 16), types_.fused),
]
OPS: dict[str, OpDef] = {op.name: op for op in _OPS}


def register(op: OpDef) -> OpDef:
    """Adds `op` to the registry (a spec's own op: tests show that one entry is enough)."""
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is already registered")
    OPS[op.name] = op
    return op
