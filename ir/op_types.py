"""Type rules of the IR's ops: each takes the input types and the node's attributes and returns
the output type, or raises `TypeError_` with a message naming what is wrong (the verifier adds
the node's name). `ir/ops.py` names one rule per op in its table."""

from __future__ import annotations

import sympy

from kiln.ir.types import FLOAT_DTYPES, TensorType, TupleType


class TypeError_(Exception):
    """A type rule rejected its inputs (the verifier adds the node's name)."""


def _check(cond: bool, message: str):
    if not cond:
        raise TypeError_(message)


def broadcast(types: list[TensorType], attrs: dict) -> TensorType:
    _check(len({t.dtype for t in types}) == 1, f"dtypes differ: {', '.join(str(t) for t in types)}")
    rank = max(t.rank for t in types)
    shape = []
    for i in range(rank):
        dims = {t.shape[i - rank + t.rank] for t in types if i - rank + t.rank >= 0} - {sympy.Integer(1)}
        _check(len(dims) <= 1, f"shapes do not broadcast: {', '.join(str(t) for t in types)}")
        shape.append(dims.pop() if dims else sympy.Integer(1))
    return TensorType(tuple(shape), types[0].dtype)


def same(types, attrs):
    _check(types[0].dtype in FLOAT_DTYPES, f"expects a float tensor, got {types[0]}")
    return types[0]


def same_any(types, attrs):
    """Same type as the input, any dtype (abs, neg, clamp, cumsum)."""
    return types[0]


def cast(types, attrs):
    return types[0].with_dtype(attrs["dtype"])


def source(types, attrs):
    return attrs["type"]


def const(types, attrs):
    return TensorType((), attrs["dtype"])


def rms_norm(types, attrs):
    x, *weight = types  # no weight: it was folded into the consuming linear (passes/fold_norm_weights)
    _check(all(w.shape == x.shape[-1:] for w in weight), f"weight {weight} does not match the normalized dim of {x}")
    return x


def linear(types, attrs):
    x, w = types[:2]
    _check(w.rank == 2 and x.shape[-1] == w.shape[1], f"x {x} @ w{w}^T: inner dims differ")
    if len(types) == 3:
        _check(types[2].shape == (w.shape[0],), f"bias {types[2]} does not match {w.shape[0]} outputs")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


def embedding(types, attrs):
    w, ids = types
    _check(ids.dtype in ("i32", "i64") and w.rank == 2, f"embedding(weight {w}, ids {ids})")
    return TensorType(ids.shape + (w.shape[1],), w.dtype)


def gather_rows(types, attrs):
    x, idx = types
    _check(idx.rank == 1 and idx.dtype in ("i32", "i64"), f"row indices must be an int vector, got {idx}")
    return TensorType(idx.shape + x.shape[1:], x.dtype)


def reshape(types, attrs):
    (x,) = types
    shape = tuple(sympy.sympify(d) for d in attrs["shape"])
    _check(sympy.simplify(sympy.Mul(*shape) - x.numel) == 0, f"cannot reshape {x} to {list(shape)}")
    return x.with_shape(shape)


def slice(types, attrs):
    (x,) = types
    dim, start, stop = attrs["dim"], attrs["start"], attrs["stop"]
    _check(-x.rank <= dim < x.rank, f"slice dim {dim} out of range for {x}")
    size = x.shape[dim]
    _check(0 <= start < stop and (not size.is_number or stop <= size), f"slice [{start}:{stop}] out of {x}")
    shape = list(x.shape)
    shape[dim] = sympy.Integer(stop - start)
    return x.with_shape(shape)


def rope(types, attrs):
    x, positions = types
    _check(x.rank == 3 and x.shape[-1] == attrs["spec"].head_dim, f"rope expects [T, H, {attrs['spec'].head_dim}], got {x}")
    _check(positions.shape == x.shape[:1], f"positions {positions} do not match tokens of {x}")
    return x


def check_paged(q, k_cache, v_cache, spec):
    _check(q.shape == (q.shape[0], spec.num_heads, spec.head_dim), f"q {q} does not match {spec}")
    cache = (k_cache.shape[0], spec.kv_layout.block_size, spec.num_kv_heads, spec.head_dim)
    _check(k_cache.shape == cache and v_cache.shape == cache, f"KV cache {k_cache} does not match {spec}")
    _check(k_cache.dtype == v_cache.dtype == q.dtype, "q and the KV cache must share a dtype")


def attention(types, attrs):
    q, k, v, k_cache, v_cache, query_start, seq_lens, block_tables, slot_mapping = types[:9]
    spec = attrs["spec"]
    check_paged(q, k_cache, v_cache, spec)
    want_kv = (q.shape[0], spec.num_kv_heads, spec.head_dim)
    _check(k.shape == want_kv and v.shape == want_kv, f"k {k} / v {v} do not match {spec}")
    _check(k_cache.dtype == k.dtype == v.dtype, "q, k, v and the KV cache must share a dtype")
    _check(slot_mapping.shape == q.shape[:1], f"slot_mapping {slot_mapping} does not match tokens of q {q}")
    _check(len(types) == 9 + spec.sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def kv_write(types, attrs):
    x, cache, slot_mapping = types
    _check(x.rank == 3 and cache.rank == 4 and x.shape[1:] == cache.shape[2:], f"rows {x} do not fit the cache {cache}")
    _check(x.dtype == cache.dtype, f"rows {x} and cache {cache} must share a dtype")
    _check(slot_mapping.shape == x.shape[:1] and slot_mapping.dtype == "i32",
           f"slot_mapping {slot_mapping} does not match rows of {x}")
    return cache


def attention_prefill(types, attrs):
    q, k_cache, v_cache, query_start, seq_lens, block_tables, *sinks = types
    check_paged(q, k_cache, v_cache, attrs["spec"])
    _check(len(sinks) == attrs["spec"].sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def attention_decode(types, attrs):
    q, k_cache, v_cache, seq_lens, block_tables, *sinks = types
    check_paged(q, k_cache, v_cache, attrs["spec"])
    _check(seq_lens.shape == q.shape[:1], f"decode attention has one query per sequence: q {q}, seq_lens {seq_lens}")
    _check(len(sinks) == attrs["spec"].sinks, "attention with sinks takes one extra input: sinks [num_heads]")
    return q


def linear_attention(types, attrs):
    """linear_attention(q, k [T, Hk, Dk], v [T, Hv, Dv], g [T, Hv], state f32[NS, Hv, Dk, Dv], query_start [B+1],
    seq_lens [B], state_indices [B][, beta [T, Hv]]) -> [T, Hv, Dv] in v's dtype (ir/linear_rules.py)."""
    from kiln.ir.linear_rules import RULES

    q, k, v, g, state, query_start, seq_lens, state_indices, *beta = types
    spec = attrs["spec"]
    _check(spec.rule in RULES, f"unknown recurrence rule {spec.rule!r}; kiln has {', '.join(RULES)}")
    tokens = q.shape[0]
    _check(q.shape == k.shape == (tokens, spec.num_k_heads, spec.head_k_dim), f"q {q} / k {k} do not match {spec}")
    _check(v.shape == (tokens, spec.num_v_heads, spec.head_v_dim), f"v {v} does not match {spec}")
    _check(g.shape == (tokens, spec.num_v_heads), f"g {g} must be [T, {spec.num_v_heads}]")
    _check(state.rank == 4 and state.shape[1:] == spec.state_shape and state.dtype == "f32",
           f"state {state} must be f32[NS, {', '.join(map(str, spec.state_shape))}]")
    _check(len(beta) == RULES[spec.rule].uses_beta, f"rule {spec.rule} takes {'a' if RULES[spec.rule].uses_beta else 'no'} "
                                                     "beta input")
    _check(all(b.shape == g.shape for b in beta), f"beta must be [T, {spec.num_v_heads}]")
    _check(seq_lens.shape == state_indices.shape, f"state_indices {state_indices} must be one per sequence")
    return v


def causal_conv1d(types, attrs):
    """causal_conv1d(x [T, C], weight [C, K], conv_state [NS, K - 1, C], query_start [B+1], seq_lens [B],
    state_indices [B][, bias [C]]) -> [T, C] in x's dtype (ir/linear_rules.py)."""
    from kiln.ir.linear_rules import ACTIVATIONS

    x, weight, conv_state, query_start, seq_lens, state_indices, *bias = types
    _check(x.rank == 2 and weight.rank == 2 and weight.shape[0] == x.shape[1], f"weight {weight} does not fit x {x}")
    _check(conv_state.rank == 3 and conv_state.shape[1:] == (weight.shape[1] - 1, x.shape[1]),
           f"conv_state {conv_state} must be [NS, {weight.shape[1] - 1}, {x.shape[1]}]")
    _check(all(b.shape == (x.shape[1],) for b in bias), f"bias must be [{x.shape[1]}]")
    _check(attrs["activation"] in ACTIVATIONS, f"activation must be one of {list(ACTIVATIONS)}")
    _check(seq_lens.shape == state_indices.shape, f"state_indices {state_indices} must be one per sequence")
    return x


def moe(types, attrs):
    """moe(x [T, K], weights [T, k], ids [T, k], w_gate_up [E, 2I, K], w_down [E, N, I][, b_gate_up [E, 2I],
    b_down [E, N]]) -> [T, N] in x's dtype."""
    x, weights, ids, gate_up, down, *biases = types
    tokens, k = weights.shape
    _check(x.rank == 2 and weights.rank == 2 and ids.shape == weights.shape and tokens == x.shape[0],
           f"moe expects x [T, K], weights and ids [T, top_k]: got {x}, {weights}, {ids}")
    _check(ids.dtype in ("i32", "i64") and weights.dtype in FLOAT_DTYPES, f"moe routing: ids {ids}, weights {weights}")
    experts, two_i, hidden = gate_up.shape
    _check(gate_up.rank == 3 and hidden == x.shape[1] and two_i % 2 == 0,
           f"moe gate_up weight {gate_up} must be [experts, 2 * intermediate, {x.shape[1]}]")
    _check(down.rank == 3 and down.shape[0] == experts and down.shape[2] * 2 == two_i,
           f"moe down weight {down} must be [{experts}, out, {two_i // 2}]")
    _check(not k.is_number or int(k) <= int(experts), f"moe top_k {k} exceeds the {experts} experts")
    if biases:
        _check(len(biases) == 2 and biases[0].shape == (experts, two_i) and biases[1].shape == down.shape[:2],
               f"moe biases {', '.join(map(str, biases))} must be [{experts}, {two_i}] and [{experts}, {down.shape[1]}]")
    _check(attrs["activation"] in MOE_ACTIVATIONS, f"moe activation {attrs['activation']!r}: kiln has "
           f"{', '.join(MOE_ACTIVATIONS)}")
    return TensorType((x.shape[0], down.shape[1]), x.dtype)


# gated activations of a mixture of experts over gate, up = gate_up.chunk(2): "silu": silu(gate) * up;
# "swiglu_clamped" (GPT-OSS): gate clamped to <= limit, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)
MOE_ACTIVATIONS = ("silu", "swiglu_clamped")


def all_reduce(types, attrs):
    """all_reduce(x, ranks): the sum over the ranks of each rank's x, the same type on every rank."""
    (x,) = types
    _check(x.dtype in FLOAT_DTYPES and attrs["ranks"] >= 1, f"all_reduce of {x} over {attrs['ranks']} ranks")
    return x


def all_gather(types, attrs):
    """all_gather(x, dim, ranks): the ranks' x concatenated along `dim` in rank order (dim grows `ranks` times)."""
    (x,) = types
    dim = _dim(x, attrs)
    _check(attrs["ranks"] >= 1, f"all_gather over {attrs['ranks']} ranks")
    shape = list(x.shape)
    shape[dim] = shape[dim] * attrs["ranks"]
    return x.with_shape(shape)


def get(types, attrs):
    (x,) = types
    _check(isinstance(x, TupleType) and 0 <= attrs["index"] < len(x.types), f"get index {attrs['index']} of {x}")
    return x.types[attrs["index"]]


def fused(types, attrs):
    body = attrs["body"]
    wanted = [n.type for n in body.inputs]
    _check(list(types) == wanted, f"inputs ({', '.join(map(str, types))}) do not match body {body.name} "
                                  f"({', '.join(map(str, wanted))})")
    outputs = [n.type for n in body.outputs.values()]
    return outputs[0] if len(outputs) == 1 else TupleType(tuple(outputs))




def compare(types, attrs):
    """A comparison: broadcast like the arithmetic ops, bool result."""
    return broadcast(types, attrs).with_dtype("bool")


def where(types, attrs):
    cond, a, b = types
    _check(cond.dtype == "bool", f"where's condition must be bool, got {cond}")
    shape = broadcast([cond.with_dtype(a.dtype), a, b], attrs).shape
    return TensorType(shape, a.dtype)


def _dim(x: TensorType, attrs) -> int:
    dim = attrs["dim"]
    _check(isinstance(dim, int) and -x.rank <= dim < x.rank, f"dim {dim!r} out of range for {x}")
    return dim % x.rank


def reduce(types, attrs):
    """sum/mean/amax/amin over `dim` (keepdim keeps it as size 1)."""
    (x,) = types
    dim = _dim(x, attrs)
    shape = list(x.shape)
    if attrs.get("keepdim", False):
        shape[dim] = sympy.Integer(1)
    else:
        del shape[dim]
    return x.with_shape(shape)


def arg_reduce(types, attrs):
    """argmax/argmin over `dim`: int64 indices."""
    return reduce(types, attrs).with_dtype("i64")


def along_dim(types, attrs):
    """softmax, log_softmax, cumsum: same shape, along `dim`."""
    _dim(types[0], attrs)
    return types[0]


def layer_norm(types, attrs):
    x, *affine = types
    _check(len(affine) == int(attrs["weight"]) + int(attrs["bias"]), "layer_norm's inputs must match its weight/bias attrs")
    _check(all(a.shape == x.shape[-1:] for a in affine), f"weight/bias {affine} do not match the normalized dim of {x}")
    return x


def top_k(types, attrs):
    """topk(x, k, dim): (values, int64 indices), `k` along dim."""
    (x,) = types
    dim = _dim(x, attrs)
    size = x.shape[dim]
    _check(attrs["k"] >= 1 and (not size.is_number or attrs["k"] <= size), f"topk k={attrs['k']} of {x}")
    shape = list(x.shape)
    shape[dim] = sympy.Integer(attrs["k"])
    return TupleType((x.with_shape(shape), TensorType(tuple(shape), "i64")))


def sort(types, attrs):
    """sort(x, dim, descending): (values, int64 indices)."""
    (x,) = types
    _dim(x, attrs)
    return TupleType((x, x.with_dtype("i64")))


def cat(types, attrs):
    _check(len({t.dtype for t in types}) == 1, f"cat of different dtypes: {', '.join(map(str, types))}")
    first = types[0]
    dim = _dim(first, attrs)
    for t in types[1:]:
        _check(t.rank == first.rank and all(a == b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim),
               f"cat along dim {dim}: shapes differ elsewhere ({', '.join(map(str, types))})")
    shape = list(first.shape)
    shape[dim] = sympy.Add(*(t.shape[dim] for t in types))
    return first.with_shape(shape)


def gather(types, attrs):
    """torch.gather(x, dim, index): the index's shape, x's dtype."""
    x, index = types
    _dim(x, attrs)
    _check(index.dtype in ("i32", "i64") and index.rank == x.rank, f"gather index {index} for {x}")
    return TensorType(index.shape, x.dtype)


def index_select(types, attrs):
    """torch.index_select(x, dim, index [N]): dim replaced by N."""
    x, index = types
    dim = _dim(x, attrs)
    _check(index.dtype in ("i32", "i64") and index.rank == 1, f"index_select index must be an int vector, got {index}")
    shape = list(x.shape)
    shape[dim] = index.shape[0]
    return x.with_shape(shape)
