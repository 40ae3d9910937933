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

from typing import Callable

from kiln.codegen.kernels import (attention_decode, attention_prefill, attention_reduce, gather_rows,
                                  head_norm_rope, kv_write_rope)
from kiln.codegen.kernels.attention import AttentionParams
from kiln.codegen.match_common import (BodyReader, Site, Unsupported, body_of, kernel_dtype, launch_line,
                                       pattern_of, require)
from kiln.codegen.match_gemm import match_gemm
from kiln.errors import KilnError
from kiln.ir import Node

# -- row kernels ------------------------------------------------------------------------------

def match_gather_rows(site: Site) -> None:
    """embedding(table, ids) or gather_rows(x, idx): out[r] = table[index[r]]."""
    node = site.node
    require(node.op != "fused", "a row gather fused with other ops (only a matmul prologue gathers rows)")
    require(node.inputs[0].type.rank == 2, "a row gather from a 2-D table")
    table, index = site.inputs
    variant = gather_rows.choose(site.target, dtype=kernel_dtype(node.type), dim=int(node.type.shape[-1]))
    kernel = site.program.variant(gather_rows, variant)
    rows = str(node.type.shape[0])
    site.lines.append(launch_line(gather_rows, kernel, f"{kernel}, {rows}", [index, table, site.outputs[0]]))


def match_kv_write_rope(site: Site) -> None:
    """q = rope(qkv[:, q]), k_cache[slots] = rope(qkv[:, k]), v_cache[slots] = qkv[:, v]."""
    graph = body_of(site.node)
    body = BodyReader(graph)
    writes = [n for n in graph.nodes if n.op == "kv_write"]
    ropes = [n for n in graph.nodes if n.op == "rope"]
    require(len(writes) == 2 and len(ropes) == 2, "two ropes and two KV writes")
    k_write, v_write = sorted(writes, key=lambda w: w.inputs[0].op != "rope")
    q_rope = next(r for r in ropes if r is not k_write.inputs[0])
    k_rope = k_write.inputs[0]
    require(q_rope.attrs["spec"] == k_rope.attrs["spec"] and q_rope.inputs[1] is k_rope.inputs[1],
             "q and k rotated alike")
    require(k_write.inputs[2] is v_write.inputs[2], "k and v written at the same slots")
    spec = q_rope.attrs["spec"]
    require(spec.dim == spec.head_dim, "rotary embedding over part of each head")
    heads, kv_heads, dim = int(q_rope.type.shape[1]), int(k_rope.type.shape[1]), spec.head_dim
    qkv = None
    for value, start, width in ((q_rope.inputs[0], 0, heads), (k_rope.inputs[0], heads, kv_heads),
                                (v_write.inputs[0], heads + kv_heads, kv_heads)):
        reshape = value
        require(reshape.op == "reshape" and reshape.inputs[0].op == "slice", "q, k and v sliced from one packed row")
        piece = reshape.inputs[0]
        require(piece.attrs["dim"] in (1, -1) and (piece.attrs["start"], piece.attrs["stop"])
                 == (start * dim, (start + width) * dim), "q, k, v packed in that order, heads contiguous")
        require(qkv in (None, piece.inputs[0]), "q, k and v from one packed row")
        qkv = piece.inputs[0]
        body.claim(reshape, piece)
    body.claim(*writes, *ropes)
    body.check_all_claimed()
    require(list(graph.outputs.values()) == [q_rope, k_write, v_write], "outputs (q, k cache, v cache)")
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


def _packed_slice(body: BodyReader, value: Node) -> tuple[Node, int]:
    """`value` = reshape(slice(qkv, last dim, start:...)): the packed row and the slice's start."""
    require(value.op == "reshape" and value.inputs[0].op == "slice", "heads sliced from one packed row")
    piece = value.inputs[0]
    require(piece.attrs["dim"] in (-1, piece.type.rank - 1), "a slice along the packed row")
    body.claim(value, piece)
    return piece.inputs[0], piece.attrs["start"]


def match_norm_rope(site: Site) -> None:
    """Per-head RMSNorm then rope of q or k sliced from the packed qkv row (Qwen3's q/k norm);
    for k, also the KV write of k and v. One head_norm_rope launch."""
    graph = body_of(site.node)
    body = BodyReader(graph)
    norms, ropes = [n for n in graph.nodes if n.op == "rms_norm"], [n for n in graph.nodes if n.op == "rope"]
    require(len(norms) == 1 and len(ropes) == 1 and ropes[0].inputs[0] is norms[0], "one rms_norm, then one rope")
    norm, rotary = norms[0], ropes[0]
    require(len(norm.inputs) == 2 and norm.type.rank == 3, "a per-head norm with a weight")
    spec = rotary.attrs["spec"]
    require(spec.dim == spec.head_dim, "rotary embedding over part of each head")
    qkv, start = _packed_slice(body, norm.inputs[0])
    body.claim(norm, rotary)
    writes = [n for n in graph.nodes if n.op == "kv_write"]
    arg = lambda value: site.inputs[body.input_index(value)]  # noqa: E731
    if writes:  # k: into the cache, with v
        require(len(writes) == 2, "the KV writes of k and v")
        k_write, v_write = sorted(writes, key=lambda w: w.inputs[0] is not rotary)
        require(k_write.inputs[0] is rotary and k_write.inputs[2] is v_write.inputs[2], "k and v written at one slot")
        v_qkv, v_start = _packed_slice(body, v_write.inputs[0])
        require(v_qkv is qkv, "k and v from one packed row")
        body.claim(*writes)
        outputs = [f"{arg(qkv)}[:, {v_start}:]", arg(k_write.inputs[2]), arg(k_write.inputs[1]), arg(v_write.inputs[1])]
    else:  # q: into the node's planned buffer
        require(list(graph.outputs.values()) == [rotary], "the rotated q as the one output")
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
    require(node.op != "fused", "attention fused with other ops")
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
    require(site.node.attrs.get("split") == "auto", f"split={site.node.attrs.get('split')!r} (only 'auto')")
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
            raise Unsupported(f"no kernel template is anchored on {anchor}")
        matcher(site)
    except Unsupported as why:
        raise KilnError(f"GPU code generation has no kernel for `{pattern_of(node)}` ({why}); this model needs "
                        "that kernel: serve it with --target cpu, or add the template to kiln.codegen.kernels") from None
    return site.lines
