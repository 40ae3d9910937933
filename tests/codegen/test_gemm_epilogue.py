"""The GEMM's general epilogue: any elementwise ops of the op registry after the linear (over its
output or equal-width column slices of it, [M, N] tiles, [N] columns, [M, 1] rows and constants),
read from a kernel body by match_gemm and checked against the registry's references; what
`gemm_refusal` refuses, and why."""

import pytest
import torch

from kiln.codegen.kernels import gemm
from kiln.codegen.match_gemm import gemm_form, gemm_refusal, launch_body
from kiln.codegen.targets import get_target
from kiln.ir import GraphBuilder, T, TensorType
from kiln.ir.interpret import run_body

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails
IR = {"fp32": "f32", "bf16": "bf16"}


def random_inputs(body, m, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for node in body.inputs:
        shape = [m if not d.is_number else int(d) for d in node.type.shape]
        scale = shape[-1] ** -0.5 if node.name == "w" else 1.0
        tensors.append((scale * torch.randn(*shape, generator=generator)).to(node.type.torch_dtype))
    return tensors


class Body:
    """A GraphBuilder for GEMM bodies: `x` [T, K], `w` [slices*N, K], `linear()` and its slices."""

    def __init__(self, dtype, n, k, slices=1):
        self.b, self.ir, self.n = GraphBuilder("gemm"), IR[dtype], n
        self.x = self.b.input("x", TensorType((T, k), self.ir))
        self.w = self.b.input("w", TensorType((slices * n, k), self.ir))

    def input(self, name, *shape):
        return self.b.input(name, TensorType(tuple(T if d == "M" else d for d in shape), self.ir))

    def const(self, value):
        return self.b.op("const", value=value, dtype=self.ir)

    def op(self, name, *args, **attrs):
        return self.b.op(name, *args, **attrs)

    def slice(self, value, j):
        return self.op("slice", value, dim=1, start=j * self.n, stop=(j + 1) * self.n)

    def build(self, *outputs):
        for j, out in enumerate(outputs):
            self.b.output(f"out{j}", out)
        return self.b.build()


def gelu_gate_up(dtype, n, k):  # Gemma's MLP
    g = Body(dtype, n, k, slices=2)
    y = g.op("linear", g.x, g.w)
    return g.build(g.op("mul", g.op("gelu_tanh", g.slice(y, 0)), g.slice(y, 1)))


def scaled_residual(dtype, n, k):  # Granite: residual + o * residual_multiplier
    g = Body(dtype, n, k)
    residual = g.input("residual", "M", n)
    return g.build(g.op("add", residual, g.op("mul", g.op("linear", g.x, g.w), g.const(0.22))))


def logits_scale(dtype, n, k):  # Granite: logits / logits_scaling
    g = Body(dtype, n, k)
    return g.build(g.op("div", g.op("linear", g.x, g.w), g.const(8.0)))


def softcap(dtype, n, k):  # Gemma 2's final logit softcap
    g = Body(dtype, n, k)
    capped = g.op("tanh", g.op("div", g.op("linear", g.x, g.w), g.const(30.0)))
    return g.build(g.op("mul", capped, g.const(30.0)))


def bias_silu(dtype, n, k):
    g = Body(dtype, n, k)
    return g.build(g.op("silu", g.op("linear", g.x, g.w, g.input("bias", n))))


def columns_and_rows(dtype, n, k):  # a [N] scale, a [M, 1] shift, a clamp with constants
    g = Body(dtype, n, k)
    scaled = g.op("mul", g.op("linear", g.x, g.w), g.input("col", n))
    return g.build(g.op("clamp", g.op("add", scaled, g.input("row", "M", 1)), min=-1.5, max=2.0))


def two_outputs(dtype, n, k):  # the residual sum and an activation of it
    g = Body(dtype, n, k)
    total = g.op("add", g.op("linear", g.x, g.w), g.input("residual", "M", n))
    return g.build(total, g.op("sigmoid", g.op("neg", total)))


def three_slices(dtype, n, k):  # a * b + c over a 3N-wide packed projection
    g = Body(dtype, n, k, slices=3)
    y = g.op("linear", g.x, g.w)
    return g.build(g.op("add", g.op("mul", g.slice(y, 0), g.slice(y, 1)), g.slice(y, 2)))


CASES = [gelu_gate_up, scaled_residual, logits_scale, softcap, bias_silu, columns_and_rows, two_outputs, three_slices]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_general_epilogues_match_the_references(target, check_close, dtype, m, case):
    body = case(dtype, n=48, k=40)
    assert gemm_refusal(body, target) is None
    tensors = random_inputs(body, m, seed=m + len(case.__name__))
    outs = launch_body(body, target, tensors, m=m)
    # triton_device.tanh is 2 / (1 + exp(-2x)) - 1: near 0 its fp32 error is ~1 ulp of 1, not of x
    slack = 10.0 if case is softcap and dtype == "fp32" else 2.0
    for out, exact, same_dtype in zip(outs, run_body(body, tensors, torch.float64), run_body(body, tensors)):
        check_close(out, exact, same_dtype, slack=slack)


def test_the_variant_is_plain_data_with_a_readable_key():
    """What a program stores (gpu_program._literal): nested frozen dataclasses of tuples, strs,
    ints, floats; the key names the ops and hashes the statements."""
    h100 = get_target("h100")
    form = gemm_form(gelu_gate_up("bf16", 4096, 4096))
    variant = gemm.choose(h100, dtype="bf16", m=4096, n=4096, k=4096, epilogue=form.epilogue)
    assert variant.epilogue.statements == (("b_v0", "gelu_tanh(acc0)"), ("b_v1", "b_v0 * acc1"))
    assert variant.cache_key.startswith("gemm__bf16__n4096__k4096__x2__gelu_tanh_mul__h")
    assert eval(repr(variant), {"Variant": gemm.Variant, "Epilogue": gemm.Epilogue, "Prologue": gemm.Prologue}) == variant
    other = gemm.choose(h100, dtype="bf16", m=4096, n=4096, k=4096,
                        epilogue=gemm_form(three_slices("bf16", 4096, 4096)).epilogue)
    assert other.cache_key != variant.cache_key and other.block_n < variant.block_n  # three accumulators


def refusal_of(build):
    return gemm_refusal(build(Body("bf16", 40, 40)), get_target("h100"))


@pytest.mark.parametrize("build, reason", [
    (lambda g: g.build(g.op("softmax", g.op("linear", g.x, g.w), dim=-1)), "softmax has no Triton expression"),
    (lambda g: g.build(g.op("linear", g.x, g.w), g.op("linear", g.x, g.w)), "exactly one linear"),
    (lambda g: g.build(g.op("add", g.op("linear", g.x, g.w), g.input("wide", 5, "M", 40))),
     "over bf16[5, T, 40] in the epilogue"),
    (lambda g: g.build(g.op("add", g.op("linear", g.x, g.w), g.x)), None),  # N = K: x is also an [M, N] tile
    (lambda g: (lambda s: g.build(g.op("add", g.op("linear", s, g.w), s)))(g.op("silu", g.x)), "a prologue value"),
    (lambda g: g.build(g.op("cumsum", g.op("linear", g.x, g.w), dim=-1)), "cumsum"),
])
def test_refusals_say_why(build, reason):
    why = refusal_of(build)
    assert why is None if reason is None else reason in why
