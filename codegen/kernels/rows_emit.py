"""The `rows` kernel's code generator: a fused row body -> the lines of one Triton program per row.

A value of the body is *evaluated in a context* `_Ctx`: a block [P(L), P(D)] (the aranges
`o_l<P>` [P, 1] and `o_d<P>` [1, P]) and, for each non-row dim of the value, the Triton
expression of its index. A value's natural context indexes its own dims (lead dims unravelled
from `o_l`, the last dim `o_d`); a consumer asks for its operands in its own context, so
  - broadcast operands (weights [D] in [H, D]) align right and load with broadcast offsets;
  - views map the indices: slice adds its start, reshape re-ravels (a packed qkv row's head h,
    lane d reads column start + h * D + d);
  - rope asks for its input a second time with the last index at the partner lane d +- dim/2:
    loads move, elementwise ops follow, and reductions reuse their statistics (computed once in
    their input's natural context), so a per-head norm before rope needs no relayout.
Every expression is named once (`_let` de-duplicates by text), so two uses of one load, one
angle table or one statistic share a variable. Values are fp32 (ints and bools stay as loaded);
a value that is both stored and used again in the kernel is rounded to its dtype first, as a
separate kernel would have read it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import sympy
import torch

from kiln.codegen.kernels import next_power_of_2
from kiln.codegen.match_common import Unsupported, require
from kiln.ir import OPS, Graph, Node, OpKind
from kiln.ir.printer import format_node, node_names
from kiln.ir.types import FLOAT_DTYPES

MAX_BLOCK = 16384  # padded values of one row block a program holds (with 16 warps: 32 per thread)
POINTER_DTYPES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i32": "i32", "i64": "i64", "bool": "i1"}
TRITON_DTYPES = {"f32": "tl.float32", "bf16": "tl.bfloat16", "f16": "tl.float16", "i32": "tl.int32",
                 "i64": "tl.int64", "bool": "tl.int1"}
STATISTICS = ("sum", "mean", "amax", "amin")  # [..., D] -> [..., 1] (keepdim) or [...]
ROW_OPS = ("rms_norm", "layer_norm", "softmax", "log_softmax")  # [..., D] -> [..., D]
REDUCTIONS = STATISTICS + ROW_OPS


def row_dim(body: Graph) -> sympy.Expr:
    """R: the first dim of every output (of the rows a KV write stores)."""
    dims = set()
    for node in body.outputs.values():
        value = node.inputs[0] if node.op == "kv_write" else node
        require(value.type.rank >= 1, f"output {value.type} has no row dim")
        dims.add(value.type.shape[0])
    require(len(dims) == 1, f"its outputs run over different rows ({', '.join(sorted(map(str, dims)))})")
    (rows,) = dims
    require(bool(rows.free_symbols), f"its rows ({rows}) are not a step size (T or B)")
    return rows


def rope_specs(body: Graph) -> list:
    """The distinct rope specs of the body, in order: the `p_rope<k>` tables."""
    return list(dict.fromkeys(n.attrs["spec"] for n in body.nodes if n.op == "rope"))


def describe(node: Node, names: dict[Node, str], rows: sympy.Expr) -> str:
    """`%3 = rms_norm(%1, %in1, eps=1e-06) : f32[R, 4, 64]` (the rows named R in any phase)."""
    return re.sub(rf"\b{rows}\b", "R", format_node(node, names))


@dataclass(frozen=True)
class _Ex:
    """A Triton expression and the block axes ("l", "d") it varies along."""

    text: str
    axes: frozenset = frozenset()

    def paren(self) -> str:
        return f"({self.text})" if " " in self.text or self.text.startswith("-") else self.text


ZERO = _Ex("0")


def _affine(terms: list[tuple[_Ex, int]], const: int = 0) -> _Ex:
    parts, axes = [], frozenset()
    for ex, k in terms:
        if k and ex.text != "0":
            parts.append(ex.text if k == 1 else f"{ex.paren()} * {k}")
            axes |= ex.axes
    if const:
        parts.append(str(const))
    return _Ex(" + ".join(parts) or "0", axes)


def _div(ex: _Ex, k: int) -> _Ex:
    return ex if k == 1 or ex.text == "0" else _Ex(f"{ex.paren()} // {k}", ex.axes)


def _mod(ex: _Ex, k: int) -> _Ex:
    return ZERO if k == 1 or ex.text == "0" else _Ex(f"{ex.paren()} % {k}", ex.axes)


def _strides(shape: tuple[int, ...]) -> list[int]:
    return [math.prod(shape[k + 1:]) for k in range(len(shape))]


def _unravel(flat: _Ex, shape: tuple[int, ...]) -> list[_Ex]:
    """The indices into `shape` (row-major) of flat index `flat` (< its numel)."""
    strides = _strides(shape)
    return [ZERO if size == 1 else _div(flat, stride) if k == 0 else _mod(_div(flat, stride), size)
            for k, (size, stride) in enumerate(zip(shape, strides))]


def _reshape_indices(indices: tuple[_Ex, ...], shape_out: tuple[int, ...], shape_in: tuple[int, ...]) -> list[_Ex]:
    """The indices into `shape_in` of the element at `indices` of its reshape to `shape_out`,
    re-ravelled group by group (dims whose products match), so unchanged dims stay as they are."""
    result, i, j = [], 0, 0
    while i < len(shape_out) or j < len(shape_in):
        group_out, group_in = [i] if i < len(shape_out) else [], [j] if j < len(shape_in) else []
        size_out = shape_out[i] if group_out else 1
        size_in = shape_in[j] if group_in else 1
        i, j = i + bool(group_out), j + bool(group_in)
        while size_out != size_in:
            if size_out < size_in:
                group_out.append(i)
                size_out, i = size_out * shape_out[i], i + 1
            else:
                group_in.append(j)
                size_in, j = size_in * shape_in[j], j + 1
        sub_out = tuple(shape_out[k] for k in group_out)
        flat = _affine([(indices[k], s) for k, s in zip(group_out, _strides(sub_out))])
        result += _unravel(flat, tuple(shape_in[k] for k in group_in))
    return result


@dataclass(frozen=True)
class _Ctx:
    """Where a value is evaluated: its logical row shape, the index expression of each dim, and
    the block (valid lead rows L, valid lanes D) whose aranges those expressions use."""

    shape: tuple[int, ...]
    indices: tuple[_Ex, ...]
    block: tuple[int, int]

    @property
    def key(self) -> tuple:
        return self.block, self.shape, tuple(ex.text for ex in self.indices)

    def with_indices(self, shape: tuple[int, ...], indices) -> _Ctx:
        return _Ctx(tuple(shape), tuple(indices), self.block)


class Emitter:
    """Renders `body` (see the module docstring). `tile`: lanes per program along the last dim
    (tiled elementwise bodies) or None; `decomposed`: row ops (norms, softmax) to render as
    statistics + an elementwise apply because some consumer needs them in another context."""

    def __init__(self, body: Graph, rows: sympy.Expr, tile: int | None, decomposed: frozenset):
        self.body, self.rows, self.tile, self.decomposed = body, rows, tile, decomposed
        self.names = node_names(body)
        self.lines: list[str] = ["i_r = tl.program_id(0).to(tl.int64)"] + (["i_c = tl.program_id(1)"] if tile else [])
        self.named: dict[str, str] = {}  # expression text -> its variable
        self.values: dict[tuple, _Ex] = {}  # (node, context key) -> value
        self.foreign: set[Node] = set()  # row ops evaluated outside their natural context
        self.max_block = 1
        self.specs = rope_specs(body)
        self.input_index = {n: k for k, n in enumerate(body.inputs)}
        self.tables = {n.inputs[0] for n in body.nodes if n.op in ("embedding", "gather_rows")}
        self.caches = {n.inputs[1] for n in body.nodes if n.op == "kv_write"}
        self._row: dict[Node, bool] = {}
        users = body.users()
        stored = set(body.outputs.values()) | {n.inputs[0] for n in body.nodes if n.op == "kv_write"}
        self.rounded = {n for n in stored if n.type.dtype in ("bf16", "f16") and n.op not in ("input", "slice", "reshape")
                        and any(u.op != "kv_write" for u in users[n])}

    # -- driving --

    def run(self) -> None:
        for node in self.body.nodes:
            require(node.op != "kv_write" or node in self.body.outputs.values(), "a KV write that is not an output")
            if node.op in REDUCTIONS and node.inputs[0].type.rank > 1:
                self._check_width(self._shape(node.inputs[0]), reduction=True)
        for j, node in enumerate(self.body.outputs.values()):
            if node.op == "kv_write":
                self._store_kv(node)
            else:
                self._store_output(j, node)

    def _store_output(self, j: int, node: Node) -> None:
        require(self._is_row(node), f"output {self.names[node]} has no row dim")
        shape = self._shape(node)
        ctx = self._natural(shape)
        value = self.value(node, ctx)
        offsets = _affine(list(zip(ctx.indices, _strides(shape))))
        mask = self._mask(ctx, offsets.axes)
        if not offsets.axes:  # one value per row: a [1, 1] pointer block stores a scalar and a kept-dim reduction alike
            offsets = _Ex(f"{offsets.text} + tl.zeros((1, 1), tl.int64)" if offsets.text != "0" else
                          "tl.zeros((1, 1), tl.int64)", frozenset("ld"))
        self._comment(f"out{j} = {self.names[node]}: [R, {', '.join(map(str, shape))}] contiguous")
        self._store(f"p_out{j}", self._row_base(shape), offsets, value, node.type.dtype, mask)

    def _store_kv(self, node: Node) -> None:
        x, cache, slots = node.inputs
        require(cache.op == "input" and self._is_row(x), "a KV write of row values into a cache argument")
        shape = self._shape(x)
        ctx = self._natural(shape)
        value = self.value(x, ctx)
        slot = self._let(f"{self.value(slots, ctx.with_indices((), ())).paren()}.to(tl.int64)", frozenset(), "b_slot")
        offsets = _affine(list(zip(ctx.indices, _strides(shape))))
        mask = " & ".join(m for m in (self._mask(ctx, offsets.axes), f"({slot.text} >= 0)") if m)
        self._comment(f"{describe(node, self.names, self.rows)}: at slot_mapping[r] (-1: nothing)")
        self._store(f"p_in{self.input_index[cache]}", f"{slot.text} * {math.prod(shape)}", offsets, value,
                    cache.type.dtype, mask)

    def _store(self, pointer: str, base: str, offsets: _Ex, value: _Ex, dtype: str, mask: str | None) -> None:
        address = " + ".join(p for p in (pointer, base, offsets.text) if p and p != "0")
        cast = f"{value.paren()}.to({TRITON_DTYPES[dtype]})"
        self.lines.append(f"tl.store({address}, {cast}" + (f", mask={mask})" if mask else ")"))

    # -- names, blocks, masks --

    def _comment(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def _define(self, name: str, text: str) -> str:
        if name not in self.named.values():
            self.lines.append(f"{name} = {text}")
            self.named[text] = name
        return name

    def _let(self, text: str, axes: frozenset, hint: str) -> _Ex:
        """`text` as a variable (one per distinct text) named after `hint`."""
        if text not in self.named:
            taken = set(self.named.values())
            name = hint if hint not in taken else next(f"{hint}_{k}" for k in range(1, len(taken) + 2)
                                                       if f"{hint}_{k}" not in taken)
            self.lines.append(f"{name} = {text}")
            self.named[text] = name
        return _Ex(self.named[text], axes)

    def _let_many(self, text: str, hints: list[str]) -> list[str]:
        """`a, b = text` (a helper returning a tuple), once per text."""
        key = f"{text} #tuple"
        if key not in self.named:
            taken = set(self.named.values())
            names = [h if h not in taken else f"{h}_{len(taken)}" for h in hints]
            self.lines.append(f"{', '.join(names)} = {text}")
            self.named[key] = ", ".join(names)
        return self.named[key].split(", ")

    def _arange(self, axis: str, padded: int) -> _Ex:
        if axis == "l":
            return _Ex(self._define(f"o_l{padded}", f"tl.arange(0, {padded})[:, None]"), frozenset("l"))
        if self.tile:
            text = f"i_c * {padded} + tl.arange(0, {padded})[None, :]"  # this program's tile of the row
            return _Ex(self._define(f"o_d{padded}", text), frozenset("d"))
        return _Ex(self._define(f"o_d{padded}", f"tl.arange(0, {padded})[None, :]"), frozenset("d"))

    def _padded(self, block: tuple[int, int]) -> tuple[int, int]:
        return next_power_of_2(block[0]), self.tile or next_power_of_2(block[1])

    def _natural(self, shape: tuple[int, ...], *, reduction: bool = False) -> _Ctx:
        """The context of a value of `shape` in its own [L, D] block."""
        if not shape:
            return _Ctx((), (), (1, 1))
        block = self._check_width(shape, reduction=reduction)
        padded_l, padded_d = self._padded(block)
        self.max_block = max(self.max_block, padded_l * padded_d)
        lead = _unravel(self._arange("l", padded_l), shape[:-1]) if block[0] > 1 else [ZERO] * (len(shape) - 1)
        last = self._arange("d", padded_d) if block[1] > 1 else ZERO
        return _Ctx(shape, (*lead, last), block)

    def _check_width(self, shape: tuple[int, ...], *, reduction: bool) -> tuple[int, int]:
        """The [L, D] block of `shape`, if a program can hold it."""
        block = (math.prod(shape[:-1]), shape[-1])
        padded_l, padded_d = self._padded(block)
        require(not self.tile or block[0] == 1, "a tiled row holds [R, N] values only")
        if padded_l * padded_d > MAX_BLOCK:
            what = (f"a reduction over {block[1]} channels" if reduction and padded_l == 1 else
                    f"a row block of {block[0]} x {block[1]} values")
            raise Unsupported(f"{what} is wider than a row kernel holds ({MAX_BLOCK} values)")
        return block

    def _mask(self, ctx: _Ctx, axes: frozenset, *, full: bool = False) -> str | None:
        """The valid lanes of `ctx` along `axes` (None: all valid); `full`: always a block mask."""
        (rows, lanes), (padded_l, padded_d) = ctx.block, self._padded(ctx.block)
        parts = []
        if ("l" in axes or full) and rows != padded_l:
            parts.append(self._define(f"m_l{rows}", f"o_l{padded_l} < {rows}"))
        if ("d" in axes and lanes % padded_d) or full:
            self._arange("d", padded_d)
            parts.append(self._define(f"m_d{lanes}", f"o_d{padded_d} < {lanes}"))
        return " & ".join(parts) or None

    def _row_base(self, shape: tuple[int, ...]) -> str:
        numel = math.prod(shape)
        return "i_r" if numel == 1 else f"i_r * {numel}"

    # -- values --

    def _is_row(self, node: Node) -> bool:
        if node not in self._row:
            if node.op == "input":
                row = node not in self.tables and node not in self.caches and node.type.rank >= 1 \
                    and node.type.shape[0] == self.rows
            elif node.op in ("embedding", "gather_rows", "kv_write"):
                row = True
            else:
                row = any(self._is_row(i) for i in node.inputs)
            self._row[node] = row
        return self._row[node]

    def _shape(self, node: Node) -> tuple[int, ...]:
        """The value's dims within a row (all dims for a weight)."""
        dims = node.type.shape[1:] if self._is_row(node) else node.type.shape
        require(all(d.is_number for d in dims), f"{self.names[node]} {node.type}: a dim other than the rows varies")
        return tuple(int(d) for d in dims)

    def _align(self, ctx: _Ctx, shape: tuple[int, ...]) -> _Ctx:
        """`ctx` for an operand of `shape` that broadcasts into ctx.shape (aligned right)."""
        if shape == ctx.shape:
            return ctx
        offset = len(ctx.shape) - len(shape)
        require(offset >= 0 and all(s in (1, ctx.shape[k + offset]) for k, s in enumerate(shape)),
                f"a value of shape {list(shape)} where {list(ctx.shape)} is computed")
        return ctx.with_indices(shape, (ZERO if s == 1 else ctx.indices[k + offset] for k, s in enumerate(shape)))

    def value(self, node: Node, ctx: _Ctx) -> _Ex:
        """`node` evaluated in `ctx` (broadcast from its own shape)."""
        ctx = self._align(ctx, self._shape(node))
        key = (node, ctx.key)
        if key not in self.values:
            compute = _COMPUTE.get(node.op)
            if compute is None:
                opdef = OPS.get(node.op)
                require(opdef is not None and opdef.kind == OpKind.ELEMENTWISE and opdef.triton is not None,
                        f"{node.op} has no row-kernel form")
                compute = Emitter._elementwise
            value = compute(self, node, ctx)
            if node in self.rounded:
                value = self._let(f"{value.paren()}.to({TRITON_DTYPES[node.type.dtype]}).to(tl.float32)", value.axes,
                                  self._hint(node))
            self.values[key] = value
        return self.values[key]

    def _hint(self, node: Node) -> str:
        return "b_" + self.names[node].lstrip("%@&")

    def _op_comment(self, node: Node, ctx: _Ctx, note: str = "") -> None:
        self._comment(describe(node, self.names, self.rows) + note)

    def _load(self, node: Node, base: str | None, ctx: _Ctx) -> _Ex:
        offsets = _affine(list(zip(ctx.indices, _strides(ctx.shape))))
        address = " + ".join(p for p in (f"p_in{self.input_index[node]}", base, offsets.text) if p and p != "0")
        mask = self._mask(ctx, offsets.axes)
        is_float = node.type.dtype in FLOAT_DTYPES
        text = f"tl.load({address}" + (f", mask={mask}, other=0{'.0' if is_float else ''})" if mask else ")")
        return self._let(text + (".to(tl.float32)" if is_float else ""), offsets.axes, self._hint(node))

    def _input(self, node: Node, ctx: _Ctx) -> _Ex:
        require(node not in self.tables and node not in self.caches,
                f"{self.names[node]} is read both as a table or cache and as values")
        return self._load(node, self._row_base(ctx.shape) if self._is_row(node) else None, ctx)

    def _const(self, node: Node, ctx: _Ctx) -> _Ex:
        value = node.attrs["value"]
        if node.type.dtype in FLOAT_DTYPES:
            value = torch.tensor(value, dtype=node.type.torch_dtype).item()  # as the reference rounds it
            text = repr(value) if math.isfinite(value) else f"float('{value}')"
        else:
            text = repr(bool(value)) if node.type.dtype == "bool" else repr(int(value))
        return _Ex(text)

    def _gather(self, node: Node, ctx: _Ctx) -> _Ex:
        table, ids = node.inputs
        require(table.op == "input", f"{node.op} reads its table directly")
        index = self._let(f"{self.value(ids, ctx.with_indices((), ())).paren()}.to(tl.int64)", frozenset(), "b_row")
        self._op_comment(node, ctx, f": row {index.text} of the table")
        return self._load(table, f"{index.text} * {math.prod(ctx.shape)}", ctx)

    def _slice(self, node: Node, ctx: _Ctx) -> _Ex:
        source = node.inputs[0]
        dim = node.attrs["dim"] % node.type.rank
        if self._is_row(node):
            require(dim != 0, "a slice of the rows")
            dim -= 1
        indices = list(ctx.indices)
        indices[dim] = _affine([(indices[dim], 1)], node.attrs["start"])
        return self.value(source, ctx.with_indices(self._shape(source), indices))

    def _reshape(self, node: Node, ctx: _Ctx) -> _Ex:
        source = node.inputs[0]
        if self._is_row(node):
            require(node.type.shape[0] == source.type.shape[0] == self.rows, "a reshape that moves values across rows")
        shape_in = self._shape(source)
        return self.value(source, ctx.with_indices(shape_in, _reshape_indices(ctx.indices, ctx.shape, shape_in)))

    def _elementwise(self, node: Node, ctx: _Ctx) -> _Ex:
        operands = [self.value(i, ctx) for i in node.inputs]
        text = OPS[node.op].triton.format(*(o.paren() for o in operands), **node.attrs)
        self._op_comment(node, ctx)
        return self._let(text, frozenset().union(*(o.axes for o in operands)), self._hint(node))

    def _cast(self, node: Node, ctx: _Ctx) -> _Ex:
        (source,) = node.inputs
        value, src, dst = self.value(source, ctx), source.type.dtype, node.attrs["dtype"]
        if dst in FLOAT_DTYPES:
            text = value.text if src in FLOAT_DTYPES else f"{value.paren()}.to(tl.float32)"
            if dst != "f32" and src != dst:  # rounds, as the reference's cast does
                text = f"({text}).to({TRITON_DTYPES[dst]}).to(tl.float32)"
            if text == value.text:
                return value
        else:
            text = f"({value.paren()} != 0)" if dst == "bool" else f"{value.paren()}.to({TRITON_DTYPES[dst]})"
        self._op_comment(node, ctx)
        return self._let(text, value.axes, self._hint(node))

    # -- reductions: statistics in the input's natural context --

    def _statistic(self, node: Node, ctx: _Ctx, natural: _Ctx, stat: _Ex, lead: tuple[_Ex, ...]) -> _Ex:
        """`stat` ([P(L), 1], per lead row of `natural`) where `ctx` needs it at lead indices `lead`."""
        if natural.block[0] == 1 or tuple(e.text for e in lead) == tuple(e.text for e in natural.indices[:-1]):
            return stat
        target = self._natural(natural.shape[:-1])  # a statistic without keepdim, in its own layout
        padded = self._padded(target.block)
        require(tuple(e.text for e in lead) == tuple(e.text for e in target.indices)
                and next_power_of_2(natural.block[0]) == padded[0] * padded[1]
                and (target.block[0] == 1 or padded[1] == target.block[1]),
                f"{self.names[node]} {node.op} reduces [{', '.join(map(str, natural.shape))}] rows and its "
                f"result is needed in another layout ([{', '.join(map(str, ctx.shape))}])")
        axes = frozenset().union(*(e.axes for e in target.indices))
        return self._let(f"tl.reshape({stat.text}, ({padded[0]}, {padded[1]}))", axes, stat.text + "_t")

    def _reduction(self, node: Node, ctx: _Ctx) -> _Ex:
        x = node.inputs[0]
        dim = node.attrs.get("dim", -1) % x.type.rank
        require(dim == x.type.rank - 1, f"{node.op} along dim {dim} of {x.type}, not the last")
        require(not self._is_row(x) or x.type.rank > 1, f"{node.op} across the rows")
        shape = self._shape(x)
        natural = self._natural(shape, reduction=True)
        x_natural = self.value(x, natural)
        mask = self._mask(natural, frozenset("ld"), full=True)
        width, hint, attrs = shape[-1], self._hint(node), dict(node.attrs)
        if node.op in STATISTICS:
            self._op_comment(node, ctx)
            text = OPS[node.op].triton.format(x_natural.paren(), mask=mask, width=width, **attrs)
            stat = self._let(text, natural.indices[0].axes if natural.block[0] > 1 else frozenset(), hint)
            lead = ctx.indices[:-1] if node.attrs.get("keepdim", False) else ctx.indices
            return self._statistic(node, ctx, natural, stat, lead)
        if ctx.key != natural.key:
            self.foreign.add(node)
        if node not in self.decomposed and ctx.key == natural.key:
            self._op_comment(node, ctx)
            text = OPS[node.op].triton.format(x_natural.paren(), mask=mask, width=width, **attrs)
            return self._affine_epilogue(node, ctx, self._let(text, x_natural.axes | natural.indices[-1].axes, hint))
        lead_axes = natural.indices[0].axes if natural.block[0] > 1 else frozenset()
        x_ctx = self.value(x, ctx)
        self._op_comment(node, ctx, "" if ctx.key == natural.key else " (at the lanes of another context)")
        if node.op == "rms_norm":
            rstd = self._let(f"rms_norm_rstd({x_natural.paren()}, {mask}, {width}, {attrs['eps']!r})", lead_axes,
                             hint + "_rstd")
            rstd = self._statistic(node, ctx, natural, rstd, ctx.indices[:-1])
            normalized = self._let(f"{x_ctx.paren()} * {rstd.text}", x_ctx.axes | lead_axes, hint)
            return self._affine_epilogue(node, ctx, normalized)
        if node.op == "layer_norm":
            mean, rstd = self._let_many(f"layer_norm_stats({x_natural.paren()}, {mask}, {width}, {attrs['eps']!r})",
                                        [hint + "_mean", hint + "_rstd"])
            for s in (mean, rstd):
                self._statistic(node, ctx, natural, _Ex(s, lead_axes), ctx.indices[:-1])
            return self._affine_epilogue(node, ctx, self._let(f"({x_ctx.paren()} - {mean}) * {rstd}",
                                                              x_ctx.axes | lead_axes, hint))
        peak, total = self._let_many(f"softmax_stats({x_natural.paren()}, {mask})", [hint + "_max", hint + "_sum"])
        for s in (peak, total):
            self._statistic(node, ctx, natural, _Ex(s, lead_axes), ctx.indices[:-1])
        text = (f"tl.exp({x_ctx.paren()} - {peak}) / {total}" if node.op == "softmax" else
                f"{x_ctx.paren()} - {peak} - tl.log({total})")
        return self._let(text, x_ctx.axes | lead_axes, hint)

    def _affine_epilogue(self, node: Node, ctx: _Ctx, normalized: _Ex) -> _Ex:
        """rms_norm: rounded to x's dtype (as reference.rms_norm), times the weight; layer_norm:
        times the weight, plus the bias (those present)."""
        if node.op == "rms_norm":
            if node.type.dtype != "f32":
                normalized = self._let(f"{normalized.text}.to({TRITON_DTYPES[node.type.dtype]}).to(tl.float32)",
                                       normalized.axes, self._hint(node) + "_rounded")
            affine = [("*", w) for w in node.inputs[1:]]
        elif node.op == "layer_norm":
            weight, bias = node.attrs["weight"], node.attrs["bias"]
            affine = ([("*", node.inputs[1])] if weight else []) + ([("+", node.inputs[-1])] if bias else [])
        else:
            return normalized
        for symbol, operand in affine:
            value = self.value(operand, ctx)
            normalized = self._let(f"{normalized.text} {symbol} {value.paren()}", normalized.axes | value.axes,
                                   self._hint(node) + ("_scaled" if symbol == "*" else "_shifted"))
        return normalized

    # -- rope: the partner lane re-evaluated --

    def _rope(self, node: Node, ctx: _Ctx) -> _Ex:
        x, positions = node.inputs
        spec = node.attrs["spec"]
        require(spec.dim % 2 == 0, f"rotary embedding over an odd number of channels ({spec.dim})")
        half, dim, lanes = spec.dim // 2, spec.dim, ctx.shape[-1]
        lane = ctx.indices[-1]
        lane_text = lane.paren()
        partner_text = (f"({lane_text} + {half}) % {dim}" if dim == lanes else  # contiguous runs: vector loads
                        f"tl.where({lane_text} < {half}, {lane_text} + {half}, "
                        f"tl.where({lane_text} < {dim}, {lane_text} - {half}, {lane_text}))")
        # the angles first: few values are live across sin/cos (whose rare slow path is a call)
        position = self._let(f"{self.value(positions, ctx.with_indices((), ())).paren()}.to(tl.float32)", frozenset(),
                             "b_position")
        table = self.specs.index(spec)
        inv_freq = self._let(f"tl.load(p_rope{table} + {_mod(lane, half).text})", lane.axes, f"b_inv_freq{table}")
        angle = self._let(f"{position.text} * {inv_freq.text}", lane.axes, "b_angle")
        factor = "" if spec.attention_factor == 1.0 else f" * {spec.attention_factor!r}"  # YaRN, LongRoPE
        cos = self._let(f"tl.cos({angle.text}){factor}", lane.axes, "b_cos")
        sin = self._let(f"tl.sin({angle.text}){factor}", lane.axes, "b_sin")
        partner = self._let(partner_text, lane.axes, "o_partner")
        x_here = self.value(x, ctx)
        x_partner = self.value(x, ctx.with_indices(ctx.shape, (*ctx.indices[:-1], partner)))
        self._op_comment(node, ctx, f": lanes < {dim} rotate with lane +- {half}")
        axes = x_here.axes | x_partner.axes | lane.axes
        text = (f"{x_here.paren()} * {cos.text} + tl.where({lane_text} < {half}, -{x_partner.paren()}, "
                f"{x_partner.paren()}) * {sin.text}")
        if dim < lanes:
            text = f"tl.where({lane_text} < {dim}, {text}, {x_here.paren()})"
        return self._let(text, axes, self._hint(node))


_COMPUTE = {
    "input": Emitter._input, "const": Emitter._const, "slice": Emitter._slice, "reshape": Emitter._reshape,
    "embedding": Emitter._gather, "gather_rows": Emitter._gather, "cast": Emitter._cast, "rope": Emitter._rope,
    **{op: Emitter._reduction for op in REDUCTIONS},
}
