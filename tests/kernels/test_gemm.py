"""gemm vs torch: out = epilogue(x @ W^T) for GEMV and GEMM shapes and every epilogue op."""

import pytest
import torch
import torch.nn.functional as F

from kiln.codegen.kernels import TORCH_DTYPES
from kiln.codegen.kernels import gemm

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails

TORCH_EPILOGUE = {
    "bias": lambda acc, bias, residual: acc + bias,
    "silu": lambda acc, bias, residual: F.silu(acc),
    "gelu_tanh": lambda acc, bias, residual: F.gelu(acc, approximate="tanh"),
    "residual": lambda acc, bias, residual: acc + residual,
}


def torch_gemm(epilogue, x, weight, bias, residual):
    """The epilogue applied op by op in x's dtype (silu_mul: the packed gate/up product)."""
    if epilogue[:1] == ("silu_mul",):
        n = weight.shape[0] // 2
        acc, ops = F.silu(x @ weight[:n].T) * (x @ weight[n:].T), epilogue[1:]
    else:
        acc, ops = x @ weight.T, epilogue
    for op in ops:
        acc = TORCH_EPILOGUE[op](acc, bias, residual)
    return acc


def operands(epilogue, m, n, k, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(TORCH_DTYPES[dtype]).to(device)

    weight = random(2 * n if "silu_mul" in epilogue else n, k) / k**0.5
    return random(m, k), weight, random(n), random(m, n)


EPILOGUES = [(), ("bias",), ("silu",), ("gelu_tanh",), ("silu_mul",), ("residual",), ("bias", "gelu_tanh"),
             ("silu_mul", "residual")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", [(1, 70, 50), (17, 64, 128), (40, 70, 50)])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda ops: "-".join(ops) or "plain")
def test_matches_torch(device, target, check_close, dtype, m, n, k, epilogue):
    x, weight, bias, residual = operands(epilogue, m, n, k, dtype, device, seed=m + n + k)
    given = {"bias": bias if "bias" in epilogue else None, "residual": residual if "residual" in epilogue else None}
    variant = gemm.choose(target, dtype=dtype, m=m, n=n, k=k, epilogue=epilogue)
    out = gemm.launch(variant, x, weight, **given)
    exact = torch_gemm(epilogue, x.double(), weight.double(), bias.double(), residual.double())
    check_close(out, exact, torch_gemm(epilogue, x, weight, bias, residual))


def test_residual_add_in_place(device, target, check_close):
    """o_proj-style: the residual stream is both the residual operand and the output."""
    x, weight, _, residual = operands(("residual",), 5, 64, 96, "bf16", device, seed=3)
    expected = torch_gemm(("residual",), x.double(), weight.double(), None, residual.double())
    same_dtype = torch_gemm(("residual",), x, weight, None, residual)
    variant = gemm.choose(target, dtype="bf16", m=5, n=64, k=96, epilogue=("residual",))
    assert gemm.launch(variant, x, weight, residual=residual, out=residual) is residual
    check_close(residual, expected, same_dtype)


def test_rendered_source_contains_the_fused_ops(target):
    variant = gemm.choose(target, dtype="bf16", m=8, n=64, k=64, epilogue=("silu_mul", "residual"))
    source = gemm.render(variant)
    assert "acc_up = tl.dot(b_x, b_w_up, acc_up" in source
    assert "acc = silu(acc) * acc_up" in source
    assert "tl.load(p_residual + o_out" in source
    assert "p_bias" not in source
    assert variant.cache_key == "gemm__bf16__n64__k64__silu_mul__residual__" + variant.cache_key.split("residual__")[1]
    assert f"def {variant.cache_key}(" in source


def test_block_n_shrinks_where_live_tiles_would_spill():
    """The register model `choose` uses; test_cross_compiles_for_every_gpu_arch checks it holds."""
    from kiln.codegen.targets import get_target

    def block_n(target_name, epilogue):
        return gemm.choose(get_target(target_name), dtype="bf16", m=4096, n=1536, k=576, epilogue=epilogue).block_n

    # h100: 128x256 on 8 warps = 128 accumulator values/thread, the whole budget of each phase.
    assert block_n("h100", ()) == block_n("h100", ("bias",)) == 256
    assert block_n("h100", ("silu_mul",)) == block_n("h100", ("residual",)) == 128
    # a100: 128x128 = 64 values/thread; mma.sync's budget (64) has no room for a second
    # accumulator, but the epilogue's (128) has room for the residual tile.
    assert block_n("a100", ()) == block_n("a100", ("residual",)) == 128
    assert block_n("a100", ("silu_mul",)) == 64


@pytest.mark.parametrize(
    "epilogue, message",
    [(("softmax",), "distinct names"), (("bias", "bias"), "distinct"), (("bias", "silu_mul"), "first")],
)
def test_rejects_malformed_epilogues(target, epilogue, message):
    with pytest.raises(ValueError, match=message):
        gemm.choose(target, dtype="bf16", m=1, n=64, k=64, epilogue=epilogue)


def test_operands_must_match_the_epilogue(device, target):
    x, weight, bias, _ = operands((), 2, 64, 64, "fp32", device, seed=4)
    with pytest.raises(ValueError, match="bias"):
        gemm.launch(gemm.choose(target, dtype="fp32", m=2, n=64, k=64), x, weight, bias=bias)


def test_bucket_by_rows():
    assert [gemm.bucket(m) for m in (1, 16, 17, 128, 129)] == ["decode", "decode", "small", "small", "large"]


def test_cross_compiles_for_every_gpu_arch(cross_compile):
    def variants(target):
        return [
            gemm.choose(target, dtype="bf16", m=1, n=576, k=1536, epilogue=("residual",)),
            gemm.choose(target, dtype="bf16", m=64, n=1536, k=576, epilogue=("bias",)),
            gemm.choose(target, dtype="bf16", m=4096, n=1536, k=576),
            gemm.choose(target, dtype="bf16", m=4096, n=1536, k=576, epilogue=("silu_mul",)),
            gemm.choose(target, dtype="bf16", m=4096, n=576, k=1536, epilogue=("bias", "gelu_tanh", "residual")),
        ]

    cross_compile(gemm, variants)
