"""GEMM launches: a matmul with the general prologue and epilogue of codegen/kernels/gemm.py,
read from a kernel body.

A body renders as one GEMM when it holds exactly one `linear` (2-D, K and N known) and:
  - its x operand (through reshapes that keep the rows) is computed from body inputs by
    elementwise ops of the op registry (those with a `triton` expression), `rms_norm`s over the
    whole K row (any number, chained: each gets a pre-pass over K) and at most one row gather
    index, all over [M, K] rows, [K] vectors, [M, 1] rows, scalars and constants;
  - everything after it is elementwise over the linear's output or its equal-width column
    slices (a packed projection), [M, N] tiles, [N] vectors, [M, 1] rows, scalars, constants;
  - its outputs are epilogue values ([M, N]) and prologue values ([M, K], stored by the
    first output-tile column), with at least one epilogue output.
`gemm_refusal(body, target)` says why a body does not render (None when it does); `match_gemm`
emits the launch.

A quantized weight (a `param` with attrs["quant"], kiln/quant.py) is read through the quantized
GEMM (codegen/kernels/gemm_quant.py): the program passes its qweight and scales in the weight's
place. Its format comes from the body's weight input when that carries attrs["quant"], else from
the launch's outer weight node (`site.node.inputs[form.weight]`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import sympy

from kiln.codegen.kernels import gemm
from kiln.codegen.match_common import KERNEL_DTYPES, Site, Unsupported, body_of, kernel_dtype, launch_line, require
from kiln.codegen.targets import Target
from kiln.ir import OPS, Graph, Node, OpKind
from kiln.quant import QuantFormat, QuantizedTensor

# Rows that pick each GEMM tile bucket (gemm.bucket); the program picks the bucket per step.
GEMM_BUCKET_ROWS = {"decode": 1, "small": 128, "large": 4096}
MAX_SLICES = 4  # accumulators one main loop may hold (a packed projection's column slices)


@dataclass(frozen=True)
class GemmForm:
    """A matmul with its prologue and epilogue, and where each kernel argument comes from."""

    x: int  # body input index of p_x
    weight: int  # body input index of p_w
    prologue: gemm.Prologue
    epilogue: gemm.Epilogue
    bias: bool
    operands: tuple[int, ...]  # body input index of each of gemm.operands(variant), in order
    outputs: tuple[int, ...]  # body output position of each of gemm.outputs(variant), in order
    rows: sympy.Expr  # M
    n: int
    k: int
    quant: QuantFormat | None = None  # the weight's format when it is quantized


def _literal(node: Node) -> str:
    value = node.attrs["value"]
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"float('{value}')"
    text = repr(float(value)) if node.type.dtype in KERNEL_DTYPES else repr(value)
    return f"({text})" if text.startswith("-") else text


def _strip_views(node: Node) -> Node:
    while node.op == "reshape":
        node = node.inputs[0]
    return node


def _layout(shape: tuple, rows: sympy.Expr, width: int, wide: str, vector: str) -> str | None:
    """The operand layout of an input of `shape` in a [rows, width] computation."""
    shape = tuple(shape)
    numel = sympy.Mul(*shape) if shape else sympy.Integer(1)
    if numel == 1:
        return "s"
    if shape[0] == rows and sympy.simplify(numel - rows * width) == 0:
        return wide
    if numel == width and all(d == 1 for d in shape[:-1]):
        return vector
    if shape[0] == rows and numel == rows:
        return "m" if len(shape) >= 2 else None  # [M] alone would broadcast along columns
    return None


class _Translator:
    """Turns body nodes into named fp32 Triton statements of one part (prologue or epilogue)."""

    def __init__(self, graph: Graph, prefix: str, rows: sympy.Expr, width: int):
        self.graph, self.prefix, self.rows, self.width = graph, prefix, rows, width
        self.names: dict[Node, str] = {}
        self.statements: list[tuple[str, str]] = []
        self.operands: list[tuple[str, str]] = []  # (argument, layout)
        self.sources: list[int] = []  # body input index per operand
        self.ops: list[str] = []

    def operand(self, node: Node, layout: str, name: str) -> str:
        index = self.graph.inputs.index(node)
        for (arg, lay), src in zip(self.operands, self.sources):
            if (lay, src) == (layout, index):
                return f"b_{arg[2:]}"
        self.operands.append((name, layout))
        self.sources.append(index)
        return f"b_{name[2:]}"

    def statement(self, op: str | None, expression: str) -> str:
        """A new value `expression`; `op` (if any) names it in the cache key."""
        name = f"b_{self.prefix}{len(self.statements)}"
        self.statements.append((name, expression))
        if op:
            self.ops.append(op)
        return name

    def elementwise(self, node: Node, args: list[str]) -> str:
        opdef = OPS[node.op]
        require(opdef.kind == OpKind.ELEMENTWISE and opdef.triton is not None,
                f"{node.op} has no Triton expression in the op registry")
        attrs = {k: v for k, v in node.attrs.items() if k != "buffer"}
        return self.statement(node.op, opdef.triton.format(*args, **attrs))


def gemm_form(graph: Graph) -> GemmForm:
    linears = [n for n in graph.nodes if n.op == "linear"]
    require(len(linears) == 1, "a GEMM kernel computes exactly one linear")
    linear = linears[0]
    require(linear.type.rank == 2, f"a linear over {linear.type.rank}-D rows")
    weight = linear.inputs[1]
    require(weight.op == "input", "the weight must be a kernel argument")
    rows, k = linear.type.shape[0], weight.type.shape[1]
    require(k.is_number, "K must be known when compiling")
    k = int(k)
    dtype = kernel_dtype(linear.type)
    for node in graph.nodes:
        if node.op == "input" and node.type.dtype not in ("i32",):
            require(node.type.dtype == linear.type.dtype, f"an operand of {node.type.dtype} in a {dtype} GEMM")

    prologue_nodes = _ancestors(linear.inputs[0])
    outputs = list(graph.outputs.values())
    escaping = [o for o in outputs if _strip_views(o) in prologue_nodes]
    x_node = _strip_views(linear.inputs[0])
    prologue, x_index, operands_p = _prologue(graph, x_node, rows, k, escaping)

    width, slices = _slicing(graph, linear)
    epi_t = _Translator(graph, "v", rows, width)
    epilogue_values = [o for o in outputs if o not in escaping]
    require(epilogue_values, "a GEMM kernel stores at least one value after its linear")
    names = _epilogue(graph, epi_t, linear, width, epilogue_values, prologue_nodes)
    for o in epilogue_values:
        require(linear in _ancestors(o) | {o}, "an output computed without the linear")
        shape = o.type.shape
        require(shape[0] == rows and sympy.Mul(*shape[1:]) == width,
                f"an output of shape {o.type} from a [{rows}, {width}] GEMM")
    epilogue = gemm.Epilogue(tuple(epi_t.ops), slices, tuple(epi_t.operands), tuple(epi_t.statements),
                             tuple(names[o] for o in epilogue_values))
    bias = len(linear.inputs) == 3
    bias_index = []
    if bias:
        require(_strip_views(linear.inputs[2]).op == "input", "the bias must be a kernel argument")
        bias_index = [graph.inputs.index(_strip_views(linear.inputs[2]))]
    # unclaimed nodes: computed but neither feeding the linear nor reaching an output
    used = prologue_nodes | _ancestors_all(outputs)
    left = [n.op for n in graph.nodes if n.op not in ("input", "const") and n not in used]
    require(not left, f"the template does not compute {', '.join(left)}")
    position = {node: i for i, node in enumerate(outputs)}
    return GemmForm(
        x_index, graph.inputs.index(weight), prologue, epilogue, bias,
        tuple(bias_index + operands_p + epi_t.sources),
        tuple(position[o] for o in epilogue_values + escaping), rows, width, k, weight.attrs.get("quant"),
    )


def _ancestors(node: Node) -> set[Node]:
    """`node` and the computed nodes it depends on (inputs and constants left out)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen and n.op not in ("input", "const"):
            seen.add(n)
            stack.extend(n.inputs)
    return seen


def _ancestors_all(nodes: list[Node]) -> set[Node]:
    return set().union(*(_ancestors(n) for n in nodes)) if nodes else set()


def _slicing(graph: Graph, linear: Node) -> tuple[int, int]:
    """(N, slices): the linear is read whole (slices = 1) or as equal-width column slices."""
    full = linear.type.shape[-1]
    require(full.is_number, "N must be known when compiling")
    users = [u for u in graph.nodes if linear in u.inputs]
    pieces = [u for u in users if u.op == "slice"]
    if not pieces:
        return int(full), 1
    require(len(pieces) == len(users) and linear not in graph.outputs.values(),
            "the linear's output read both whole and in slices")
    widths = {p.attrs["stop"] - p.attrs["start"] for p in pieces}
    require(all(p.attrs["dim"] in (-1, linear.type.rank - 1) for p in pieces) and len(widths) == 1,
            "slices of the linear's output of different widths or along its rows")
    width = widths.pop()
    require(all(p.attrs["start"] % width == 0 for p in pieces) and int(full) % width == 0,
            f"slices of width {width} not aligned to the {full} columns of the linear")
    slices = int(full) // width
    require(slices <= MAX_SLICES, f"{slices} column slices (at most {MAX_SLICES} accumulators)")
    return width, slices


def _epilogue(graph: Graph, t: _Translator, linear: Node, width: int, values: list[Node],
              prologue_nodes: set[Node]) -> dict[Node, str]:
    names: dict[Node, str] = {linear: gemm.accumulator(0)}
    counts = {"mn": 0, "n": 0, "m": 0, "s": 0}
    prefixes = {"mn": "p_tile", "n": "p_col", "m": "p_row", "s": "p_scalar"}

    def value(node: Node) -> str:
        if node in names:
            return names[node]
        if node.op == "slice" and node.inputs[0] is linear:
            names[node] = gemm.accumulator(node.attrs["start"] // width)
        elif node.op == "reshape":
            require(node.inputs[0].op != "input" or _layout(node.type.shape, t.rows, width, "mn", "n")
                    == _layout(node.inputs[0].type.shape, t.rows, width, "mn", "n"),
                    f"a reshape {node.inputs[0].type} -> {node.type} in the epilogue")
            names[node] = value(node.inputs[0])
        elif node.op == "const":
            names[node] = _literal(node)
        elif node.op == "input":
            layout = _layout(node.type.shape, t.rows, width, "mn", "n")
            require(layout is not None, f"an epilogue operand of shape {node.type} in a [{t.rows}, {width}] GEMM")
            before = len(t.operands)
            name = t.operand(node, layout, f"{prefixes[layout]}{counts[layout]}")
            counts[layout] += len(t.operands) - before
            names[node] = name
        else:
            require(node not in prologue_nodes, f"the epilogue reads {node.op}, a prologue value")
            require(node.op != "linear", "a second linear")
            require(node.type.rank <= 2 or _layout(node.type.shape, t.rows, width, "mn", "n") == "mn",
                    f"{node.op} over {node.type} in the epilogue")
            names[node] = t.elementwise(node, [value(i) for i in node.inputs])
        return names[node]

    for v in values:
        value(v)
    return names


def _prologue(graph: Graph, x_node: Node, rows, k: int, escaping: list[Node]):
    """(Prologue, body index of p_x, body indices of its operands)."""
    t = _Translator(graph, "p", rows, k)
    norms: list[tuple[str, float]] = []
    prefixes = {"mk": "p_x", "mk_rows": "p_x", "k": "p_kvec", "m": "p_xrow", "s": "p_xscalar"}
    state = {"x": None, "x_layout": "mk", "rows": None}
    escaping_roots = {_strip_views(e) for e in escaping}
    names: dict[Node, str] = {}

    def input_value(node: Node, layout: str) -> str:
        """p_x is the first [M, K] input met from the matmul's x; the others are operands."""
        index = graph.inputs.index(node)
        if state["x"] is None and layout in ("mk", "mk_rows"):
            state["x"], state["x_layout"] = index, layout
        if (index, layout) == (state["x"], state["x_layout"]):
            return "b_x"
        prefix = prefixes[layout]
        number = sum(1 for _, lay in t.operands if prefixes.get(lay) == prefix) + (prefix == "p_x")
        return t.operand(node, layout, f"{prefix}{number}")

    def value(node: Node) -> str:
        if node in names:
            return names[node]
        if node.op == "reshape":
            inner = _strip_views(node)
            require(inner.op != "input" or _layout(inner.type.shape, rows, k, "mk", "k")
                    == _layout(node.type.shape, rows, k, "mk", "k"),
                    f"a reshape {inner.type} -> {node.type} in the prologue")
            names[node] = value(node.inputs[0])
        elif node.op == "const":
            names[node] = _literal(node)
        elif node.op == "input":
            layout = _layout(node.type.shape, rows, k, "mk", "k")
            require(layout is not None, f"a prologue operand of shape {node.type} for a K={k} GEMM")
            names[node] = input_value(node, layout)
        elif node.op == "gather_rows":
            table, index = _strip_views(node.inputs[0]), _strip_views(node.inputs[1])
            require(table.op == "input" and index.op == "input", "a row gather of computed values")
            require(sympy.Mul(*table.type.shape[1:]) == k, f"a gather of rows {table.type} for K={k}")
            rows_index = graph.inputs.index(index)
            require(state["rows"] in (None, rows_index), "two row gathers by different indices")
            if state["rows"] is None:
                state["rows"] = rows_index
                t.operands.insert(0, ("p_rows", "rows"))
                t.sources.insert(0, rows_index)
                t.ops.append("gather_rows")
            names[node] = input_value(table, "mk_rows")
        elif node.op == "rms_norm":
            names[node] = norm(node, defer=False)
        else:
            require(OPS[node.op].kind == OpKind.ELEMENTWISE, f"{node.op} cannot run in a matmul prologue")
            require(node.type.rank <= 2, f"{node.op} over {node.type} in a matmul prologue")
            names[node] = t.elementwise(node, [value(i) for i in node.inputs])
        return names[node]

    def norm(node: Node, defer: bool) -> str:
        """norm j over the K row of its input: b_rstd{j} from a pre-pass; applied here or, when
        deferred, to the accumulators' rows after the loop (the value then leaves it out)."""
        require(node.type.rank == 2 and node.type.shape[-1] == k,
                f"rms_norm over {node.type}: a GEMM prologue normalizes whole [M, K] rows")
        v = value(node.inputs[0])
        w = value(node.inputs[1]) if len(node.inputs) == 2 else None
        rstd = f"b_rstd{len(norms)}"
        norms.append((v, float(node.attrs["eps"])))
        if defer:
            t.ops.append("rms_norm")
            return t.statement(None, f"{v} * {w}") if w else v
        return t.statement("rms_norm", f"{v} * {rstd}" + (f" * {w}" if w else ""))

    scale = None
    users = sum(1 for n in graph.nodes for i in n.inputs if _strip_views(i) is x_node)
    if x_node.op == "rms_norm" and x_node not in escaping_roots and users == 1 and x_node.type.rank == 2 \
            and x_node.type.shape[-1] == k:
        x = norm(x_node, defer=True)
        scale = f"b_rstd{len(norms) - 1}"
        names[x_node] = x
    else:
        x = value(x_node)
    require(x.startswith("b_"), "a matmul of a constant")
    escapes = []
    for e in escaping:
        root = _strip_views(e)
        require(_layout(e.type.shape, rows, k, "mk", "k") == "mk", f"an escaping prologue value of shape {e.type}")
        escapes.append(value(root))
    require(state["x"] is not None, "no [M, K] input feeds the matmul")
    prologue = gemm.Prologue(tuple(t.ops), tuple(t.operands), tuple(t.statements), tuple(norms), x,
                             state["x_layout"], scale, tuple(escapes))
    return prologue, state["x"], list(t.sources)


def gemm_refusal(body: Graph, target: Target) -> str | None:
    """Why `body` does not render as one GEMM kernel for `target`; None when it does."""
    try:
        form = gemm_form(body)
        gemm.choose(target, dtype=kernel_dtype(_linear(body).type), m=1, n=form.n, k=form.k, epilogue=form.epilogue,
                    prologue=form.prologue, bias=form.bias, quant=form.quant)
    except (Unsupported, ValueError) as why:
        return str(why)
    except Exception as why:  # a KilnError from kernel_dtype, a sympy surprise: still a reason
        return f"{type(why).__name__}: {why}"
    return None


def _linear(body: Graph) -> Node:
    return next(n for n in body.nodes if n.op == "linear")


def match_gemm(site: Site) -> None:
    body = body_of(site.node)
    form = gemm_form(body)
    outer = site.node.inputs[form.weight]
    if form.quant is None and outer.op == "param" and "quant" in outer.attrs:
        form = dataclasses.replace(form, quant=outer.attrs["quant"])
    dtype = kernel_dtype(_linear(body).type)
    rows = str(form.rows)
    variants = {bucket: gemm.choose(site.target, dtype=dtype, m=m, n=form.n, k=form.k, epilogue=form.epilogue,
                                    prologue=form.prologue, bias=form.bias, quant=form.quant)
                for bucket, m in GEMM_BUCKET_ROWS.items()}
    kernel = site.program.bucketed(gemm, variants, rows)
    extra = [site.inputs[i] for i in form.operands]
    outs = [site.outputs[j] for j in form.outputs]
    weight = site.inputs[form.weight]
    weights = [f"{weight}.qweight", f"{weight}.scales"] if form.quant else [weight]
    args = [site.inputs[form.x], *weights, *extra, *outs, rows]
    site.lines.append(launch_line(kernel, [rows], args))


def launch_body(body: Graph, target: Target, inputs: list, *, m: int | None = None) -> list:
    """Runs `body` as its GEMM kernel on tensors `inputs` (one per body input, in order; the weight
    may be a QuantizedTensor); returns the body's outputs in order (tests and verification;
    programs launch through `match_gemm`)."""
    form = gemm_form(body)
    weight = inputs[form.weight]
    quant = weight.format if isinstance(weight, QuantizedTensor) else None
    dtype = kernel_dtype(_linear(body).type)
    variant = gemm.choose(target, dtype=dtype, m=m or 1, n=form.n, k=form.k, epilogue=form.epilogue,
                          prologue=form.prologue, bias=form.bias, quant=quant)
    operands = [inputs[i] for i in form.operands]
    bias, operands = (operands[0], operands[1:]) if form.bias else (None, operands)
    result = gemm.launch(variant, inputs[form.x], inputs[form.weight], *operands, bias=bias)
    result = result if isinstance(result, tuple) else (result,)
    by_position = dict(zip(form.outputs, result))
    return [by_position[j].reshape(by_position[j].shape[0], *(int(d) for d in out.type.shape[1:]))
            for j, out in enumerate(body.outputs.values())]
