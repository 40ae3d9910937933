"""gemm vs torch: out = epilogue(x @ W^T) for GEMV and GEMM shapes, the common epilogues built
as kernel bodies (bias, activations, the packed gate/up product, a residual add), the register
model of `choose`, and cross-compilation for every GPU arch."""

import pytest
import torch

from kiln.codegen.kernels import gemm
from kiln.codegen.match_gemm import gemm_form, launch_body
from kiln.ir import GraphBuilder, T, TensorType
from kiln.ir.interpret import run_body

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails
IR_DTYPES = {"fp32": "f32", "bf16": "bf16"}


def linear_body(dtype, n, k, epilogue):
    """linear [> epilogue ops by name: bias, silu, gelu_tanh, silu_mul (packed gate/up), residual]."""
    b = GraphBuilder("gemm")
    ir = IR_DTYPES[dtype]
    x = b.input("in0", TensorType((T, k), ir))
    weight = b.input("in1", TensorType((2 * n if "silu_mul" in epilogue else n, k), ir))
    bias = [b.input("in2", TensorType((n,), ir))] if "bias" in epilogue else []
    value = b.op("linear", x, weight, *bias)
    for op in epilogue:
        if op == "silu_mul":
            gate, up = (b.op("slice", value, dim=1, start=s, stop=s + n) for s in (0, n))
            value = b.op("mul", b.op("silu", gate), up)
        elif op == "residual":
            value = b.op("add", b.input(f"in{len(b.nodes)}", TensorType((T, n), ir)), value)
        elif op != "bias":
            value = b.op(op, value)
    b.output("out0", value)
    return b.build()


def random_inputs(body, m, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for node in body.inputs:
        shape = [m if not d.is_number else int(d) for d in node.type.shape]
        scale = shape[-1] ** -0.5 if node is body.inputs[1] else 1.0
        tensors.append((scale * torch.randn(*shape, generator=generator)).to(node.type.torch_dtype).to(device))
    return tensors


EPILOGUES = [(), ("bias",), ("silu",), ("gelu_tanh",), ("silu_mul",), ("residual",), ("bias", "gelu_tanh"),
             ("silu_mul", "residual")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", [(1, 70, 50), (17, 64, 128), (40, 70, 50)])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda ops: "-".join(ops) or "plain")
def test_matches_torch(device, target, check_close, dtype, m, n, k, epilogue):
    body = linear_body(dtype, n, k, epilogue)
    tensors = random_inputs(body, m, seed=m + n + k, device=device)
    (out,) = launch_body(body, target, tensors, m=m)
    check_close(out, run_body(body, tensors, torch.float64)[0], run_body(body, tensors)[0])


def test_residual_add_in_place(device, target, check_close):
    """o_proj-style: the residual stream is both the residual operand and the output."""
    body = linear_body("bf16", 64, 96, ("residual",))
    x, weight, residual = random_inputs(body, 5, seed=3, device=device)
    exact, same_dtype = run_body(body, [x, weight, residual], torch.float64)[0], run_body(body, [x, weight, residual])[0]
    form = gemm_form(body)
    variant = gemm.choose(target, dtype="bf16", m=5, n=64, k=96, epilogue=form.epilogue)
    assert gemm.launch(variant, x, weight, residual, out=residual) is residual
    check_close(residual, exact, same_dtype)


def test_rendered_source_contains_the_fused_ops(target):
    form = gemm_form(linear_body("bf16", 64, 64, ("silu_mul", "residual")))
    variant = gemm.choose(target, dtype="bf16", m=8, n=64, k=64, epilogue=form.epilogue)
    source = gemm.render(variant)
    assert "acc1 = tl.dot(b_x, b_w, acc1" in source and "p_w_tile + 1 * N * K" in source
    assert "= silu(acc0)" in source and "* acc1" in source
    assert "tl.load(p_tile0 + o_out" in source
    assert "p_bias" not in source
    assert variant.cache_key.startswith("gemm__bf16__n64__k64__x2__silu_mul_add__h")
    assert f"def {variant.cache_key}(" in source


def test_block_n_shrinks_where_live_tiles_would_spill():
    """The register model `choose` uses; test_cross_compiles_for_every_gpu_arch checks it holds."""
    from kiln.codegen.targets import get_target

    def block_n(target_name, epilogue):
        form = gemm_form(linear_body("bf16", 1536, 576, epilogue))
        return gemm.choose(get_target(target_name), dtype="bf16", m=4096, n=1536, k=576, epilogue=form.epilogue,
                           bias=form.bias).block_n

    # h100: 128x256 on 8 warps = 128 accumulator values/thread, the whole budget of each phase.
    assert block_n("h100", ()) == block_n("h100", ("bias",)) == block_n("h100", ("gelu_tanh",)) == 256
    assert block_n("h100", ("silu_mul",)) == block_n("h100", ("residual",)) == 128
    # a100: 128x128 = 64 values/thread; mma.sync's budget (64) has no room for a second
    # accumulator, but the epilogue's (128) has room for the residual tile.
    assert block_n("a100", ()) == block_n("a100", ("residual",)) == 128
    assert block_n("a100", ("silu_mul",)) == 64


@pytest.mark.parametrize("epilogue, prologue, message", [
    (gemm.Epilogue(operands=(("p_tile0", "k"),)), gemm.Prologue(), "layouts"),
    (gemm.Epilogue(operands=(("p_tile0", "mn"), ("p_tile0", "n"))), gemm.Prologue(), "repeat"),
    (gemm.Epilogue(statements=(("b_v0", "no_such_helper(acc0)"),), outputs=("b_v0",)), gemm.Prologue(), "helper"),
    (gemm.Epilogue(), gemm.Prologue(x_layout="mk_rows"), "rows operand"),
])
def test_rejects_malformed_variants(target, epilogue, prologue, message):
    with pytest.raises(ValueError, match=message):
        gemm.choose(target, dtype="bf16", m=1, n=64, k=64, epilogue=epilogue, prologue=prologue)


def test_operands_must_match_the_variant(device, target):
    x, weight, bias = torch.ones(2, 64), torch.ones(64, 64), torch.ones(64)
    with pytest.raises(ValueError, match="bias"):
        gemm.launch(gemm.choose(target, dtype="fp32", m=2, n=64, k=64), x, weight, bias=bias)
    residual = gemm_form(linear_body("fp32", 64, 64, ("residual",))).epilogue
    with pytest.raises(ValueError, match="p_tile0"):
        gemm.launch(gemm.choose(target, dtype="fp32", m=2, n=64, k=64, epilogue=residual), x, weight)


def test_bucket_by_rows():
    assert [gemm.bucket(m) for m in (1, 16, 17, 128, 129)] == ["decode", "decode", "small", "small", "large"]


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    def variant(target, m, n, k, epilogue):
        form = gemm_form(linear_body("bf16", n, k, epilogue))
        return gemm.choose(target, dtype="bf16", m=m, n=n, k=k, epilogue=form.epilogue, bias=form.bias)

    def variants(target):
        return [
            variant(target, 1, 576, 1536, ("residual",)),
            variant(target, 64, 1536, 576, ("bias",)),
            variant(target, 4096, 1536, 576, ()),
            variant(target, 4096, 1536, 576, ("silu_mul",)),
            variant(target, 4096, 576, 1536, ("bias", "gelu_tanh", "residual")),
        ]

    cross_compile(gemm, variants)


def gemma_layer_bodies(n, k):
    """Realistic general forms: gelu(gate) * up; Gemma 2's softcap; Granite's scaled residual; and
    the chained-norm prologue h = residual + rms_norm(o) * w1 -> gate_up(rms_norm(h) * w2), h escaping."""
    def body(build):
        b = GraphBuilder("gemm")
        for j, out in enumerate(build(b, lambda name, *shape: b.input(name, TensorType(shape, "bf16")))):
            b.output(f"out{j}", out)
        return b.build()

    def gate_up(b, y):
        gate, up = (b.op("slice", y, dim=1, start=s, stop=s + n) for s in (0, n))
        return b.op("mul", b.op("gelu_tanh", gate), up)

    def const(b, value):
        return b.op("const", value=value, dtype="bf16")

    def chained(b, input):
        h = b.op("add", input("residual", T, k), b.op("rms_norm", input("o", T, k), input("w1", k), eps=1e-6))
        return [gate_up(b, b.op("linear", b.op("rms_norm", h, input("w2", k), eps=1e-6), input("w", 2 * n, k))), h]

    return {
        "gelu_gate_up": body(lambda b, input: [gate_up(b, b.op("linear", input("x", T, k), input("w", 2 * n, k)))]),
        "softcap": body(lambda b, input: [b.op("mul", b.op("tanh", b.op(
            "div", b.op("linear", input("x", T, k), input("w", n, k)), const(b, 30.0))), const(b, 30.0))]),
        "scaled_residual": body(lambda b, input: [b.op("add", input("residual", T, n), b.op(
            "mul", b.op("linear", input("x", T, k), input("w", n, k)), const(b, 0.22)))]),
        "chained_norms": body(chained),
    }


def smollm2_lm_head():
    """gather_rows > rms_norm (with its weight) > linear: SmolLM2's tied lm_head, N = 49152, K = 576."""
    b = GraphBuilder("lm_head")
    x, rows = b.input("x", TensorType((T, 576), "bf16")), b.input("rows", TensorType((T,), "i32"))
    norm_weight, w = b.input("nw", TensorType((576,), "bf16")), b.input("w", TensorType((49152, 576), "bf16"))
    b.output("out0", b.op("linear", b.op("rms_norm", b.op("gather_rows", x, rows), norm_weight, eps=1e-5), w))
    return b.build()


def test_general_forms_cross_compile_without_spills(cross_compile):
    """bf16, N = K = 4096, the decode and large row buckets, every GPU arch (resources with -s)."""
    forms = [gemm_form(body) for body in [*gemma_layer_bodies(4096, 4096).values(), smollm2_lm_head()]]

    def variants(target):
        return [gemm.choose(target, dtype="bf16", m=m, n=form.n, k=form.k, epilogue=form.epilogue,
                            prologue=form.prologue, bias=form.bias) for form in forms for m in (1, 4096)]

    cross_compile(gemm, variants)
