"""Which kernel template runs each launch of a lowered graph, and with which arguments.

Every compute node of a lowered graph is one kernel launch (passes/fuse.py). A matcher reads the
node (a plain op, or a `fused` node's body) and emits the program lines that launch its kernel,
through a `Site`: the Python expressions of the node's inputs and outputs, and the program
being built (which registers each variant for rendering and compilation). The forms:

  embedding(table, ids), gather_rows(x, idx)        gather_rows
  [gather_rows,] [rms_norm >] linear [> epilogue]   gemm: prologue gather_rows / rms_norm /
                                                    norm_weight; epilogue bias, silu_mul (the
                                                    packed gate/up halves), silu, gelu_tanh, residual
  rope, rope, kv_write, kv_write                    kv_write_rope (q and k rotated from the packed
                                                    qkv row, k and v stored in the paged caches)
  rms_norm > rope [, kv_write, kv_write]            head_norm_rope (Qwen3's per-head q or k norm and
                                                    rope; for k, k and v stored in the paged caches)
  attention_prefill                                 attention_prefill
  attention_decode                                  attention_decode, split-K + attention_reduce
                                                    when the context is long and the batch small

A form that no template implements raises KilnError naming the node and its pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from kiln.codegen.kernels import (attention_decode, attention_prefill, attention_reduce, gather_rows, gemm,
                                  head_norm_rope, kv_write_rope)
from kiln.codegen.kernels.attention import AttentionParams
from kiln.codegen.targets import Target
from kiln.errors import KilnError
from kiln.ir import Graph, GraphBuilder, Node, TensorType

KERNEL_DTYPES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
TORCH_DTYPE_NAMES = {"f32": "torch.float32", "bf16": "torch.bfloat16", "f16": "torch.float16"}
# Rows that pick each GEMM tile bucket (gemm.bucket); the program picks the bucket per step.
GEMM_BUCKET_ROWS = {"decode": 1, "small": 128, "large": 4096}


class ProgramBuilder(Protocol):
    """What matchers need from the program being built (codegen/gpu_program.py)."""

    target: Target

    def variant(self, kind, variant) -> str:
        """Registers `variant` of kernel module `kind`; returns the program constant naming it."""

    def bucketed(self, kind, variants: dict[str, object], rows: str) -> str:
        """Registers one variant per tile bucket; returns the expression that picks by `rows`."""

    def rope_table(self, spec) -> str:
        """The expression of `spec`'s inv_freq table on the launcher's device."""

    def hoist(self, name: str, expression: str) -> str:
        """Computes `expression` once per step (before the launches) as `name`; returns `name`."""


@dataclass
class Site:
    """One launch node in the program: `inputs`/`outputs` are Python expressions of its input
    values and of its outputs' planned buffers (None: the output is a KV cache it writes)."""

    node: Node
    inputs: list[str]
    outputs: list[str | None]
    program: ProgramBuilder
    lines: list[str] = field(default_factory=list)

    @property
    def target(self) -> Target:
        return self.program.target


def launch_line(kind, kernel: str, grid_args: str, args: list[str]) -> str:
    """`launcher.launch(kernel, <kind>.grid(grid_args), args...)`: the grid from the kind's helper."""
    return f"launcher.launch({kernel}, {kind.__name__.rsplit('.', 1)[1]}.grid({grid_args}), {', '.join(args)})"


def body_of(node: Node) -> Graph:
    """A fused node's body; a plain node as a one-node body (inputs in0..inN, output out0)."""
    if node.op == "fused":
        return node.attrs["body"]
    builder = GraphBuilder(f"plain_{node.op}")
    inputs = [builder.input(f"in{i}", value.type) for i, value in enumerate(node.inputs)]
    builder.output("out0", builder.op(node.op, *inputs, **node.attrs))
    return builder.build()


def pattern_of(node: Node) -> str:
    return str(node.attrs["pattern"]) if node.op == "fused" else node.op


def kernel_dtype(type_: TensorType) -> str:
    if type_.dtype not in KERNEL_DTYPES:
        raise KilnError(f"the GPU kernels run f32, bf16 and f16 activations, not {type_.dtype}; compile with --dtype bf16")
    return KERNEL_DTYPES[type_.dtype]


class _Unsupported(Exception):
    """A body that does not have the form a matcher implements (the reason is the message)."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise _Unsupported(reason)


class _Body:
    """Reads a body: which body input a value is, and which compute nodes a matcher has claimed."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.claimed: set[Node] = set()

    def input_index(self, node: Node) -> int:
        _require(node.op == "input", f"{node.op} where a kernel argument (a body input) was expected")
        return self.graph.inputs.index(node)

    def claim(self, *nodes: Node) -> None:
        self.claimed.update(nodes)

    def check_all_claimed(self) -> None:
        left = [n.op for n in self.graph.nodes if n.op != "input" and n not in self.claimed]
        _require(not left, f"the template does not compute {', '.join(left)}")


# -- gemm -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmForm:
    """A matmul with its prologue and epilogue: body input indices of each kernel operand."""

    x: int
    weight: int
    prologue: tuple[str, ...]
    epilogue: tuple[str, ...]
    operands: dict[str, int]  # gemm operand name ("p_rows", "p_bias", ...) -> body input index
    eps: float | None


def gemm_form(graph: Graph) -> GemmForm:
    body = _Body(graph)
    linears = [n for n in graph.nodes if n.op == "linear"]
    _require(len(linears) == 1, "a GEMM kernel computes exactly one linear")
    linear = linears[0]
    body.claim(linear)
    operands, prologue, eps = {}, [], None
    x = linear.inputs[0]
    while x.op in ("reshape", "rms_norm", "gather_rows"):
        body.claim(x)
        if x.op == "rms_norm":
            _require(not prologue, "rms_norm must come right before the linear")
            _require(x.type.shape[-1] == linear.inputs[0].type.shape[-1], "a norm over part of the matmul's rows")
            prologue.insert(0, "rms_norm")
            eps = x.attrs["eps"]
            if len(x.inputs) == 2:
                prologue.append("norm_weight")
                operands["p_norm_weight"] = body.input_index(x.inputs[1])
        elif x.op == "gather_rows":
            prologue.insert(0, "gather_rows")
            operands["p_rows"] = body.input_index(x.inputs[1])
        x = x.inputs[0]
    epilogue = _epilogue(body, linear, operands)
    if len(linear.inputs) == 3:
        _require("silu_mul" not in epilogue, "a bias on the packed gate/up projection")
        epilogue.insert(0, "bias")
        operands["p_bias"] = body.input_index(linear.inputs[2])
    body.check_all_claimed()
    return GemmForm(body.input_index(x), body.input_index(linear.inputs[1]), tuple(prologue), tuple(epilogue),
                    operands, eps)


def _epilogue(body: _Body, linear: Node, operands: dict[str, int]) -> list[str]:
    """The epilogue ops from the linear to the body's one output, in order."""
    _require(len(body.graph.outputs) == 1, "a GEMM kernel writes one output")
    ops, node = [], next(iter(body.graph.outputs.values()))
    while node is not linear:
        body.claim(node)
        if node.op in ("silu", "gelu_tanh"):
            ops.insert(0, node.op)
            node = node.inputs[0]
        elif node.op == "add":
            chain = [i for i in node.inputs if i.op != "input"]
            _require(len(chain) == 1, "an add of the matmul result and one tensor")
            residual = next(i for i in node.inputs if i.op == "input")
            _require(residual.type.shape == node.type.shape, f"add of a {residual.type} to the matmul result")
            operands["p_residual"] = body.input_index(residual)
            ops.insert(0, "residual")
            node = chain[0]
        elif node.op == "mul":
            _match_silu_mul(body, node, linear)
            ops.insert(0, "silu_mul")
            node = linear
        else:
            raise _Unsupported(f"{node.op} in a matmul epilogue")
    return ops


def _match_silu_mul(body: _Body, mul: Node, linear: Node) -> None:
    """mul(silu(linear[..., :N]), linear[..., N:]) with linear's output 2N wide."""
    gate, up = sorted(mul.inputs, key=lambda n: n.op != "silu")
    _require(gate.op == "silu" and up.op == "slice", "a mul that is not silu(gate) * up")
    gate_slice = gate.inputs[0]
    width = linear.type.shape[-1]
    for piece, start in ((gate_slice, 0), (up, width // 2)):
        _require(piece.op == "slice" and piece.inputs[0] is linear and piece.attrs["dim"] in (-1, linear.type.rank - 1)
                 and (piece.attrs["start"], piece.attrs["stop"]) == (start, start + width // 2),
                 "silu * mul over other than the two halves of the packed gate/up projection")
    body.claim(gate, gate_slice, up)


def match_gemm(site: Site) -> None:
    node, body = site.node, body_of(site.node)
    form = gemm_form(body)
    weight, out = body.inputs[form.weight].type, node.type
    dtype, n, k = kernel_dtype(out), int(out.shape[-1]), int(weight.shape[1])
    rows = str(out.shape[0])
    variants = {bucket: gemm.choose(site.target, dtype=dtype, m=m, n=n, k=k, epilogue=form.epilogue,
                                    prologue=form.prologue) for bucket, m in GEMM_BUCKET_ROWS.items()}
    kernel = site.program.bucketed(gemm, variants, rows)
    extra = [site.inputs[form.operands[operand]] for operand in gemm.operands(variants["decode"])]
    eps = [repr(float(form.eps))] if form.eps is not None else []
    args = [site.inputs[form.x], site.inputs[form.weight], *extra, site.outputs[0], rows, *eps]
    site.lines.append(launch_line(gemm, kernel, f"{kernel}, {rows}", args))


# -- row kernels ------------------------------------------------------------------------------

def match_gather_rows(site: Site) -> None:
    """embedding(table, ids) or gather_rows(x, idx): out[r] = table[index[r]]."""
    node = site.node
    _require(node.op != "fused", "a row gather fused with other ops (only a matmul prologue gathers rows)")
    _require(node.inputs[0].type.rank == 2, "a row gather from a 2-D table")
    table, index = site.inputs
    variant = gather_rows.choose(site.target, dtype=kernel_dtype(node.type), dim=int(node.type.shape[-1]))
    kernel = site.program.variant(gather_rows, variant)
    rows = str(node.type.shape[0])
    site.lines.append(launch_line(gather_rows, kernel, f"{kernel}, {rows}", [index, table, site.outputs[0]]))


def match_kv_write_rope(site: Site) -> None:
    """q = rope(qkv[:, q]), k_cache[slots] = rope(qkv[:, k]), v_cache[slots] = qkv[:, v]."""
    graph = body_of(site.node)
    body = _Body(graph)
    writes = [n for n in graph.nodes if n.op == "kv_write"]
    ropes = [n for n in graph.nodes if n.op == "rope"]
    _require(len(writes) == 2 and len(ropes) == 2, "two ropes and two KV writes")
    k_write, v_write = sorted(writes, key=lambda w: w.inputs[0].op != "rope")
    q_rope = next(r for r in ropes if r is not k_write.inputs[0])
    k_rope = k_write.inputs[0]
    _require(q_rope.attrs["spec"] == k_rope.attrs["spec"] and q_rope.inputs[1] is k_rope.inputs[1],
             "q and k rotated alike")
    _require(k_write.inputs[2] is v_write.inputs[2], "k and v written at the same slots")
    spec = q_rope.attrs["spec"]
    _require(spec.dim == spec.head_dim, "rotary embedding over part of each head")
    heads, kv_heads, dim = int(q_rope.type.shape[1]), int(k_rope.type.shape[1]), spec.head_dim
    qkv = None
    for value, start, width in ((q_rope.inputs[0], 0, heads), (k_rope.inputs[0], heads, kv_heads),
                                (v_write.inputs[0], heads + kv_heads, kv_heads)):
        reshape = value
        _require(reshape.op == "reshape" and reshape.inputs[0].op == "slice", "q, k and v sliced from one packed row")
        piece = reshape.inputs[0]
        _require(piece.attrs["dim"] in (1, -1) and (piece.attrs["start"], piece.attrs["stop"])
                 == (start * dim, (start + width) * dim), "q, k, v packed in that order, heads contiguous")
        _require(qkv in (None, piece.inputs[0]), "q, k and v from one packed row")
        qkv = piece.inputs[0]
        body.claim(reshape, piece)
    body.claim(*writes, *ropes)
    body.check_all_claimed()
    _require(list(graph.outputs.values()) == [q_rope, k_write, v_write], "outputs (q, k cache, v cache)")
    variant = kv_write_rope.choose(dtype=kernel_dtype(q_rope.type), num_heads=heads, num_kv_heads=kv_heads,
                                   head_dim=dim, qkv_stride=int(qkv.type.shape[1]))
    kernel = site.program.variant(kv_write_rope, variant)
    arg = {name: site.inputs[body.input_index(value)] for name, value in (
        ("qkv", qkv), ("positions", q_rope.inputs[1]), ("slots", k_write.inputs[2]),
        ("k_cache", k_write.inputs[1]), ("v_cache", v_write.inputs[1]))}
    tokens = str(qkv.type.shape[0])
    site.lines.append(launch_line(kv_write_rope, kernel, f"{kernel}, {tokens}", [
        arg["qkv"], arg["positions"], site.program.rope_table(spec), arg["slots"], site.outputs[0],
        arg["k_cache"], arg["v_cache"]]))


def _packed_slice(body: _Body, value: Node) -> tuple[Node, int]:
    """`value` = reshape(slice(qkv, last dim, start:...)): the packed row and the slice's start."""
    _require(value.op == "reshape" and value.inputs[0].op == "slice", "heads sliced from one packed row")
    piece = value.inputs[0]
    _require(piece.attrs["dim"] in (-1, piece.type.rank - 1), "a slice along the packed row")
    body.claim(value, piece)
    return piece.inputs[0], piece.attrs["start"]


def match_norm_rope(site: Site) -> None:
    """Per-head RMSNorm then rope of q or k sliced from the packed qkv row (Qwen3's q/k norm);
    for k, also the KV write of k and v. One head_norm_rope launch."""
    graph = body_of(site.node)
    body = _Body(graph)
    norms, ropes = [n for n in graph.nodes if n.op == "rms_norm"], [n for n in graph.nodes if n.op == "rope"]
    _require(len(norms) == 1 and len(ropes) == 1 and ropes[0].inputs[0] is norms[0], "one rms_norm, then one rope")
    norm, rotary = norms[0], ropes[0]
    _require(len(norm.inputs) == 2 and norm.type.rank == 3, "a per-head norm with a weight")
    spec = rotary.attrs["spec"]
    _require(spec.dim == spec.head_dim, "rotary embedding over part of each head")
    qkv, start = _packed_slice(body, norm.inputs[0])
    body.claim(norm, rotary)
    writes = [n for n in graph.nodes if n.op == "kv_write"]
    arg = lambda value: site.inputs[body.input_index(value)]  # noqa: E731
    if writes:  # k: into the cache, with v
        _require(len(writes) == 2, "the KV writes of k and v")
        k_write, v_write = sorted(writes, key=lambda w: w.inputs[0] is not rotary)
        _require(k_write.inputs[0] is rotary and k_write.inputs[2] is v_write.inputs[2], "k and v written at one slot")
        v_qkv, v_start = _packed_slice(body, v_write.inputs[0])
        _require(v_qkv is qkv, "k and v from one packed row")
        body.claim(*writes)
        outputs = [f"{arg(qkv)}[:, {v_start}:]", arg(k_write.inputs[2]), arg(k_write.inputs[1]), arg(v_write.inputs[1])]
    else:  # q: into the node's planned buffer
        _require(list(graph.outputs.values()) == [rotary], "the rotated q as the one output")
        outputs = [site.outputs[0]]
    body.check_all_claimed()
    variant = head_norm_rope.choose(dtype=kernel_dtype(norm.type), num_heads=int(norm.type.shape[1]),
                                    head_dim=spec.head_dim, x_stride=int(qkv.type.shape[1]), kv_write=bool(writes))
    kernel = site.program.variant(head_norm_rope, variant)
    site.lines.append(launch_line(head_norm_rope, kernel, f"{kernel}, {qkv.type.shape[0]}", [
        f"{arg(qkv)}[:, {start}:]", arg(norm.inputs[1]), arg(rotary.inputs[1]), site.program.rope_table(spec),
        *outputs, repr(norm.attrs["eps"])]))


# -- attention --------------------------------------------------------------------------------

def _sizes(block_tables: Node) -> tuple[str, str]:
    """The program's names of the batch size and block-table width: block_tables is [B, M]."""
    return str(block_tables.type.shape[0]), str(block_tables.type.shape[1])


def _attention_params(node: Node) -> AttentionParams:
    _require(node.op != "fused", "attention fused with other ops")
    return AttentionParams.from_spec(node.attrs["spec"], kernel_dtype(node.type))


def match_attention_prefill(site: Site) -> None:
    """(q, k_cache, v_cache, query_start, seq_lens, block_tables[, sinks]) -> out [T, H, D]."""
    variant = attention_prefill.choose(site.target, _attention_params(site.node))
    kernel = site.program.variant(attention_prefill, variant)
    q, k_cache, v_cache, query_start, seq_lens, block_tables, *sinks = site.inputs
    tokens, (seqs, max_blocks) = str(site.node.type.shape[0]), _sizes(site.node.inputs[5])
    site.lines.append(launch_line(attention_prefill, kernel, f"{kernel}, {tokens}, {seqs}", [
        q, k_cache, v_cache, site.outputs[0], query_start, seq_lens, block_tables, *sinks, seqs, max_blocks]))


def match_attention_decode(site: Site) -> None:
    """(q [B, H, D], k_cache, v_cache, seq_lens, block_tables[, sinks]) -> out [B, H, D]; with
    split="auto" on a GPU target, split-K decode + reduce when `choose_num_splits` asks for it."""
    _require(site.node.attrs.get("split") == "auto", f"split={site.node.attrs.get('split')!r} (only 'auto')")
    attn = _attention_params(site.node)
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = site.inputs
    out, (batch, max_blocks) = site.outputs[0], _sizes(site.node.inputs[4])
    direct = site.program.variant(attention_decode, attention_decode.choose(site.target, attn, split_k=False))
    direct_launch = launch_line(attention_decode, direct, f"{direct}, {batch}, 1",
                                [q, k_cache, v_cache, out, seq_lens, block_tables, *sinks, max_blocks])
    if not site.target.sm_count:  # choose_num_splits never splits without SMs to fill
        site.lines.append(direct_launch)
        return
    split_variant = attention_decode.choose(site.target, attn, split_k=True)
    split = site.program.variant(attention_decode, split_variant)
    reduce = site.program.variant(attention_reduce, attention_decode.reduce_variant(split_variant))
    max_context = site.program.hoist("max_context", f"launcher.max_context(inputs[{seq_lens!r}])")
    splits = site.program.hoist(f"splits_kv{attn.num_kv_heads}", f"attention_decode.choose_num_splits("
                                f"{batch}, {attn.num_kv_heads}, {max_context}, TARGET)")
    site.lines += [
        f"if {splits} == 1:",
        f"    {direct_launch}",
        "else:  # flash-decoding: fp32 partials per context split, then the reduce",
        f"    part_max = launcher.empty(({batch}, {attn.num_heads}, {splits}), torch.float32)",
        "    part_sum = torch.empty_like(part_max)",
        f"    part_acc = launcher.empty(({batch}, {attn.num_heads}, {splits}, {attn.head_dim}), torch.float32)",
        "    " + launch_line(attention_decode, split, f"{split}, {batch}, {splits}", [
            q, k_cache, v_cache, "part_max", "part_sum", "part_acc", seq_lens, block_tables, max_blocks]),
        "    " + launch_line(attention_reduce, reduce, f"{batch}, {reduce}",
                            ["part_max", "part_sum", "part_acc", out, *sinks, splits]),
    ]


MATCHERS: dict[str | None, Callable[[Site], None]] = {
    "linear": match_gemm,
    "embedding": match_gather_rows,
    "gather_rows": match_gather_rows,
    None: match_kv_write_rope,  # an anchorless group: the rows kernel of rope + KV writes
    "rms_norm": match_norm_rope,
    "attention_prefill": match_attention_prefill,
    "attention_decode": match_attention_decode,
}


def emit_launch(site: Site) -> list[str]:
    """The program lines that launch `site.node`'s kernel(s)."""
    node = site.node
    anchor = node.attrs["pattern"].anchor if node.op == "fused" else node.op
    matcher = MATCHERS.get(anchor)
    try:
        if matcher is None:
            raise _Unsupported(f"no kernel template is anchored on {anchor}")
        matcher(site)
    except _Unsupported as why:
        raise KilnError(f"GPU code generation has no kernel for `{pattern_of(node)}` ({why}); this model needs "
                        "that kernel: serve it with --target cpu, or add the template to kiln.codegen.kernels") from None
    return site.lines
