"""GEMM launches: a matmul with its prologue (row gather, RMSNorm, norm weight) and epilogue
(bias, activations, the packed gate/up product, a residual add), matched from a kernel body."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.codegen.kernels import gemm
from kiln.codegen.match_common import BodyReader, Site, Unsupported, body_of, kernel_dtype, launch_line, require
from kiln.ir import Graph, Node

# Rows that pick each GEMM tile bucket (gemm.bucket); the program picks the bucket per step.
GEMM_BUCKET_ROWS = {"decode": 1, "small": 128, "large": 4096}


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
    body = BodyReader(graph)
    linears = [n for n in graph.nodes if n.op == "linear"]
    require(len(linears) == 1, "a GEMM kernel computes exactly one linear")
    linear = linears[0]
    body.claim(linear)
    operands, prologue, eps = {}, [], None
    x = linear.inputs[0]
    while x.op in ("reshape", "rms_norm", "gather_rows"):
        body.claim(x)
        if x.op == "rms_norm":
            require(not prologue, "rms_norm must come right before the linear")
            require(x.type.shape[-1] == linear.inputs[0].type.shape[-1], "a norm over part of the matmul's rows")
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
        require("silu_mul" not in epilogue, "a bias on the packed gate/up projection")
        epilogue.insert(0, "bias")
        operands["p_bias"] = body.input_index(linear.inputs[2])
    body.check_all_claimed()
    return GemmForm(body.input_index(x), body.input_index(linear.inputs[1]), tuple(prologue), tuple(epilogue),
                    operands, eps)


def _epilogue(body: BodyReader, linear: Node, operands: dict[str, int]) -> list[str]:
    """The epilogue ops from the linear to the body's one output, in order."""
    require(len(body.graph.outputs) == 1, "a GEMM kernel writes one output")
    ops, node = [], next(iter(body.graph.outputs.values()))
    while node is not linear:
        body.claim(node)
        if node.op in ("silu", "gelu_tanh"):
            ops.insert(0, node.op)
            node = node.inputs[0]
        elif node.op == "add":
            chain = [i for i in node.inputs if i.op != "input"]
            require(len(chain) == 1, "an add of the matmul result and one tensor")
            residual = next(i for i in node.inputs if i.op == "input")
            require(residual.type.shape == node.type.shape, f"add of a {residual.type} to the matmul result")
            operands["p_residual"] = body.input_index(residual)
            ops.insert(0, "residual")
            node = chain[0]
        elif node.op == "mul":
            _match_silu_mul(body, node, linear)
            ops.insert(0, "silu_mul")
            node = linear
        else:
            raise Unsupported(f"{node.op} in a matmul epilogue")
    return ops


def _match_silu_mul(body: BodyReader, mul: Node, linear: Node) -> None:
    """mul(silu(linear[..., :N]), linear[..., N:]) with linear's output 2N wide."""
    gate, up = sorted(mul.inputs, key=lambda n: n.op != "silu")
    require(gate.op == "silu" and up.op == "slice", "a mul that is not silu(gate) * up")
    gate_slice = gate.inputs[0]
    width = linear.type.shape[-1]
    for piece, start in ((gate_slice, 0), (up, width // 2)):
        require(piece.op == "slice" and piece.inputs[0] is linear and piece.attrs["dim"] in (-1, linear.type.rank - 1)
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
