"""The generic row kernel (`rows`) vs the reference interpreter: every body below is planned,
rendered and run under TRITON_INTERPRET=1 (on a GPU when present), in f32 against
`kiln.ir.interpret` with a tight tolerance and in bf16 within 2x the error of the same body
interpreted in bf16 (the oracle: the f32 body on the same bf16 inputs). Plus: refusals come
with reasons, `match_rows` emits the launch in the variant's argument order, the generated
source names every op, and realistic sizes cross-compile for every GPU arch without spills."""

import math

import pytest
import torch

from kiln.codegen.kernels import rows
from kiln.codegen.match_common import Site
from kiln.codegen.match_rows import match_rows, rows_refusal
from kiln.codegen.targets import get_target
from kiln.ir import NB, OPS, GraphBuilder, OpKind, RopeSpec, T, TensorType, interpret
from kiln.ir.specs import YarnScaling

# Padded lanes of a block compute garbage (log(0), sqrt(-1)) that is never stored; numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:(divide by zero|invalid value|overflow) encountered:RuntimeWarning")
CPU = get_target("cpu")
TOKENS = 5
PAGE = 4
YARN = YarnScaling(factor=4.0, original_max_position=64, attention=0.1 * math.log(4.0) + 1.0)


def _const(b, value, dtype):
    return b.op("const", value=value, dtype=dtype)


# -- bodies: each `(dtype) -> Graph`, built as fusion builds them (inputs in0..inN, outputs out0..) --

def norm_add(dtype, d=48):
    """Gemma's post-norm: h = residual + rms_norm(x) * w (out0), then the next pre-norm (out1)."""
    b = GraphBuilder("post_norm")
    x, w = b.input("in0", TensorType((T, d), dtype)), b.input("in1", TensorType((d,), dtype))
    residual, w2 = b.input("in2", TensorType((T, d), dtype)), b.input("in3", TensorType((d,), dtype))
    h = b.op("add", residual, b.op("rms_norm", x, w, eps=1e-6))
    b.output("out0", h)
    b.output("out1", b.op("rms_norm", h, w2, eps=1e-6))
    return b.build()


def embedding_scale(dtype, with_norm=False, d=40):
    """Gemma's scaled embedding (x sqrt(hidden), the constant in the model dtype) [> rms_norm]."""
    b = GraphBuilder("embed")
    table, ids = b.input("in0", TensorType((50, d), dtype)), b.input("in1", TensorType((T,), "i32"))
    h = b.op("mul", b.op("embedding", table, ids), _const(b, math.sqrt(d), dtype))
    b.output("out0", h)
    if with_norm:
        b.output("out1", b.op("rms_norm", h, b.input("in2", TensorType((d,), dtype)), eps=1e-6))
    return b.build()


def _heads(b, qkv, start, heads, head_dim):
    return b.op("reshape", b.op("slice", qkv, dim=1, start=start * head_dim, stop=(start + heads) * head_dim),
                shape=(T, heads, head_dim))


def qk_norm_rope(dtype, heads=4, kv_heads=2, head_dim=32, rotary_dim=None, scaling=None, mscale=None):
    """Qwen3 / Gemma3: per-head q and k rms_norm, rope, k and v into the paged caches; q's
    rope optionally times YaRN's mscale; partial rotary when rotary_dim < head_dim."""
    spec = RopeSpec(head_dim=head_dim, theta=1e4, rotary_dim=rotary_dim, scaling=scaling)
    b = GraphBuilder("qk_norm_rope")
    qkv = b.input("in0", TensorType((T, (heads + 2 * kv_heads) * head_dim), dtype))
    q_w, k_w = b.input("in1", TensorType((head_dim,), dtype)), b.input("in2", TensorType((head_dim,), dtype))
    positions, slots = b.input("in3", TensorType((T,), "i32")), b.input("in4", TensorType((T,), "i32"))
    cache = TensorType((NB, PAGE, kv_heads, head_dim), dtype)
    k_cache, v_cache = b.input("in5", cache), b.input("in6", cache)
    q = b.op("rope", b.op("rms_norm", _heads(b, qkv, 0, heads, head_dim), q_w, eps=1e-6), positions, spec=spec)
    b.output("out0", q if mscale is None else b.op("mul", q, _const(b, mscale, dtype)))
    k = b.op("rope", b.op("rms_norm", _heads(b, qkv, heads, kv_heads, head_dim), k_w, eps=1e-6), positions, spec=spec)
    b.output("out1", b.op("kv_write", k, k_cache, slots, layer=0))
    b.output("out2", b.op("kv_write", _heads(b, qkv, heads + kv_heads, kv_heads, head_dim), v_cache, slots, layer=0))
    return b.build()


def olmo2_q(dtype, heads=3, head_dim=16):
    """OLMo2: rms_norm over the whole q row [H*D], then reshape to heads, then rope."""
    spec = RopeSpec(head_dim=head_dim, theta=5e5)
    b = GraphBuilder("olmo2_q")
    qkv = b.input("in0", TensorType((T, 3 * heads * head_dim), dtype))
    w, positions = b.input("in1", TensorType((heads * head_dim,), dtype)), b.input("in2", TensorType((T,), "i32"))
    q = b.op("rms_norm", b.op("slice", qkv, dim=1, start=0, stop=heads * head_dim), w, eps=1e-6)
    b.output("out0", b.op("rope", b.op("reshape", q, shape=(T, heads, head_dim)), positions, spec=spec))
    return b.build()


def softcap(dtype, d=100, cap=30.0):
    """Logit soft-capping: tanh(x / c) * c."""
    b = GraphBuilder("softcap")
    x = b.input("in0", TensorType((T, d), dtype))
    c = _const(b, cap, dtype)
    b.output("out0", b.op("mul", b.op("tanh", b.op("div", x, c)), c))
    return b.build()


def gelu_gate(dtype, d=40):
    """Gemma's MLP activation over the packed gate/up row: gelu_tanh(gate) * up."""
    b = GraphBuilder("gelu_gate")
    gate_up = b.input("in0", TensorType((T, 2 * d), dtype))
    gate, up = (b.op("slice", gate_up, dim=1, start=s, stop=s + d) for s in (0, d))
    b.output("out0", b.op("mul", b.op("gelu_tanh", gate), up))
    return b.build()


def reductions(dtype, heads=3, d=20):
    """softmax, log_softmax, layer_norm (weight, bias), x - amax(x), sum (no keepdim), mean
    over per-head rows [H, D]: independent and chained reductions in one kernel."""
    b = GraphBuilder("reductions")
    x = b.input("in0", TensorType((T, heads, d), dtype))
    w, bias = b.input("in1", TensorType((d,), dtype)), b.input("in2", TensorType((d,), dtype))
    b.output("out0", b.op("softmax", x, dim=-1))
    b.output("out1", b.op("log_softmax", b.op("mul", x, _const(b, 0.5, dtype)), dim=2))
    b.output("out2", b.op("layer_norm", x, w, bias, weight=True, bias=True, eps=1e-5))
    b.output("out3", b.op("sub", x, b.op("amax", x, dim=-1, keepdim=True)))
    b.output("out4", b.op("sum", b.op("exp", x), dim=-1, keepdim=False))
    b.output("out5", b.op("div", b.op("mean", x, dim=-1, keepdim=True), b.op("amin", x, dim=2, keepdim=True)))
    return b.build()


def pointwise(dtype, d=24):
    """where / comparisons / clamp and the helper-backed unary ops."""
    b = GraphBuilder("pointwise")
    x, y = b.input("in0", TensorType((T, d), dtype)), b.input("in1", TensorType((T, d), dtype))
    picked = b.op("where", b.op("gt", x, y), x, b.op("mul", y, _const(b, 2.0, dtype)))
    b.output("out0", b.op("clamp", picked, min=-0.5, max=None))
    b.output("out1", b.op("add", b.op("gelu", x), b.op("softplus", y, beta=2.0, threshold=5.0)))
    b.output("out2", b.op("pow", b.op("abs", x), _const(b, 1.5, dtype)))
    shifted = b.op("add", b.op("relu", y), _const(b, 1.0, dtype))
    b.output("out3", b.op("mul", b.op("sigmoid", x), b.op("rsqrt", shifted)))
    b.output("out4", b.op("where", b.op("le", x, _const(b, 0.0, dtype)), b.op("silu", x), b.op("sqrt", x)))
    b.output("out5", b.op("cast", b.op("cast", b.op("neg", x), dtype="bf16"), dtype=dtype))
    return b.build()


# -- running and comparing --

def _inputs(body, dtype, generator):
    """Random inputs by role: floats ~N(0, 1) (weights around 1), positions, slots (one -1),
    ids into the table, caches."""
    tensors = []
    for node in body.inputs:
        shape = node.type.concrete_shape({T: TOKENS, NB: 3})
        if node.type.dtype == "i32":
            if node.name == "in4" and body.name == "qk_norm_rope":  # slot_mapping: distinct slots, one skipped
                tensors.append(torch.tensor([0, 5, -1, 7, 11], dtype=torch.int32))
            else:
                tensors.append(torch.randint(0, 50, shape, generator=generator, dtype=torch.int32))
        else:
            scale = 1.0 if len(shape) != 1 else 0.2
            value = torch.randn(shape, generator=generator) * scale + (1.0 if len(shape) == 1 else 0.0)
            tensors.append(value.to(_TORCH[dtype]))
    return tensors


_TORCH = {"f32": torch.float32, "bf16": torch.bfloat16}
_KERNEL = {"f32": "fp32", "bf16": "bf16"}


def _interpret(body, tensors):
    named = {n.name: t.clone() for n, t in zip(body.inputs, tensors)}
    out = interpret(body, named, {}, {})
    return [out[name] for name in body.outputs]


def _check(make_body, dtype, check_close, device, seed=0):
    body = make_body(dtype)
    tensors = _inputs(body, dtype, torch.Generator().manual_seed(seed))
    variant = rows.plan(body, CPU, _KERNEL[dtype])
    actual = [t.cpu() for t in rows.launch(variant, body, [t.clone().to(device) for t in tensors])]
    same_dtype = _interpret(body, tensors)
    if dtype == "f32":
        for got, want in zip(actual, same_dtype):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    else:
        exact = _interpret(make_body("f32"), [t.float() if t.is_floating_point() else t for t in tensors])
        for got, want, same in zip(actual, exact, same_dtype):
            check_close(got, want, same)
    return variant


BODIES = {
    "norm_add": norm_add,
    "embedding_scale": embedding_scale,
    "embedding_scale_norm": lambda dtype: embedding_scale(dtype, with_norm=True),
    "qk_norm_rope": qk_norm_rope,
    "partial_rotary": lambda dtype: qk_norm_rope(dtype, head_dim=32, rotary_dim=16),
    "yarn_mscale": lambda dtype: qk_norm_rope(dtype, heads=2, kv_heads=1, head_dim=16, scaling=YARN,
                                              mscale=YARN.attention_factor),
    "olmo2_q": olmo2_q,
    "softcap": softcap,
    "gelu_gate": gelu_gate,
    "reductions": reductions,
    "pointwise": pointwise,
}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("name", list(BODIES))
def test_body_matches_the_reference_interpreter(name, dtype, check_close, device):
    _check(BODIES[name], dtype, check_close, device)


ELEMENTWISE = sorted(name for name, op in OPS.items() if op.kind == OpKind.ELEMENTWISE and op.triton)


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_every_registry_elementwise_op_renders_from_its_triton_string(op, device):
    """Each op of the registry with a `triton` expression, on positive and negative values
    (log, sqrt, pow on |x| + 0.5), attributes at their defaults (clamp: both bounds)."""
    b = GraphBuilder("one_op")
    x, y = b.input("in0", TensorType((T, 24), "f32")), b.input("in1", TensorType((T, 24), "f32"))
    positive = b.op("add", b.op("abs", x), _const(b, 0.5, "f32"))
    operand = positive if op in ("log", "sqrt", "rsqrt", "pow") else x
    attrs = {"clamp": {"min": -0.3, "max": 0.4}, "cast": {"dtype": "bf16"}}.get(op, {})
    operands = {1: [operand], 2: [operand, y], 3: [b.op("lt", x, y), x, y]}[OPS[op].arity[0]]
    b.output("out0", b.op(op, *operands, **{**OPS[op].defaults, **attrs}))
    body = b.build()
    tensors = [torch.randn(TOKENS, 24, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    (got,) = rows.launch(rows.plan(body, CPU, "fp32"), body, [t.to(device) for t in tensors])
    (want,) = _interpret(body, tensors)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-6, atol=2e-6)


def test_elementwise_rows_are_tiled_and_reductions_are_not():
    assert rows.plan(gelu_gate("bf16"), CPU, "bf16").tiles == 2  # 40 lanes in the cpu target's tiles of 32
    assert rows.plan(norm_add("bf16"), CPU, "bf16").tiles == 1
    wide = rows.plan(gelu_gate("bf16", d=14336), get_target("h100"), "bf16")
    assert wide.tiles == 14 and rows.grid(wide, 7) == (7, 14)


def test_generated_source_names_every_op_and_reads_each_value_once():
    variant = rows.plan(qk_norm_rope("bf16"), CPU, "bf16")
    source = rows.render(variant)
    for op in ("rms_norm", "rope", "kv_write", "slice", "reshape"):
        assert f"= {op}(" in source
    assert source.count("rms_norm_rstd(") == 2  # q and k: one statistic each, reused at the partner lanes
    assert "tl.cos(" in source and source.count("tl.cos(") == 1  # one angle table for q and k
    assert variant.cache_key.startswith("rows__bf16__") and variant.cache_key.endswith(f"__w{variant.num_warps}")
    assert rows.plan(qk_norm_rope("bf16"), CPU, "bf16") == variant  # plain, deterministic data


# -- refusals ---

def _one_op_body(op, shape, **attrs):
    b = GraphBuilder("refused")
    x = b.input("in0", TensorType(shape, "f32"))
    b.output("out0", b.op(op, x, **attrs))
    return b.build()


@pytest.mark.parametrize("body, reason", [
    (_one_op_body("softmax", (T, 32768), dim=-1), "a reduction over 32768 channels is wider than a row kernel holds"),
    (_one_op_body("sum", (T, 8, 4), dim=1, keepdim=True), "along dim 1"),
    (_one_op_body("argmax", (T, 8), dim=-1, keepdim=False), "argmax has no row-kernel form"),
    (_one_op_body("cumsum", (T, 8), dim=-1), "cumsum has no row-kernel form"),
    (_one_op_body("sum", (T,), dim=0, keepdim=False), "has no row dim"),
])
def test_bodies_it_cannot_render_get_a_reason(body, reason):
    why = rows_refusal(body, CPU)
    assert why is not None and reason in why, why


def test_a_sum_over_the_rows_is_refused():
    b = GraphBuilder("over_rows")
    x = b.input("in0", TensorType((T,), "f32"))
    b.output("out0", b.op("add", x, b.op("sum", x, dim=0, keepdim=True)))
    assert rows_refusal(b.build(), CPU) == "sum across the rows"


def test_a_linear_is_refused_with_its_reason():
    b = GraphBuilder("with_linear")
    x, w = b.input("in0", TensorType((T, 8), "f32")), b.input("in1", TensorType((4, 8), "f32"))
    b.output("out0", b.op("silu", b.op("linear", x, w)))
    assert rows_refusal(b.build(), CPU) == "linear has no row-kernel form"
    assert rows_refusal(norm_add("bf16"), get_target("h100")) is None


# -- the launch a program emits --

class _Program:
    target = CPU

    def __init__(self):
        self.registered = []

    def variant(self, kind, variant):
        self.registered.append((kind, variant))
        return "ROWS_0"

    def rope_table(self, spec):
        return f"table({spec.theta:g})"


def test_match_rows_passes_inputs_outputs_and_rope_tables_in_the_variant_order():
    body = qk_norm_rope("bf16")
    b = GraphBuilder()
    node = b.op("fused", *(b.input(f"x{k}", n.type) for k, n in enumerate(body.inputs)), body=body, pattern=None)
    program = _Program()
    site = Site(node, [f"x{k}" for k in range(len(body.inputs))], ["q_out", None, None], program)
    match_rows(site)
    assert program.registered[0][0] is rows
    assert site.lines == [
        "launcher.launch(ROWS_0, (T,), x0, x1, x2, x3, x4, x5, x6, q_out, table(10000))"]


# -- cross-compilation at realistic sizes ---

def _gelu_erf_zoo(dtype, d=4096):
    b = GraphBuilder("zoo")
    x, w = b.input("in0", TensorType((T, d), dtype)), b.input("in1", TensorType((d,), dtype))
    h = b.op("layer_norm", b.op("gelu", x), w, weight=True, bias=False, eps=1e-5)
    b.output("out0", b.op("softmax", b.op("clamp", h, min=-10.0, max=10.0), dim=-1))
    b.output("out1", b.op("pow", b.op("softplus", x, beta=1.0, threshold=20.0), _const(b, 0.5, dtype)))
    return b.build()


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    bodies = [norm_add("bf16", d=4096), embedding_scale("bf16", with_norm=True, d=4096),
              qk_norm_rope("bf16", heads=32, kv_heads=8, head_dim=128),
              qk_norm_rope("bf16", heads=16, kv_heads=4, head_dim=256, rotary_dim=64, scaling=YARN, mscale=1.1),
              olmo2_q("bf16", heads=32, head_dim=128), gelu_gate("bf16", d=14336), _gelu_erf_zoo("bf16"),
              reductions("bf16", heads=32, d=128), pointwise("bf16", d=4096)]
    kernels = cross_compile(rows, lambda target: [rows.plan(body, target, "bf16") for body in bodies])
    assert all(k.resources.registers <= 255 for k in kernels)
