"""The GEMM's general prologue vs the op registry's references: row gathers, RMSNorms over the K
row (chained, each with its own pre-pass), elementwise ops over [M, K] rows and [K] vectors, and
prologue values the group needs elsewhere (stored by the first tile column); with the epilogues
the lowered graphs pair them with."""

import pytest
import torch

from kiln.codegen.kernels import gemm
from kiln.codegen.match_gemm import gemm_form, gemm_refusal, launch_body
from kiln.codegen.targets import get_target
from kiln.ir import B, GraphBuilder, T, TensorType
from kiln.ir.interpret import run_body

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails
EPS = 1e-5
IR = {"fp32": "f32", "bf16": "bf16"}


def typed(dtype, *shape):
    return TensorType(tuple(shape), IR[dtype])


def norm_linear(dtype, n, k, b):  # SmolLM2's qkv: rms_norm (weight folded) > linear
    x, w = b.input("x", typed(dtype, T, k)), b.input("w", typed(dtype, n, k))
    return [b.op("linear", b.op("rms_norm", x, eps=EPS), w)]


def norm_gate_up(dtype, n, k, b):  # rms_norm > linear > silu(gate) * up
    x, w = b.input("x", typed(dtype, T, k)), b.input("w", typed(dtype, 2 * n, k))
    y = b.op("linear", b.op("rms_norm", x, eps=EPS), w)
    gate, up = (b.op("slice", y, dim=1, start=s, stop=s + n) for s in (0, n))
    return [b.op("mul", b.op("silu", gate), up)]


def gather_residual(dtype, n, k, b):  # the last layer's o_proj on the sampled rows
    x, rows = b.input("x", typed(dtype, T, k)), b.input("rows", TensorType((B,), "i32"))
    w, residual = b.input("w", typed(dtype, n, k)), b.input("residual", typed(dtype, B, n))
    return [b.op("add", residual, b.op("linear", b.op("gather_rows", x, rows), w))]


def gather_norm_weight(dtype, n, k, b):  # lm_head of a tied model: gather, rms_norm with weight
    x, rows = b.input("x", typed(dtype, T, k)), b.input("rows", TensorType((B,), "i32"))
    norm_weight, w = b.input("norm_weight", typed(dtype, k)), b.input("w", typed(dtype, n, k))
    return [b.op("linear", b.op("rms_norm", b.op("gather_rows", x, rows), norm_weight, eps=EPS), w)]


def post_norm_residual_pre_norm(dtype, n, k, b):
    """Gemma / OLMo2: h = residual + rms_norm(o) * w1 (the post-norm and the residual add), then
    gate_up(rms_norm(h) * w2) with GELU; h escapes (the next residual)."""
    o, residual = b.input("o", typed(dtype, T, k)), b.input("residual", typed(dtype, T, k))
    w1, w2 = b.input("w1", typed(dtype, k)), b.input("w2", typed(dtype, k))
    w = b.input("w", typed(dtype, 2 * n, k))
    h = b.op("add", residual, b.op("rms_norm", o, w1, eps=EPS))
    y = b.op("linear", b.op("rms_norm", h, w2, eps=1e-6), w)
    gate, up = (b.op("slice", y, dim=1, start=s, stop=s + n) for s in (0, n))
    return [b.op("mul", b.op("gelu_tanh", gate), up), h]


def scaled_rows(dtype, n, k, b):  # elementwise row ops around a norm: rms_norm(x * 2 + v) * (1 + w)
    x, v, w_norm = b.input("x", typed(dtype, T, k)), b.input("v", typed(dtype, k)), b.input("nw", typed(dtype, k))
    w = b.input("w", typed(dtype, n, k))
    two, one = (b.op("const", value=c, dtype=IR[dtype]) for c in (2.0, 1.0))
    h = b.op("add", b.op("mul", x, two), v)
    return [b.op("linear", b.op("mul", b.op("rms_norm", h, eps=EPS), b.op("add", w_norm, one)), w)]


CASES = [norm_linear, norm_gate_up, gather_residual, gather_norm_weight, post_norm_residual_pre_norm, scaled_rows]


def build(case, dtype, n, k):
    b = GraphBuilder(case.__name__)
    for j, out in enumerate(case(dtype, n, k, b)):
        b.output(f"out{j}", out)
    return b.build()


def random_inputs(body, m, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = m + 5  # a gather reads some of more rows
    tensors = []
    for node in body.inputs:
        if node.type.dtype == "i32":
            tensors.append(torch.randperm(tokens, generator=generator)[:m].to(torch.int32))
            continue
        shape = [{"T": tokens if node.name == "x" and "rows" in [i.name for i in body.inputs] else m, "B": m}
                 .get(str(d), None) or int(d) for d in node.type.shape]
        scale = shape[-1] ** -0.5 if node.name == "w" else 3.0  # not unit scale: the norms must matter
        tensors.append((scale * torch.randn(*shape, generator=generator)).to(node.type.torch_dtype))
    return tensors


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", [(1, 70, 50), (19, 64, 72)])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_matches_the_references(target, check_close, dtype, m, n, k, case):
    body = build(case, dtype, n, k)
    assert gemm_refusal(body, target) is None
    tensors = random_inputs(body, m, seed=m * n + k)
    outs = launch_body(body, target, tensors, m=m)
    for out, exact, same_dtype in zip(outs, run_body(body, tensors, torch.float64), run_body(body, tensors)):
        check_close(out, exact, same_dtype)


def test_rendered_source_holds_the_prologue(target):
    form = gemm_form(build(gather_norm_weight, "bf16", 64, 64))
    variant = gemm.choose(target, dtype="bf16", m=4, n=64, k=64, epilogue=form.epilogue, prologue=form.prologue)
    source = gemm.render(variant)
    assert "o_x_rows = tl.load(p_rows + o_m % M)" in source
    statistics, main_loop = source.split("for i_k in range")[1:]
    assert "b_sum_sq += tl.sum(b_x * b_x, 1)" in statistics
    assert "b_kvec0" in main_loop and "tl.dot(b_x_dot, b_w, acc0" in main_loop
    assert "acc0 *= b_rstd0" in main_loop
    assert "__gather_rows__rms_norm__n64" in variant.cache_key
    assert list(gemm.signature(variant)) == ["p_x", "p_w", "p_rows", "p_kvec0", "p_out", "M"]


def test_chained_norms_get_one_pre_pass_each_and_the_escaping_value_a_store():
    form = gemm_form(build(post_norm_residual_pre_norm, "bf16", 64, 64))
    variant = gemm.choose(get_target("h100"), dtype="bf16", m=4096, n=64, k=64, epilogue=form.epilogue,
                          prologue=form.prologue)
    first, second, main_loop = gemm.render(variant).split("for i_k in range")[1:]
    assert "* b_rstd0" not in first and "* b_rstd0" in second  # the second norm reads the first's output
    assert "tl.store(p_x_out0" in main_loop and "mask_x_out" in main_loop
    assert "acc0 *= b_rstd1" in main_loop and "1e-06" in second
    assert gemm.outputs(variant) == ["p_out", "p_x_out0"] and form.outputs == (0, 1)


@pytest.mark.parametrize("ops, reason", [
    (lambda b, x: b.op("softmax", x, dim=-1), "softmax cannot run in a matmul prologue"),
    # a norm over part of the row
    (lambda b, x: b.op("rms_norm", b.op("slice", x, dim=1, start=0, stop=32), eps=EPS), "slice cannot run in a matmul prologue"),
])
def test_prologue_refusals_say_why(ops, reason):
    b = GraphBuilder("bad")
    x = b.input("x", typed("bf16", T, 64))
    value = ops(b, x)
    w = b.input("w", typed("bf16", 64, value.type.shape[-1]))
    b.output("out0", b.op("linear", value, w))
    assert reason in gemm_refusal(b.build(), get_target("h100"))
