"""Which kernel template runs each launch of a lowered graph, and with which arguments.

Every compute node of a lowered graph is one kernel launch (passes/fuse.py). A matcher reads the
node (a plain op, or a `fused` node's body) and emits the program lines that launch its kernel,
through a `Site`: the Python expressions of the node's inputs and outputs, and the program
being built (which registers each variant for rendering and compilation). The forms:

  [gather_rows,] [row ops >] linear [> epilogue]    gemm (codegen/match_gemm.py)
  any other group of row ops (elementwise ops,      rows (codegen/match_rows.py): one program per
  reductions over the last dim, rope, KV writes,    row; norms, residuals, per-head q/k norms,
  a leading embedding / row gather)                 rope and the paged KV writes in one launch
  attention_prefill                                 attention_prefill
  attention_decode                                  attention_decode, split-K + attention_reduce
                                                    when the context is long and the batch small
  moe                                               moe: align, gate_up and down kernels, then
                                                    the per-token sum over top_k (a torch op)
  linear_attention                                  gated_delta: chunked in mixed steps, recurrent
                                                    in decode steps
  causal_conv1d                                     causal_conv1d
  all_reduce, all_gather                            no kernel: the step's communicator (`comm`), its
                                                    result copied into the planned buffer

Quantized weights (a `param` with attrs["quant"], kiln/quant.py): a `linear` reads one through
the quantized GEMM (match_gemm), a plain `embedding` of one gathers and dequantizes its rows
(embedding_quant); a row group led by such an embedding (Gemma's `embedding > mul`) runs
embedding_quant into a [T, D] scratch, then its row kernel with the embedding read from there.

A plain op that no template renders (sort, topk, cat, a reduction too wide for a row kernel)
runs as its torch expression on the device (match_torch). A fused group that no template
renders raises KilnError naming the node and its pattern (fusion asks the target first, so that
means a matcher and its check disagree).
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.codegen.kernels import (
    KERNEL_DTYPES,
    attention_decode,
    attention_prefill,
    attention_reduce,
    causal_conv1d,
    embedding_quant,
    gated_delta,
    moe,
)
from kiln.codegen.kernels.attention import AttentionParams
from kiln.codegen.match_common import Site, Unsupported, kernel_dtype, launch_line, pattern_of, require
from kiln.codegen.match_gemm import match_gemm
from kiln.codegen.match_rows import match_rows
from kiln.errors import KilnError
from kiln.ir import OPS, Graph, GraphBuilder, Node
from kiln.ir.ops import TORCH_DTYPE_NAMES, OpKind

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
    site.lines.append(launch_line(kernel, [tokens, seqs], [
        q, k_cache, v_cache, site.outputs[0], query_start, seq_lens, block_tables, *sinks, seqs, max_blocks]))


def match_attention_decode(site: Site) -> None:
    """(q [B, H, D], k_cache, v_cache, seq_lens, block_tables[, sinks]) -> out [B, H, D]; with
    split="auto" on a GPU target, split-K decode + reduce when `choose_num_splits` asks for it."""
    require(site.node.attrs.get("split") == "auto", f"split={site.node.attrs.get('split')!r} (only 'auto')")
    attn = _attention_params(site.node)
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = site.inputs
    out, (batch, max_blocks) = site.outputs[0], _sizes(site.node.inputs[4])
    direct = site.program.variant(attention_decode, attention_decode.choose(site.target, attn, split_k=False))
    direct_launch = launch_line(direct, [batch, "1"], [q, k_cache, v_cache, out, seq_lens, block_tables, *sinks, max_blocks])
    if not site.target.sm_count:  # choose_num_splits never splits without SMs to fill
        site.lines.append(direct_launch)
        return
    split_variant = attention_decode.choose(site.target, attn, split_k=True)
    split = site.program.variant(attention_decode, split_variant)
    reduce = site.program.variant(attention_reduce, attention_decode.reduce_variant(split_variant))
    max_context = site.program.hoist("max_context", f"launcher.max_context(inputs[{seq_lens!r}])")
    # sized on the keys a query sees: fewer than the context with a window or a block-sparse layout
    keys = f"visible_keys({max_context}, {attn.window}, {attn.block_sparse})"
    splits = site.program.hoist(f"splits_{split.lower()}", f"decode_splits({batch}, {attn.num_kv_heads}, {keys}, "
                                f"{site.target.sm_count})")
    site.lines += [
        f"if {splits} == 1:",
        f"    {direct_launch}",
        "else:  # flash-decoding: fp32 partials per context split, then the reduce",
        f"    part_max = launcher.empty(({batch}, {attn.num_heads}, {splits}), torch.float32)",
        "    part_sum = torch.empty_like(part_max)",
        f"    part_acc = launcher.empty(({batch}, {attn.num_heads}, {splits}, {attn.head_dim}), torch.float32)",
        "    " + launch_line(split, [batch, splits], [
            q, k_cache, v_cache, "part_max", "part_sum", "part_acc", seq_lens, block_tables, max_blocks]),
        "    " + launch_line(reduce, [batch], ["part_max", "part_sum", "part_acc", out, *sinks, splits]),
    ]


# -- recurrent layers (the state pool) ---------------------------------------------------------

def match_linear_attention(site: Site) -> None:
    """(q, k, v, g, state, query_start, seq_lens, state_indices[, beta]) -> out [T, Hv, Dv]: gated_delta,
    its chunked form in steps with prefill chunks, its recurrent form in decode steps (T = B)."""
    require(site.node.op == "linear_attention", "linear attention fused with other ops")
    q, k, v, g, _, _, seq_lens, _, *beta = site.node.inputs
    dtype = kernel_dtype(v.type)
    require(q.type.dtype == k.type.dtype == v.type.dtype and all(b.type.dtype == v.type.dtype for b in beta),
            f"q, k, v and beta of one dtype (got {q.type.dtype}, {k.type.dtype}, {v.type.dtype})")
    decode = q.type.shape[0] == seq_lens.type.shape[0]
    variant = gated_delta.choose(site.target, site.node.attrs["spec"], dtype, chunked=not decode,
                                 g_dtype=kernel_dtype(g.type))
    kernel = site.program.variant(gated_delta, variant)  # its arguments: the op's inputs, then out
    site.lines.append(launch_line(kernel, [str(seq_lens.type.shape[0])], [*site.inputs, site.outputs[0]]))


def match_causal_conv1d(site: Site) -> None:
    """(x, weight, conv_state, query_start, seq_lens, state_indices[, bias]) -> out [T, C]: causal_conv1d."""
    require(site.node.op == "causal_conv1d", "a causal conv1d fused with other ops")
    x, weight, _, _, seq_lens, _, *bias = site.node.inputs
    require(len({i.type.dtype for i in site.node.inputs if i.type.dtype != "i32"}) == 1,
            "x, weight, conv_state and bias of one dtype")
    variant = causal_conv1d.choose(site.target, dtype=kernel_dtype(x.type), channels=int(x.type.shape[1]),
                                   width=int(weight.type.shape[1]), bias=bool(bias),
                                   activation=site.node.attrs["activation"])
    kernel = site.program.variant(causal_conv1d, variant)  # its arguments: the op's inputs, then out
    site.lines.append(launch_line(kernel, [str(seq_lens.type.shape[0])], [*site.inputs, site.outputs[0]]))


# -- mixture of experts ------------------------------------------------------------------------

MOE_BUCKET_TOKENS = {"decode": 1, "small": 256, "large": 4096}  # tokens that pick each moe.bucket


def moe_params(node: Node) -> moe.MoeParams:
    """The kernels' parameters of a plain `moe` node (ir/op_types.moe)."""
    require(node.op == "moe", "a moe fused with other ops")
    x, weights, ids, gate_up, down, *biases = node.inputs
    require(ids.type.dtype in ("i32", "i64") and weights.type.dtype in KERNEL_DTYPES,
            f"moe routing: ids {ids.type}, weights {weights.type}")
    experts, two_i, hidden = (int(d) for d in gate_up.type.shape)
    return moe.MoeParams(kernel_dtype(node.type), KERNEL_DTYPES[weights.type.dtype], ids.type.dtype, experts,
                         int(ids.type.shape[1]), hidden, int(down.type.shape[1]), two_i // 2, node.attrs["activation"],
                         node.attrs["alpha"], node.attrs["limit"], bool(biases))


def match_moe(site: Site) -> None:
    """(x [T, K], weights, ids [T, top_k], w_gate_up, w_down[, b_gate_up, b_down]) -> out [T, N]:
    the alignment, both grouped GEMMs (variants picked per step by T's bucket) and the
    combine; the scratch (sorted pairs, block experts, intermediate, per-pair rows) is
    allocated per launch at the alignment's static bound, so nothing syncs with the host."""
    params = moe_params(site.node)
    x, weights, ids, gate_up, down, *biases = site.inputs
    b_gate_up, b_down = ([bias] for bias in biases) if biases else ([], [])
    tokens, dtype = str(site.node.type.shape[0]), TORCH_DTYPE_NAMES[site.node.type.dtype]
    by_bucket = {}
    for bucket, count in MOE_BUCKET_TOKENS.items():
        variants = moe.choose(site.target, params, count)
        names = [site.program.variant(moe, v) for v in variants]  # the stages share BLOCK_M and its padding
        by_bucket[bucket] = ", ".join([*names, str(moe.padding(variants[0])), str(variants[0].block_m)])
    picked = by_bucket["decode"]
    if len(set(by_bucket.values())) > 1:
        bounds = ", ".join(map(str, moe.BUCKET_BOUNDS))
        bucket = site.program.hoist(f"moe_bucket_{tokens}", f"bucket({tokens}, {bounds})")
        picked = "{" + ", ".join(f"{b!r}: ({names})" for b, names in by_bucket.items()) + f"}}[{bucket}]"
    routing = ["moe_sorted", "moe_blocks", "moe_num_padded"]
    site.lines += [
        f"moe_align, moe_gate_up, moe_down, moe_padding, moe_block_m = {picked}",
        f"moe_rows = {tokens} * {params.top_k} + moe_padding  # the alignment's static bound",
        "moe_sorted = launcher.empty((moe_rows,), torch.int32)",
        "moe_blocks = launcher.empty((cdiv(moe_rows, moe_block_m),), torch.int32)",
        "moe_num_padded = launcher.empty((1,), torch.int32)",
        launch_line("moe_align", [tokens], [ids, *routing, tokens]),
        f"moe_hidden = launcher.empty((moe_rows, {params.intermediate}), {dtype})",
        launch_line("moe_gate_up", [tokens], [x, gate_up, *b_gate_up, *routing, "moe_hidden", tokens]),
        f"moe_pairs = launcher.empty(({tokens} * {params.top_k}, {params.n}), {dtype})",
        launch_line("moe_down", [tokens], ["moe_hidden", down, *b_down, weights, *routing, "moe_pairs", tokens]),
        f"combine_pairs(moe_pairs, {site.outputs[0]})",
    ]


# -- quantized embedding tables ----------------------------------------------------------------

def quantized_reads(node: Node) -> list[tuple[str, Node]]:
    """(reading op, param) for each quantized param `node` reads (inside a fused body: the op
    that reads the body input standing for it)."""
    if node.op != "fused":
        return [(node.op, i) for i in node.inputs if i.op == "param" and "quant" in i.attrs]
    body = node.attrs["body"]
    return [(user.op, node.inputs[index]) for index, inner in enumerate(body.inputs)
            if node.inputs[index].op == "param" and "quant" in node.inputs[index].attrs
            for user in body.nodes if inner in user.inputs]


def match_embedding_quant(site: Site) -> None:
    """A plain `embedding` (table [V, D] quantized, ids [T]) -> out [T, D]: embedding_quant."""
    table, ids = site.node.inputs
    require(site.node.op == "embedding" and "quant" in table.attrs, "an embedding of a quantized table")
    variant = embedding_quant.choose(site.target, dtype=kernel_dtype(site.node.type), quant=table.attrs["quant"],
                                     d=int(table.type.shape[1]), ids=ids.type.dtype)
    kernel = site.program.variant(embedding_quant, variant)
    weights, index = site.inputs
    site.lines.append(launch_line(kernel, [str(site.node.type.shape[0])],
                                  [f"{weights}.qweight", f"{weights}.scales", index, site.outputs[0]]))


def dequantized_rows_refusal(body: Graph) -> str | None:
    """Why match_dequantized_rows cannot render a kernel body that reads a quantized table, or
    None (also when it reads none): it needs one embedding of it, the table read by that
    embedding alone, its ids a kernel input (embedding_quant gathers by them: not ids computed in
    the kernel, as a vocab-parallel rank's offset ids) and its rows used inside the group."""
    if not any("quant" in i.attrs for i in body.inputs):
        return None
    embeddings = [n for n in body.nodes if n.op == "embedding" and "quant" in n.inputs[0].attrs]
    if len(embeddings) != 1:
        return "a row group reads a quantized table through one embedding"
    (embedding,) = embeddings
    table, ids = embedding.inputs
    if [n for n in body.nodes if table in n.inputs] != [embedding] or embedding in body.outputs.values():
        return "a quantized table is read by its embedding alone, whose rows the group computes on"
    if ids not in body.inputs:
        return "the gather of a quantized table's rows reads its ids from memory (not ids computed in the kernel)"
    return None


def match_dequantized_rows(site: Site) -> None:
    """A row group whose embedding reads a quantized table (dequantized_rows_refusal says which):
    the embedding's rows dequantized into a scratch [T, D] (embedding_quant), then the group's
    row kernel over a body that reads that scratch in the embedding's place."""
    body = site.node.attrs["body"]
    why = dequantized_rows_refusal(body)
    require(why is None, why or "")
    (embedding,) = [n for n in body.nodes if n.op == "embedding" and "quant" in n.inputs[0].attrs]
    table, ids = (body.inputs.index(i) for i in embedding.inputs)
    scratch = f"dequantized_{next(o for o in site.outputs if o is not None)}"
    plain = Site(Node("embedding", site.node.inputs[table:table + 1] + site.node.inputs[ids:ids + 1], {},
                      embedding.type), [site.inputs[table], site.inputs[ids]], [scratch], site.program)
    b = GraphBuilder(f"{body.name}_dequantized")
    values: dict[Node, Node] = {}
    inputs: list[str] = []
    for node in body.nodes:
        users = [n for n in body.nodes if node in n.inputs]
        if node.op == "input" and users and all(n is embedding for n in users):
            continue  # the table, and ids when the embedding alone reads them
        if node is embedding or node.op == "input":
            values[node] = b.input(f"in{len(inputs)}", node.type)
            inputs.append(scratch if node is embedding else site.inputs[body.inputs.index(node)])
        else:
            values[node] = b.op(node.op, *(values[i] for i in node.inputs), **node.attrs)
    for name, node in body.outputs.items():
        b.output(name, values[node])
    shape = ", ".join(map(str, embedding.type.shape))
    site.lines.append(f"{scratch} = launcher.empty(({shape}), {TORCH_DTYPE_NAMES[embedding.type.dtype]})")
    match_embedding_quant(plain)
    site.lines += plain.lines
    rows_site = Site(Node("fused", (), {**site.node.attrs, "body": b.build()}, site.node.type), inputs,
                     site.outputs, site.program)
    match_rows(rows_site)
    site.lines += rows_site.lines


def match_torch(site: Site) -> None:
    """A plain op that no kernel template renders (sort, topk, cat, gather, a reduction too wide
    for a row kernel, ...), or a collective (`comm.all_reduce(x)`: the step's communicator, NCCL
    on GPUs): its expression from the op registry (the one the cpu target emits), run on the
    device, copied into the node's planned buffer(s)."""
    node = site.node
    require(node.op != "fused", "a fused group (only plain ops run as torch ops)")
    emit = OPS[node.op].cpu
    require(emit is not None and not OPS[node.op].side_effects, f"{node.op} has no torch expression")
    value = emit(site.inputs, node) if callable(emit) else emit.format(*site.inputs, **node.attrs)
    why = "a collective" if OPS[node.op].kind is OpKind.COLLECTIVE else "no kernel template: a torch op on the device"
    site.lines.append(f"torch_value = {value}  # {why}")
    outputs = site.outputs if len(site.outputs) > 1 else [site.outputs[0]]
    for index, out in enumerate(outputs):
        require(out is not None, f"{node.op} writes a cache")
        site.lines.append(f"{out}.copy_(torch_value{f'[{index}]' if len(outputs) > 1 else ''})")


MATCHERS: dict[str | None, Callable[[Site], None]] = {
    "linear": match_gemm,
    "attention_prefill": match_attention_prefill,
    "attention_decode": match_attention_decode,
    "moe": match_moe,
    "linear_attention": match_linear_attention,
    "causal_conv1d": match_causal_conv1d,
    "all_reduce": match_torch,
    "all_gather": match_torch,
}  # any other anchor (a row group, or a plain row op): match_rows


def emit_launch(site: Site) -> list[str]:
    """The program lines that launch `site.node`'s kernel(s). A plain op that no template renders
    runs as a torch op (match_torch); a fused group that none renders is an error (fusion asks the
    target before it forms a group, so this means a matcher and its check disagree)."""
    node = site.node
    anchor = node.attrs["pattern"].anchor if node.op == "fused" else node.op
    matcher = MATCHERS.get(anchor, match_rows)
    quantized = quantized_reads(node)
    if quantized and anchor != "linear":
        matcher = match_embedding_quant if node.op == "embedding" else match_dequantized_rows
    try:
        try:
            matcher(site)
        except Unsupported:
            if node.op == "fused" or quantized:  # no torch op reads a quantized weight
                raise
            site.lines.clear()
            match_torch(site)
    except Unsupported as why:
        if quantized:
            names = ", ".join(sorted({f"{param.name} ({param.attrs['quant']})" for _, param in quantized}))
            raise KilnError(f"GPU code generation has no kernel for `{pattern_of(node)}` reading the quantized weight(s) "
                            f"{names} ({why}): compile with --dequantize") from None
        raise KilnError(f"GPU code generation has no kernel for `{pattern_of(node)}` ({why}); this model needs "
                        "that kernel: serve it with --target cpu, or add the template to kiln.codegen.kernels") from None
    return site.lines
