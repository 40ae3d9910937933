"""Kernel kind `rows`: one generic row kernel that renders any fused row group (a body Graph).

One program per row r (a token or a sequence: every row value of the body is [R, ...] with the
same first dim R). Each value is held per row as a 2-D block [L, D]: its non-row dims but the
last flattened to L, the last dim D, both padded to powers of two and masked. A value is
*evaluated in a context* (codegen/kernels/rows_emit.py): the index of each of its dims as a
Triton expression of the block's aranges `o_l<P>` / `o_d<P>`. Loads through views (slice,
reshape) are affine offsets within the row, weights load with broadcast offsets, a leading
embedding / gather_rows reads row ids[r] of its table, rope's partner lanes (d +- dim/2)
re-evaluate its input in a permuted context (reductions are lane-invariant: their statistics are
reused), KV writes store at slot_mapping[r] (slot -1 writes nothing). Elementwise bodies with
[R, N] rows and no reduction tile N over a second grid axis.

The Variant is plain data (it is written as a literal into generated programs): the rendered
kernel body lines, the argument list and the launch shape. Arguments, in order:
  p_in<k>    body input in<k> (a contiguous tensor: row values, weights, tables, KV caches)
  p_out<j>   body output out<j> that is not a KV write: a contiguous [R, ...] buffer
  p_rope<k>  the fp32 inv_freq table of the k-th distinct rope spec of the body (`rope_specs`)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import compiled_grid, load_source, next_power_of_2, pointer, render_kernel, row_bucket
from kiln.codegen.kernels.rows_emit import POINTER_DTYPES, REDUCTIONS, Emitter, describe, rope_specs, row_dim
from kiln.codegen.match_common import require
from kiln.codegen.targets import Target
from kiln.ir import Graph, TupleType
from kiln.runtime.triton_device import helper_names

KIND = "rows"
__all__ = ["Argument", "Variant", "plan", "rope_specs", "row_dim", "render", "load", "signature", "constexprs",
           "grid_source", "grid", "launch"]


@dataclass(frozen=True)
class Argument:
    """One kernel argument: `role` "input" (body input `index`), "output" (body output `index`)
    or "rope" (the inv_freq table of `rope_specs(body)[index]`); `dtype` its element type."""

    name: str
    role: str
    index: int
    dtype: str  # fp32, bf16, fp16, i32, i64, i1


@dataclass(frozen=True)
class Variant:
    dtype: str  # the activation dtype (names the kernel)
    pattern: str  # the body's ops in order, e.g. "rms_norm, add" (the kernel's docstring)
    arguments: tuple[Argument, ...]
    doc: tuple[str, ...]  # the body, printed (rows as R)
    lines: tuple[str, ...]  # the kernel body
    tiles: int  # programs per row along the last dim (1: a whole row per program)
    num_warps: int
    num_stages: int = 1

    @property
    def cache_key(self) -> str:
        code = tuple(line for line in self.lines if not line.startswith("#"))  # comments name graph nodes
        digest = hashlib.sha256(repr((self.arguments, code, self.tiles)).encode()).hexdigest()[:12]
        return f"{KIND}__{self.dtype}__{digest}__w{self.num_warps}"


def plan(body: Graph, target: Target, dtype: str) -> Variant:
    """The row kernel of `body`; raises Unsupported(reason) when the body is no row form it renders."""
    tuples = [n for n in body.nodes if isinstance(n.type, TupleType)]
    require(not tuples, f"{tuples[0].op if tuples else ''} gives a tuple of values (a row kernel reads and writes tensors)")
    rows = row_dim(body)
    tile, width = _tile(body, target)
    emitter = Emitter(body, rows, tile, frozenset())
    emitter.run()
    if emitter.foreign:  # norms also needed at permuted lanes: statistics once, applied per context
        emitter = Emitter(body, rows, tile, frozenset(emitter.foreign))
        emitter.run()
    arguments = [Argument(f"p_in{k}", "input", k, POINTER_DTYPES[n.type.dtype]) for k, n in enumerate(body.inputs)]
    arguments += [Argument(f"p_out{j}", "output", j, POINTER_DTYPES[n.type.dtype])
                  for j, n in enumerate(body.outputs.values()) if n.op != "kv_write"]
    arguments += [Argument(f"p_rope{k}", "rope", k, "fp32") for k in range(len(emitter.specs))]
    if tile:
        tiles, warps = triton.cdiv(width, tile), target.tiles("rows_tiled", "default").num_warps
    else:
        tiles, warps = 1, target.tiles("rows", row_bucket(emitter.max_block)).num_warps
    pattern = ", ".join(n.op for n in body.nodes if n.op not in ("input", "const", "slice", "reshape"))
    doc = tuple(describe(n, emitter.names, rows) for n in body.nodes)
    doc += ("return " + ", ".join(f"{k}={emitter.names[v]}" for k, v in body.outputs.items()),)
    return Variant(dtype, pattern, tuple(arguments), doc, tuple(emitter.lines), tiles, warps)


def _tile(body: Graph, target: Target) -> tuple[int | None, int]:
    """(tile width, row width) for an elementwise body whose outputs are all [R, N] and wider
    than the target's tile; (None, 0) for one program per whole row."""
    if any(n.op in REDUCTIONS or n.op in ("rope", "kv_write") for n in body.nodes):
        return None, 0
    shapes = {tuple(n.type.shape[1:]) for n in body.outputs.values()}
    if len(shapes) != 1:
        return None, 0
    (shape,) = shapes
    if len(shape) == 0 or not all(d.is_number for d in shape) or any(int(d) != 1 for d in shape[:-1]):
        return None, 0
    width, tile = int(shape[-1]), target.tiles("rows_tiled", "default").block("BLOCK_N")
    return (tile, width) if next_power_of_2(width) > tile else (None, 0)


# -- the kind API ------------------------------------------------------------------------------

def render(variant: Variant) -> str:
    source = "\n".join(line for line in variant.lines if not line.startswith("#"))
    helpers = sorted(name for name in helper_names() if re.search(rf"\b{name}\(", source))
    return render_kernel(KIND, variant, kernel=variant, helpers=helpers,
                         parameters=", ".join(a.name for a in variant.arguments))


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    return {a.name: pointer(a.dtype) for a in variant.arguments}


def constexprs(variant: Variant) -> dict[str, object]:
    """None: every size is a literal of the rendered body."""
    return {}


def grid_source(variant: Variant) -> str:
    """One program per row (and per tile of the last dim for a tiled elementwise body)."""
    return "lambda rows: (rows,)" if variant.tiles == 1 else f"lambda rows: (rows, {variant.tiles})"


def grid(variant: Variant, rows: int) -> tuple[int, ...]:
    return compiled_grid(grid_source(variant))(rows)


def launch(variant: Variant, body: Graph, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Runs `variant` (planned from `body`) on `inputs` (contiguous tensors in body input order;
    KV caches are written in place). Returns the body's outputs in order: new [R, ...] tensors,
    or the cache a KV write returns."""
    bindings: dict = {}
    for node, tensor in zip(body.inputs, inputs, strict=True):
        for dim, size in zip(node.type.shape, tensor.shape):
            if not dim.is_number:
                bindings.setdefault(dim, size)
        if tuple(tensor.shape) != node.type.concrete_shape(bindings) or not tensor.is_contiguous():
            raise ValueError(f"{node.name}: expected a contiguous {node.type}, got {tuple(tensor.shape)}")
    rows, device = int(row_dim(body).subs(bindings)), inputs[0].device
    outputs = []
    for node in body.outputs.values():
        if node.op == "kv_write":
            outputs.append(inputs[body.inputs.index(node.inputs[1])])
        else:
            outputs.append(torch.empty(node.type.concrete_shape(bindings), dtype=node.type.torch_dtype, device=device))
    specs = rope_specs(body)
    tables = {"input": list(inputs), "output": outputs,
              "rope": [spec.inv_freq().to(device=device, dtype=torch.float32) for spec in specs]}
    args = [tables[a.role][a.index] for a in variant.arguments]
    if rows:
        load(variant).kernel[grid(variant, rows)](*args, num_warps=variant.num_warps)
    return outputs

