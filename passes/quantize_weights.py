"""Quantized weights as a layout: marks the params that stay quantized (`attrs["quant"]`, a
`kiln.quant.QuantFormat`), before the pipeline runs.

A param is kept quantized when every node that reads it is a `linear` reading it as its weight
or an `embedding` reading it as its table; the weight loader then supplies a
`kiln.quant.QuantizedTensor`, and the later passes keep it one: pack_weights packs only weights
of one format (rows concatenate exactly), fold_norm_weights never scales a quantized weight's
columns (that would change every code). Which formats: `stored` ones (the checkpoint's own,
e.g. a GGUF file's Q4_1 tensors, as frontend/weights.py maps them onto spec params), then,
for linear weights stored in floating point, the `requested` kind (`kiln compile --quant`),
a tied embedding table (also the LM head's weight) included, as llama.cpp quantizes it; that one
in int8 where int4 is requested (llama.cpp's Q4_K_M keeps its output weight at 6 bits).
"""

from __future__ import annotations

from collections.abc import Mapping

from kiln.errors import KilnError
from kiln.ir import Graph, GraphBuilder, Node
from kiln.passes.context import PassContext
from kiln.quant import QuantFormat

# `kiln compile --quant KIND`: the format of a linear weight of K columns
REQUESTED_KINDS = ("int8", "int4", "fp8")


def requested_format(kind: str, columns: int, column_blocks: int = 1) -> QuantFormat:
    """int4: groups of 128 (of 64 or 32 where 128 does not divide K / column_blocks: a tensor-parallel
    rank may hold one of `column_blocks` blocks of the columns) with f16 scales; int8 and fp8: one
    scale per output channel (group = K), f32."""
    if kind == "int4":
        group = next((g for g in (128, 64, 32) if columns % (g * column_blocks) == 0), None)
        if group is None:
            raise KilnError(f"--quant int4 needs weights whose columns divide into groups of 32 on each of "
                            f"{column_blocks} rank(s); one has {columns}")
        return QuantFormat("int4", group, "f16")
    if kind in ("int8", "fp8"):
        return QuantFormat("int8" if kind == "int8" else "fp8e4m3", columns, "f32")
    raise KilnError(f"--quant {kind!r} is not a kind kiln quantizes to; use one of {', '.join(REQUESTED_KINDS)}")


def quantized_readers_only(param: Node, readers: list[Node]) -> str | None:
    """None if every reader can read `param` quantized, else why not."""
    for reader in readers:
        if reader.op == "linear" and reader.inputs[1] is param and param not in (reader.inputs[0], *reader.inputs[2:]):
            continue
        if reader.op == "embedding" and reader.inputs[0] is param:
            continue
        return f"{reader.op} reads it"
    return None


def quantize_weights(graph: Graph, stored: Mapping[str, QuantFormat], requested: str | None = None,
                     ctx: PassContext | None = None, tp: int = 1) -> Graph:
    """`graph` with the params that stay quantized marked (see the module docstring). `stored`:
    param name -> the format its checkpoint tensors hold; `requested`: a REQUESTED_KINDS entry,
    its int4 groups chosen to fit the columns each of `tp` ranks may hold (passes/shard.py)."""
    ctx = ctx or PassContext()
    users = graph.users()
    formats: dict[Node, QuantFormat] = {}
    for param in graph.params:
        readers = users[param]
        if param.name in stored:
            refusal = quantized_readers_only(param, readers)
            if refusal is None:
                formats[param] = stored[param.name]
            else:
                ctx.note(f"{param.name} dequantized: {refusal}")
        elif requested and any(r.op == "linear" for r in readers) and quantized_readers_only(param, readers) is None:
            tied = any(r.op == "embedding" for r in readers)  # also the LM head: int4 would cost the most there
            formats[param] = requested_format("int8" if tied and requested == "int4" else requested,
                                              int(param.type.shape[-1]), tp)
    if not formats:
        return graph

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node not in formats:
            return None
        extra = {k: v for k, v in node.attrs.items() if k not in ("name", "type")}
        return builder.param(node.name, node.type, **extra, quant=formats[node])

    ctx.note(f"{len(formats)} weights kept quantized")
    return graph.rebuild(rewrite)
