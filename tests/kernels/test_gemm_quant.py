"""Kernels over quantized weights. gemm with a quantized weight (codegen/kernels/gemm_quant.py):
each kiln.quant format the compiler produces, run under the interpreter, against
QuantizedTensor.dequantize() then a torch matmul (fp64 exact, and in the kernel's dtype with the
weight rounded to it): M 1 and a few rows, a packed (S = 2) gate/up weight, a bias, K tails,
serial split-K; the BLOCK_K rule; fp8 refused where the GPU lacks fp8 conversion. The embedding
rows of a quantized table (embedding_quant): the dequantized table's rows, bit for bit. Both
cross-compile in every format for every GPU arch that reads it, without spills."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kiln.codegen.kernels import embedding_quant, gemm, gemm_quant
from kiln.codegen.match_gemm import gemm_form
from kiln.codegen.targets import fp8_targets, get_target
from kiln.errors import KilnError
from kiln.ir.interpret import run_body
from kiln.quant import QuantFormat, QuantizedTensor, quantize
from tests.kernels.test_gemm import linear_body

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]
# The formats kiln produces (GGUF's Q4_0/Q4_1, Q8_0, Q6_K; --quant int4, int8, fp8); "K": per channel
FORMATS = ["int4-g32-f16", "int4-g128-f16", "int8-g32-f16", "int8-gK-f32", "int8-g16-f32", "fp8e4m3-gK-f32"]
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fmt_for(name: str, k: int) -> QuantFormat:
    return QuantFormat.parse(name.replace("gK", f"g{k}"))


def quantized_inputs(body, fmt: QuantFormat, m: int, seed: int) -> list:
    """Random inputs of a linear body (tests/kernels/test_gemm.py's order: x, weight, [bias],
    [residual]) with the weight quantized to `fmt` (a QuantizedTensor in its place)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for index, node in enumerate(body.inputs):
        shape = [m if not d.is_number else int(d) for d in node.type.shape]
        value = torch.randn(*shape, generator=generator)
        if index == 1:
            tensors.append(quantize(value * shape[-1] ** -0.5, fmt))
        else:
            tensors.append(value.to(node.type.torch_dtype))
    return tensors


def dense(tensors: list, dtype: torch.dtype) -> list:
    """The inputs with the weight dequantized (fp32 s * q + z, rounded to `dtype`)."""
    return [t.dequantize(dtype) if isinstance(t, QuantizedTensor) else t for t in tensors]


def run(variant, form, tensors):
    operands = [tensors[i] for i in form.operands]
    bias, operands = (operands[0], operands[1:]) if form.bias else (None, operands)
    return gemm.launch(variant, tensors[form.x], tensors[form.weight], *operands, bias=bias)


def check_against_dequantized(check_close, body, variant, form, tensors, dtype):
    """The kernel vs the body on the dequantized weight: fp64 exact, and torch in `dtype`."""
    out = run(variant, form, tensors)
    exact = run_body(body, [t.double() for t in dense(tensors, torch.float32)], torch.float64)[0]
    same_dtype = run_body(body, dense(tensors, TORCH[dtype]))[0]
    check_close(out, exact, same_dtype)
    return out


CASES = [(1, ("bias",), "bf16"), (5, ("silu_mul",), "bf16"), (3, (), "fp32")]


@pytest.mark.parametrize("m, epilogue, dtype", CASES, ids=lambda c: "-".join(c) if isinstance(c, tuple) else str(c))
@pytest.mark.parametrize("name", FORMATS)
def test_matches_dequantize_then_matmul(target, check_close, name, m, epilogue, dtype):
    """N 40 (a masked edge of the cpu tiles' BLOCK_N 32), K 256 (several K blocks and groups)."""
    n, k = 40, 256
    fmt = fmt_for(name, k)
    body = linear_body(dtype, n, k, epilogue)
    form = gemm_form(body)
    variant = gemm.choose(target, dtype=dtype, m=m, n=n, k=k, epilogue=form.epilogue, bias=form.bias, quant=fmt)
    tensors = quantized_inputs(body, fmt, m, seed=m + k + len(name))
    check_against_dequantized(check_close, body, variant, form, tensors, dtype)


@pytest.mark.parametrize("name, k, block_k", [
    ("int8-g16-f32", 80, 32),  # two groups a K block; the last block holds one group
    ("int4-g16-f32", 80, 64),  # four groups a block (nibbles across the group edges), tail of one group
    ("int4-g64-f16", 192, 32),  # half a group a block: low nibbles, then high ones
    ("fp8e4m3-gK-f32", 200, 32),  # per channel, K not a multiple of BLOCK_K
])
def test_k_blocks_against_groups_and_tails(check_close, name, k, block_k):
    fmt = fmt_for(name, k)
    body = linear_body("bf16", 40, k, ())
    form = gemm_form(body)
    variant = gemm.choose(get_target("cpu"), dtype="bf16", m=3, n=40, k=k, quant=fmt)
    variant = gemm.Variant(**{**variant.__dict__, "block_k": block_k})
    check_against_dequantized(check_close, body, variant, form, quantized_inputs(body, fmt, 3, seed=k), "bf16")


@pytest.fixture
def fill_small_gemms(monkeypatch):
    """`choose` fills the GPU for GEMMs of any size (see test_gemm_split_k.py)."""
    monkeypatch.setattr(gemm, "FILL_MIN_WEIGHTS", 0)


@pytest.mark.parametrize("name, epilogue", [("int4-g32-f16", ("silu_mul",)), ("int4-g128-f16", ("bias",)),
                                            ("int8-gK-f32", ())])
def test_split_k_with_a_quantized_weight(check_close, fill_small_gemms, name, epilogue):
    """h100's decode tiles split K = 256 (N = 64: too few output tiles for its SMs); the split
    variant matches the reference and the same tiles unsplit."""
    n, k, m = 64, 256, 2
    fmt = fmt_for(name, k)
    body = linear_body("bf16", n, k, epilogue)
    form = gemm_form(body)
    variant = gemm.choose(get_target("h100"), dtype="bf16", m=m, n=n, k=k, epilogue=form.epilogue, bias=form.bias,
                          quant=fmt)
    assert variant.split_k > 1 and gemm_quant.block_k_fits(fmt, k, variant.block_k)
    tensors = quantized_inputs(body, fmt, m, seed=len(name))
    out = check_against_dequantized(check_close, body, variant, form, tensors, "bf16")
    unsplit = run(gemm.Variant(**{**variant.__dict__, "split_k": 1}), form, tensors)
    torch.testing.assert_close(out, unsplit, rtol=1e-2, atol=1e-2 * unsplit.abs().max().item())


def test_block_k_fits_the_groups():
    fit = gemm_quant.fit_block_k
    assert fit(QuantFormat("int4", 32, "f16"), 4096, 128) == 128  # four groups a block
    assert fit(QuantFormat("int4", 128, "f16"), 4096, 64) == 64  # half a group
    assert fit(QuantFormat("int8", 576, "f32"), 576, 128) == 128  # per channel: any block
    assert fit(QuantFormat("int8", 48, "f32"), 4800, 128) == 16  # 48 = 3 * 16
    with pytest.raises(ValueError, match="groups of 24"):
        fit(QuantFormat("int8", 24, "f32"), 4800, 128)
    with pytest.raises(ValueError, match="neither"):
        gemm.Variant(**{**gemm.choose(get_target("cpu"), dtype="bf16", m=1, n=64, k=96,
                                      quant=QuantFormat("int8", 48, "f32")).__dict__, "block_k": 32})


def test_rendering_names_the_format():
    fmt = QuantFormat("int4", 32, "f16")
    form = gemm_form(linear_body("bf16", 64, 256, ("silu_mul",)))
    variant = gemm.choose(get_target("h100"), dtype="bf16", m=4096, n=64, k=256, epilogue=form.epilogue, quant=fmt)
    source = gemm.render(variant)
    assert variant.cache_key.startswith("gemm__bf16__qint4_g32_f16__n64__k256__x2")
    assert gemm.constexprs(variant)["GROUP"] == 32
    signature = gemm.signature(variant)
    assert list(signature)[:3] == ["p_x", "p_w", "p_wscales"]
    assert (signature["p_w"], signature["p_wscales"]) == ("*u8:16", "*fp16:16")
    assert "p_w_tile" not in source and "acc1 = tl.dot(b_x, b_w, acc1" in source and "o_shift" in source
    dense_variant = gemm.choose(get_target("h100"), dtype="bf16", m=4096, n=64, k=256, epilogue=form.epilogue)
    assert "GROUP" not in gemm.constexprs(dense_variant) and "p_wscales" not in gemm.render(dense_variant)


def test_fp8_is_refused_where_the_gpu_lacks_fp8_conversion():
    fmt = QuantFormat("fp8e4m3", 256, "f32")
    assert fp8_targets() == ["l40s", "h100", "h200", "b200", "rtx5090"]
    for name in ("a100", "mi300x"):
        with pytest.raises(KilnError, match=f"target {name} .* targets that have it: l40s, h100, h200, b200, rtx5090"):
            gemm.choose(get_target(name), dtype="bf16", m=1, n=64, k=256, quant=fmt)
    gemm.choose(get_target("h100"), dtype="bf16", m=1, n=64, k=256, quant=fmt)


def test_launch_checks_the_weight(target):
    fmt = QuantFormat("int8", 32, "f16")
    variant = gemm.choose(target, dtype="fp32", m=2, n=64, k=64, quant=fmt)
    x = torch.ones(2, 64)
    with pytest.raises(ValueError, match="int8-g32-f16 QuantizedTensor"):
        gemm.launch(variant, x, quantize(torch.ones(64, 64), QuantFormat("int8", 16, "f16")))
    with pytest.raises(ValueError, match="int8-g32-f16 QuantizedTensor"):
        gemm.launch(variant, x, torch.ones(64, 64))


@pytest.mark.parametrize("name", ["int4-g32-f16", "int8-g16-f32", "fp8e4m3-gK-f32", "int4-g128-f16"])
@pytest.mark.parametrize("dtype, ids", [("bf16", torch.int32), ("fp32", torch.int64)])
def test_embedding_rows_are_the_dequantized_rows(target, name, dtype, ids):
    """D 384: a masked column block on the cpu target (BLOCK_D 512); repeated and edge ids."""
    fmt = fmt_for(name, 384)
    table = quantize(torch.randn(50, 384, generator=torch.Generator().manual_seed(len(name))), fmt)
    index = torch.tensor([3, 0, 49, 3, 17], dtype=ids)
    variant = embedding_quant.choose(target, dtype=dtype, quant=fmt, d=384, ids=str(ids).replace("torch.int", "i"))
    assert torch.equal(embedding_quant.launch(variant, table, index), table.dequantize(TORCH[dtype])[index])


def cross_compile_quantized(variants_of):
    """Compiles `variants_of(target, fmt)` ((kind module, variant) pairs) for every GPU arch
    (tests/kernels/conftest.py's set) and every format it reads, in two compile workers;
    asserts what `cross_compile` does."""
    from kiln.codegen.kernels import compile_variants
    from tests.kernels.conftest import check_cross_compiled, cross_compile_targets

    requests = [(kind, variant, target) for target in cross_compile_targets() for name in FORMATS
                if target.fp8 or not name.startswith("fp8") for kind, variant in variants_of(target, name)]
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(compile_variants, [requests[0::2], requests[1::2]]))
    kernels = [None] * len(requests)
    kernels[0::2], kernels[1::2] = halves
    check_cross_compiled(requests, kernels)
    return requests


def test_every_format_cross_compiles_for_every_gpu_arch_that_reads_it():
    """N = K = 4096, bf16: per format one bucket and epilogue, so that together they cover the
    decode (split-K), small and large tiles, a packed gate/up weight, a bias and a residual; and
    the embedding rows of a [., 4096] table."""
    shapes = {"int4-g32-f16": (1, ("silu_mul",)), "int4-g128-f16": (4096, ("bias",)), "int8-g32-f16": (64, ()),
              "int8-gK-f32": (1, ("residual",)), "int8-g16-f32": (4096, ("silu_mul",)), "fp8e4m3-gK-f32": (64, ())}

    def variants(target, name):
        m, epilogue = shapes[name]
        form = gemm_form(linear_body("bf16", 4096, 4096, epilogue))
        fmt = fmt_for(name, 4096)
        return [(gemm, gemm.choose(target, dtype="bf16", m=m, n=4096, k=4096, epilogue=form.epilogue, bias=form.bias,
                                   quant=fmt)),
                (embedding_quant, embedding_quant.choose(target, dtype="bf16", quant=fmt, d=4096))]

    requests = cross_compile_quantized(variants)
    assert {name for _, v, _ in requests for name in FORMATS if gemm_quant.key(fmt_for(name, 4096)) in v.cache_key} \
        == set(FORMATS)
    assert not any(v.quant.kind == "fp8e4m3" and t.name in ("a100", "mi300x") for _, v, t in requests)
    assert len(requests) == 2 * (6 * 6 - 2)  # 6 archs, 6 formats less fp8 on a100 and mi300x; gemm and embedding
