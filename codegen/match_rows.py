"""The generic row kernel as a matcher: any fused row group (or plain row op) that
`kernels.rows.plan` renders launches one `rows` kernel.

  match_rows(site)              emits the launch: the variant's arguments in its order (body
                                inputs from site.inputs, outputs from site.outputs, each rope
                                spec's inv_freq table from the program), over R programs
                                (R = the body's row dim, "T" or "B"), tiled along the last dim
                                for wide elementwise rows
  rows_refusal(body, target)    None when the body renders, else the reason (what fusion
                                asks before forming a row group)
"""

from __future__ import annotations

from kiln.codegen.kernels import rows
from kiln.codegen.match_common import KERNEL_DTYPES, Site, Unsupported, body_of, launch_line, require
from kiln.codegen.targets import Target
from kiln.ir import Graph
from kiln.ir.types import FLOAT_DTYPES, TensorType


def activation_dtype(body: Graph) -> str:
    """The kernel dtype that names a row kernel: its first float output's (fp32 when none)."""
    for node in body.outputs.values():
        value = node.inputs[0] if node.op == "kv_write" else node
        if isinstance(value.type, TensorType) and value.type.dtype in FLOAT_DTYPES:
            return KERNEL_DTYPES[value.type.dtype]
    return "fp32"


def match_rows(site: Site) -> None:
    """Launches `site.node` (a fused row group, or one plain row op) as one `rows` kernel."""
    body = body_of(site.node)
    variant = rows.plan(body, site.target, activation_dtype(body))
    kernel = site.program.variant(rows, variant)
    specs = rows.rope_specs(body)
    args = []
    for argument in variant.arguments:
        if argument.role == "input":
            args.append(site.inputs[argument.index])
        elif argument.role == "output":
            output = site.outputs[argument.index]
            require(output is not None, f"output {argument.index} has no buffer")
            args.append(output)
        else:
            args.append(site.program.rope_table(specs[argument.index]))
    site.lines.append(launch_line(kernel, [str(rows.row_dim(body))], args))


def rows_refusal(body: Graph, target: Target) -> str | None:
    """Why the row kernel cannot render `body` for `target`, or None when it can."""
    try:
        rows.plan(body, target, activation_dtype(body))
    except Unsupported as why:
        return str(why)
    return None
