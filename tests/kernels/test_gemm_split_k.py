"""gemm's serial split-K (decode-sized M on GPU targets): the split variants `choose` picks for
h100, run under the interpreter, against an fp64 torch reference and the same tiles unsplit
(plain x, bias, the packed silu*mul epilogue, an in-place residual add, RMSNorm prologues with
an escaping value; K not a multiple of BLOCK_K; M 1, 3 and 16); the tile counters are zero after
every launch; `choose`'s fill rule; and cross-compilation without spills for every GPU arch."""

import dataclasses

import pytest
import torch
import triton

from kiln.codegen.kernels import gemm
from kiln.codegen.match_gemm import gemm_form
from kiln.codegen.targets import TARGETS, get_target
from kiln.ir import GraphBuilder, T, TensorType
from kiln.ir.interpret import run_body
from tests.codegen.test_gemm_epilogue import random_inputs

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails
IR_DTYPES = {"fp32": "f32", "bf16": "bf16"}
# N 64 and K 200 on h100 at decode sizes: 2 tiles of 16x32, K split in 7 single 32-wide blocks
# (the last one masked: 200 = 6 * 32 + 8); small enough for the interpreter, so far below
# FILL_MIN_WEIGHTS that the kernel tests switch that floor off (`fill_small_gemms`)
N, K = 64, 200


@pytest.fixture
def fill_small_gemms(monkeypatch):
    """`choose` fills the GPU for GEMMs of any size (the floor of FILL_MIN_WEIGHTS lifted)."""
    monkeypatch.setattr(gemm, "FILL_MIN_WEIGHTS", 0)


def body_of(dtype, n, k, form):
    """A fused group as the compiler forms it: "plain", "bias", "silu_mul" (packed gate/up),
    "residual" (add the [M, N] residual), "norm" (linear(rms_norm(x) * w): the norm scales the
    accumulators) or "chained" (h = residual + rms_norm(o) * w1 escapes; silu(gate) * up of
    linear(rms_norm(h) * w2): norm pre-passes and a computed prologue)."""
    b = GraphBuilder("gemm")
    ir = IR_DTYPES[dtype]

    def input(name, *shape):
        return b.input(name, TensorType(shape, ir))

    def silu_mul(y):
        gate, up = (b.op("slice", y, dim=1, start=s, stop=s + n) for s in (0, n))
        return b.op("mul", b.op("silu", gate), up)

    if form == "chained":
        h = b.op("add", input("residual", T, k), b.op("rms_norm", input("o", T, k), input("w1", k), eps=1e-6))
        b.output("out0", silu_mul(b.op("linear", b.op("rms_norm", h, input("w2", k), eps=1e-6), input("w", 2 * n, k))))
        b.output("out1", h)
        return b.build()
    x = input("x", T, k)
    if form == "norm":
        x = b.op("rms_norm", x, input("nw", k), eps=1e-5)
    weight = input("w", 2 * n if form == "silu_mul" else n, k)
    value = b.op("linear", x, weight, *([input("bias", n)] if form == "bias" else []))
    if form == "silu_mul":
        value = silu_mul(value)
    elif form == "residual":
        value = b.op("add", input("residual", T, n), value)
    b.output("out0", value)
    return b.build()


def run(variant, form, tensors, workspace=None, out=None):
    """Launches `variant` on the body's inputs; returns its outputs in body order."""
    operands = [tensors[i] for i in form.operands]
    bias, operands = (operands[0], operands[1:]) if form.bias else (None, operands)
    result = gemm.launch(variant, tensors[form.x], tensors[form.weight], *operands, bias=bias, out=out,
                         workspace=workspace)
    result = result if isinstance(result, tuple) else (result,)
    by_position = dict(zip(form.outputs, result))
    return [by_position[j] for j in range(len(result))]


def split_variant(dtype, m, body, target_name="h100"):
    form = gemm_form(body)
    variant = gemm.choose(get_target(target_name), dtype=dtype, m=m, n=form.n, k=form.k, epilogue=form.epilogue,
                          prologue=form.prologue, bias=form.bias)
    return form, variant


FORMS = ["plain", "bias", "silu_mul", "residual", "norm", "chained"]


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("form_name", FORMS)
def test_split_k_matches_torch_and_the_unsplit_kernel(check_close, fill_small_gemms, form_name, m):
    body = body_of("fp32", N, K, form_name)
    form, variant = split_variant("fp32", m, body)
    assert variant.split_k == 7 and variant.block_k == 32 and variant.k % variant.block_k
    tensors = random_inputs(body, m, seed=m + len(form_name))
    partial = torch.full((gemm.workspace_values(variant, m),), float("nan"))  # every value read is written first
    counters = torch.zeros(gemm.counter_count(variant, m), dtype=torch.int32)
    got = run(variant, form, tensors, workspace=(partial, counters))
    assert counters.tolist() == [0] * gemm.counter_count(variant, m) and counters.numel() > 0
    exact, same_dtype = run_body(body, tensors, torch.float64), run_body(body, tensors)
    unsplit = run(dataclasses.replace(variant, split_k=1), form, tensors)
    assert len(got) == len(exact) == len(unsplit)
    for ours, want, same, whole in zip(got, exact, same_dtype, unsplit):
        check_close(ours, want.reshape(ours.shape), same.reshape(ours.shape))
        torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    # a second launch on the same workspace (the counters it left): the same bits
    again = run(variant, form, tensors, workspace=(partial, counters))
    assert all(torch.equal(a, b) for a, b in zip(got, again)) and not counters.any()


def test_split_k_residual_add_in_place(check_close, fill_small_gemms):
    """o_proj-style: out is the residual operand itself; only the last split reads and writes it."""
    body = body_of("bf16", N, K, "residual")
    form, variant = split_variant("bf16", 5, body)
    assert variant.split_k > 1
    x, weight, residual = random_inputs(body, 5, seed=11)
    exact, same_dtype = run_body(body, [x, weight, residual], torch.float64)[0], run_body(body, [x, weight, residual])[0]
    assert run(variant, form, [x, weight, residual], out=residual)[0] is residual
    check_close(residual, exact, same_dtype)


def test_split_k_rendering(fill_small_gemms):
    form, variant = split_variant("bf16", 1, body_of("bf16", N, K, "bias"))
    source = gemm.render(variant)
    assert variant.cache_key.endswith(f"__sk{variant.split_k}") and f"def {variant.cache_key}(" in source
    assert 'tl.atomic_add(p_counters + i_pid, 1, sem="acq_rel", scope="gpu")' in source
    assert source.index("arrived == SPLIT_K - 1") < source.index("tl.load(p_bias")  # the bias once, at the end
    assert list(gemm.signature(variant))[-3:] == ["M", "p_partial", "p_counters"]
    assert gemm.signature(variant)["p_partial"] == "*fp32:16" and gemm.signature(variant)["p_counters"] == "*i32:16"
    assert gemm.constexprs(variant)["SPLIT_K"] == variant.split_k
    unsplit = dataclasses.replace(variant, split_k=1)
    text = gemm.render(unsplit)
    assert "__sk" not in unsplit.cache_key and "SPLIT_K" not in text and "atomic" not in text and "p_partial" not in text
    assert list(gemm.signature(unsplit))[-1] == "M" and "SPLIT_K" not in gemm.constexprs(unsplit)
    assert gemm.workspace_values(unsplit, 7) == gemm.counter_count(unsplit, 7) == 0
    assert gemm.workspace_values(variant, 7) == variant.split_k * 7 * N
    assert gemm.counter_count(variant, 7) == N // variant.block_n
    assert gemm.grid(variant, 7) == (gemm.counter_count(variant, 7) * variant.split_k,)


@pytest.mark.parametrize("name", [name for name, target in TARGETS.items() if target.is_gpu])
@pytest.mark.parametrize("n, k", [(576, 576), (576, 1536), (960, 576), (4096, 14336), (64, 200), (49152, 576)])
def test_decode_variants_fill_the_gpu_by_the_rule(name, n, k):
    target = get_target(name)
    for m in (1, 16):
        variant = gemm.choose(target, dtype="bf16", m=m, n=n, k=k)
        unfilled = gemm.choose(dataclasses.replace(target, sm_count=None), dtype="bf16", m=m, n=n, k=k)
        tiles = triton.cdiv(m, variant.block_m) * triton.cdiv(n, variant.block_n)
        programs = gemm.grid(variant, m)[0]
        blocks = triton.cdiv(k, variant.block_k)
        if gemm.grid(unfilled, m)[0] >= target.sm_count or n * k <= gemm.FILL_MIN_WEIGHTS:  # full, or tiny: untouched
            assert variant == unfilled
            continue
        assert variant.block_k >= gemm.MIN_FILL_BLOCK and variant.block_n <= unfilled.block_n
        if variant.split_k == 1:  # BLOCK_N halved just enough
            assert programs >= target.sm_count > programs // 2 and variant.block_n >= gemm.MIN_FILL_BLOCK
            continue
        assert variant.block_n == min(unfilled.block_n, gemm.MIN_FILL_BLOCK)
        per_split = triton.cdiv(blocks, variant.split_k)
        assert triton.cdiv(blocks, per_split) == variant.split_k, "an empty split"
        if programs < target.sm_count:  # K too short: single-block splits at the narrowest BLOCK_K
            assert variant.block_k == gemm.MIN_FILL_BLOCK and variant.split_k == blocks
        else:  # the smallest count that fills the GPU with no empty split, at any BLOCK_K down to 32
            widths = [w for w in (unfilled.block_k >> i for i in range(4)) if w >= gemm.MIN_FILL_BLOCK]
            for fewer in range(triton.cdiv(target.sm_count, tiles), variant.split_k):
                for width in widths:
                    width_blocks = triton.cdiv(k, width)
                    assert fewer > width_blocks or triton.cdiv(width_blocks, triton.cdiv(width_blocks, fewer)) < fewer
        assert 2 <= variant.num_stages <= max(2, per_split + 1)


def test_gemms_too_small_to_gain_are_not_filled():
    """A GEMM of at most FILL_MIN_WEIGHTS weights keeps its table tiles: latency-bound either way."""
    for name, target in TARGETS.items():
        if target.is_gpu:
            for n, k in ((64, 200), (512, 128), (256, 512)):
                tiny = gemm.choose(target, dtype="bf16", m=1, n=n, k=k)
                assert tiny == gemm.choose(dataclasses.replace(target, sm_count=None), dtype="bf16", m=1, n=n, k=k)
                assert n * k <= gemm.FILL_MIN_WEIGHTS and gemm.grid(tiny, 1)[0] < target.sm_count, (name, n, k)


def test_small_and_large_buckets_and_the_cpu_never_split():
    for name, target in TARGETS.items():
        for m in (17, 64, 4096) if target.is_gpu else (1, 16, 64):
            assert gemm.choose(target, dtype="bf16", m=m, n=64, k=4096).split_k == 1, (name, m)


def test_split_variants_cross_compile_without_spills(cross_compile):
    """Decode variants at SmolLM2's shapes: o_proj's residual add (bf16), qkv with a bias (fp32),
    and gate_up's chained-norm prologue with its escaping value and silu*mul (bf16 and fp32)."""
    bodies = [(dtype, body_of(dtype, n, k, name)) for dtype, n, k, name in (
        ("bf16", 576, 576, "residual"), ("fp32", 960, 576, "bias"), ("bf16", 1536, 576, "chained"),
        ("fp32", 1536, 576, "chained"))]

    def variants(target):
        chosen = [split_variant(dtype, 1, body, target.name)[1] for dtype, body in bodies]
        assert all(v.split_k > 1 for v in chosen), [v.cache_key for v in chosen]
        return chosen

    cross_compile(gemm, variants)
