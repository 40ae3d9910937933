"""The cpu target's quantized-linear C kernels (codegen/cpu_kernels.py, runtime/cpu_quant.py)
against dequantize-then-matmul; with int16 or int8 activations, against the dequantized weight
times the activations kiln.quant.quantize_activations says the kernels multiply.

Tolerance ("fp32 rounding"): the kernel accumulates K fp32 products in its own order and rounds
s * q + z once (an FMA) where the reference rounds twice (from 9 rows of x on it dequantizes exactly,
then multiplies in fp32), so against the exact product of the exactly dequantized weight (fp64) its
error may be up to gamma = (K + 2) * 2^-24 times
sum_k (|s q_k| + |z|) |x_k| per output (the standard forward bound for a length-K fp32 dot product,
plus the dequantization's rounding). A wrong code, scale or element is off by far more: ~1/K of the
output's magnitude. torch's own fp32 dequantize-then-matmul meets the same bound.
"""

from __future__ import annotations

import ctypes
import platform
import shutil

import pytest
import torch

from kiln.codegen import cpu_kernels
from kiln.codegen.cpu_kernels import build_quant_library, isa_variants, render_quant_source
from kiln.errors import KilnError
from kiln.quant import ACTIVATION_BLOCK, QuantFormat, QuantizedTensor, quantize, quantize_activations
from kiln.runtime import cpu_quant

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# (format, K): every kind, f16 and f32 scales, groups 16 / 32 / 128 / K; K = 90 and the int4 group
# of 90 (45 codes per half) leave elements past the last whole vector
CASES = [
    (QuantFormat("int4", 16, "f16"), 64), (QuantFormat("int4", 32, "f16"), 96), (QuantFormat("int4", 32, "f32"), 64),
    (QuantFormat("int4", 128, "f16"), 256), (QuantFormat("int4", 90, "f32"), 90),
    (QuantFormat("int8", 16, "f32"), 48), (QuantFormat("int8", 32, "f16"), 64), (QuantFormat("int8", 90, "f32"), 90),
    (QuantFormat("fp8e4m3", 32, "f16"), 64), (QuantFormat("fp8e4m3", 128, "f32"), 256),
    (QuantFormat("fp8e4m3", 90, "f32"), 90), (QuantFormat("int8", 16, "f32"), 96), (QuantFormat("int4", 64, "f16"), 192),
]
N = 37  # a multiple of no register tile
# M: one row, tiles of 2 + 1, one whole tile, the dequantize-into-blocks path (17, 70), torch GEMM on
# dequantized blocks (130)
ROWS = (1, 3, 8, 17, 70, 130)


# x86-64-v2 (SSE4.1, 4 lanes, no F16C) is checked on a few formats: f16 scales, each kind, tails
V2_CASES = [CASES[1], CASES[4], CASES[7], CASES[8]]


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> dict[str, cpu_quant.QuantLibrary]:
    """{variant: library}: the best variant this CPU runs with every CASES format, and on x86 also
    x86-64-v2 with V2_CASES; built once per session."""
    best = next(v for v in cpu_quant.preferred_variants() if v in isa_variants())
    builds = {best: [fmt for fmt, _ in CASES]}
    if "x86-64-v2" in isa_variants() and best != "x86-64-v2":
        builds["x86-64-v2"] = [fmt for fmt, _ in V2_CASES]
    out = tmp_path_factory.mktemp("quant_kernels")
    libraries = {}
    for variant, formats in builds.items():
        name = build_quant_library(formats, out / variant, variants=[variant])[variant]
        libraries[variant] = cpu_quant.QuantLibrary(variant, out / variant / name, ctypes.CDLL(str(out / variant / name)))
    return libraries


@pytest.fixture
def library(libraries) -> cpu_quant.QuantLibrary:
    """The best variant this CPU runs."""
    return next(iter(libraries.values()))


def _weight(fmt: QuantFormat, k: int, rows: int = N) -> QuantizedTensor:
    torch.manual_seed(k + rows)
    return quantize(torch.randn(rows, k) * 0.2, fmt)


def _check(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> None:
    """y against x @ W.T (+ bias) in fp64 from the exactly dequantized W, within the module's bound."""
    rows, cols = qt.shape
    g = qt.format.group
    s, z = qt.scales.double().unbind(-1)
    q = qt.codes().double().view(rows, cols // g, g)
    w = (q * s[..., None] + z[..., None]).view(rows, cols)
    magnitude = ((q * s[..., None]).abs() + z.abs()[..., None]).view(rows, cols)
    x64 = x.double()
    exact = x64 @ w.T + (0 if bias is None else bias.double())
    bound = (cols + 2) * 2.0**-24 * (x64.abs() @ magnitude.T) + (0 if bias is None else 2.0**-24 * bias.double().abs())
    reference = x @ qt.dequantize().T + (0 if bias is None else bias)  # torch fp32 meets the bound too
    assert ((reference.double() - exact).abs() <= bound).all()
    error = (y.double() - exact).abs()
    assert (error <= bound).all(), f"max error {error.max():.3g}, bound there {bound.flatten()[error.argmax()]:.3g}"


def _quantized_path(fmt: QuantFormat, k: int, m: int) -> bool:
    """Whether the kernels multiply quantized activations here (AVX2, codes of int4 in groups of 32
    or multiples of 64 or int8 in groups of 16 or multiples of 32, K a multiple of 32, one row of x)."""
    grouped = (fmt.kind == "int4" and (fmt.group == 32 or fmt.group % 64 == 0)) or (
        fmt.kind == "int8" and (fmt.group == 16 or fmt.group % 32 == 0))
    avx2 = cpu_quant.preferred_variants()[0] in ("x86-64-v3", "x86-64-v4")
    return grouped and avx2 and k % ACTIVATION_BLOCK == 0 and m == 1


@pytest.mark.parametrize("bits", (16, 8))
@pytest.mark.parametrize("fmt,k", CASES, ids=[f"{f.name}-K{k}" for f, k in CASES])
def test_quantized_activations_match_the_dequantized_product(library, fmt, k, bits):
    """Where the int16 / int8 path applies, y equals W times quantize_activations(x, bits)'s values
    within fp32 rounding (so the codes, scales and offsets of x are the reference's); elsewhere it
    is the fp32 path. Either way each output is computed by one thread in a fixed order: thread
    counts agree."""
    qt = _weight(fmt, k)
    w = cpu_quant.bind(library, qt, activation_bits=bits)
    threads = torch.get_num_threads()
    for m in (1, 3, 8, 17):
        x = torch.randn(m, k) * 4
        y = cpu_quant.linear(x, w)
        if _quantized_path(fmt, k, m):
            q, d = quantize_activations(x, bits)
            seen = (q.float().view(m, k // ACTIVATION_BLOCK, ACTIVATION_BLOCK) * d[..., None]).view(m, k)
            _check(y, seen, qt, None)
            assert (y - x @ qt.dequantize().T).abs().max() > 0  # not the fp32 path
        else:
            _check(y, x, qt, None)
        try:
            torch.set_num_threads(1)
            assert torch.equal(cpu_quant.linear(x, w), y)
        finally:
            torch.set_num_threads(threads)


def test_quantize_activations_reference():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.54, 0.5] + [0.01] * 29])
    q, d = quantize_activations(x)
    assert q[0, :32].eq(0).all() and d[0, 0] == 0  # an all-zero block
    assert d[0, 1] == torch.tensor(2.54) / 127 and q[0, 32:35].tolist() == [50, -127, 25]
    q16, d16 = quantize_activations(x, 16)
    assert q16.dtype == torch.int16 and d16[0, 1] == torch.tensor(2.54) / 32767
    assert q16[0, 32:35].tolist() == [12900, -32767, 6450] and q16[0, 35] == 129
    with pytest.raises(KilnError, match="blocks of 32"):
        quantize_activations(torch.randn(2, 48))
    with pytest.raises(KilnError, match="8 or 16 bits"):
        quantize_activations(torch.randn(2, 32), 4)


def test_int16_activations_stay_within_half_a_step_of_fp32():
    """What the int16 path trades: each activation moves by about half its block's step d =
    max|x| / 32767 at most (the fp32 product x * (32767 / max|x|) may land q one past a tie), so a
    linear's output by about sum |w| d / 2 from the exact product at most; measured here on
    Gaussian activations with outliers, the error relative to the output's norm stays under 1e-4
    (int8's is ~6e-3)."""
    torch.manual_seed(3)
    x = torch.randn(4, 1536)
    x[:, ::97] *= 40  # a few outlier channels, as in a real model's down_proj input
    q, d = quantize_activations(x, 16)
    seen = (q.float().view(4, -1, ACTIVATION_BLOCK) * d[..., None]).view(4, -1)
    step = d.repeat_interleave(ACTIVATION_BLOCK, dim=1)
    assert ((seen - x).abs() <= step * (0.5 + 2.0**-8)).all()  # x * (top / amax) rounds in fp32
    w = torch.randn(256, 1536)
    exact = x.double() @ w.double().T
    assert ((seen.double() @ w.double().T - exact).norm() / exact.norm()) < 1e-4


def _check_linear(library: cpu_quant.QuantLibrary, fmt: QuantFormat, k: int) -> None:
    qt = _weight(fmt, k)
    w = cpu_quant.bind(library, qt)
    bias = torch.randn(N)
    for m in ROWS:
        x = torch.randn(m, k)
        for b in (None, bias):
            y = cpu_quant.linear(x, w, b)
            assert y.shape == (m, N) and y.dtype == torch.float32
            _check(y, x, qt, b)


@pytest.mark.parametrize("fmt,k", CASES, ids=[f"{f.name}-K{k}" for f, k in CASES])
def test_linear_matches_dequantized_matmul(library, fmt, k):
    _check_linear(library, fmt, k)


@pytest.mark.parametrize("fmt,k", V2_CASES, ids=[f"{f.name}-K{k}" for f, k in V2_CASES])
def test_x86_64_v2_variant(libraries, fmt, k):
    if "x86-64-v2" not in libraries:
        pytest.skip("x86-64-v2 is this CPU's best variant (tested above) or not an x86 CPU")
    _check_linear(libraries["x86-64-v2"], fmt, k)


def test_linear_bf16_and_batched_inputs(library):
    """bf16 x runs in fp32 and comes back in bf16 (one more rounding, 2^-8 relative); x [B, T, K]
    keeps its leading dims."""
    fmt, k = CASES[1]
    qt = _weight(fmt, k)
    w = cpu_quant.bind(library, qt)
    x = torch.randn(2, 5, k).bfloat16()
    y = cpu_quant.linear(x, w)
    assert y.shape == (2, 5, N) and y.dtype == torch.bfloat16
    y32 = cpu_quant.linear(x.float().view(10, k), w)
    _check(y32, x.float().view(10, k), qt, None)
    assert torch.equal(y.view(10, N), y32.bfloat16())


def test_large_m_runs_on_dequantized_blocks(library, monkeypatch):
    """From TORCH_GEMM_ROWS rows on, blocks of dequantized rows (here 8 at a time) go through torch's
    GEMM; each block's bias slice is added."""
    fmt, k = CASES[2]
    qt = _weight(fmt, k)
    monkeypatch.setattr(cpu_quant, "DEQUANT_BLOCK_BYTES", 8 * 4 * k)
    x, bias = torch.randn(cpu_quant.TORCH_GEMM_ROWS, k), torch.randn(N)
    _check(cpu_quant.linear(x, cpu_quant.bind(library, qt), bias), x, qt, bias)


def test_threads_do_not_change_results(library):
    """Each output is computed by one thread whatever the count, so results are bit-equal."""
    fmt, k = CASES[3]
    w = cpu_quant.bind(library, _weight(fmt, k, rows=300))
    threads = torch.get_num_threads()
    try:
        for m in (1, 70):
            x = torch.randn(m, k)
            torch.set_num_threads(1)
            one = cpu_quant.linear(x, w)
            torch.set_num_threads(2)
            assert torch.equal(one, cpu_quant.linear(x, w))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt,k", V2_CASES, ids=[f"{f.name}-K{k}" for f, k in V2_CASES])
def test_embedding_rows_equal_dequantized_rows(libraries, fmt, k):
    """Bit-equal rows, also of a table of tiny weights (f16 scales below 2^-14 are subnormal)."""
    qt = _weight(fmt, k)
    tiny = quantize(torch.randn(N, k) * 1e-5, fmt)
    ids = torch.tensor([0, 36, 5, 5, 17])
    for library in libraries.values():
        w = cpu_quant.bind(library, qt)
        assert torch.equal(cpu_quant.embedding(ids, w), qt.dequantize()[ids])
        assert torch.equal(cpu_quant.embedding(ids, cpu_quant.bind(library, tiny)), tiny.dequantize()[ids])
        assert torch.equal(cpu_quant.embedding(ids[:1], w, torch.bfloat16), qt.dequantize()[ids[:1]].bfloat16())
        with pytest.raises(KilnError, match="outside the table's 37 rows"):
            cpu_quant.embedding(torch.tensor([3, 37]), w)


def test_one_libgomp_shared_with_torch(library):
    """The kernels' OpenMP resolves to the libgomp torch loaded (one thread pool, not two)."""
    maps = open("/proc/self/maps").read()
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(paths) == 1, paths


def test_source_compiles_each_format_once_with_its_constants():
    fmts = [QuantFormat("int4", 32, "f16"), QuantFormat("int8", 128, "f32"), QuantFormat("int4", 32, "f16")]
    source = render_quant_source(fmts)
    assert source.count("void kiln_quant_linear_int4_g32_f16(") == 1
    assert "#define int8_g128_f32_G 128" in source and "#define int4_g32_f16_G 32" in source
    assert "f16_to_f32_n((const uint16_t *)sc" in source  # f16 scales converted, f32 ones read as they are


def test_builds_are_cached(tmp_path, library):
    """A second build of the same source copies the cached library: gcc does not run again."""
    cached = {p: p.stat().st_mtime_ns for p in cpu_kernels.cpu_kernel_cache_dir().glob("quant.*.so")}
    files = build_quant_library([fmt for fmt, _ in CASES], tmp_path, variants=[library.variant])
    assert (tmp_path / files[library.variant]).is_file()
    assert {p: p.stat().st_mtime_ns for p in cpu_kernels.cpu_kernel_cache_dir().glob("quant.*.so")} == cached


def test_missing_gcc_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with pytest.raises(KilnError, match="install gcc/g\\+\\+"):
        build_quant_library([QuantFormat("int8", 32, "f16")], tmp_path)


def test_variant_choice():
    assert cpu_quant.preferred_variants("AVX512")[:2] == ("x86-64-v4", "x86-64-v3")
    assert cpu_quant.preferred_variants("AVX2")[0] == "x86-64-v3"
    assert cpu_quant.preferred_variants("DEFAULT")[0] == "x86-64-v2"
    with pytest.raises(KilnError, match="runs on this CPU"):
        cpu_quant.load_quant_library("/nonexistent", {"riscv-v": "quant.riscv.so"})
    if platform.machine() == "x86_64":
        assert set(isa_variants()) == {"x86-64-v2", "x86-64-v3", "x86-64-v4"}
