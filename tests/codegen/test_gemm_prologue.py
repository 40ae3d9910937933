"""The GEMM's prologue ops (gather_rows, rms_norm, norm_weight) vs torch, alone and with the
epilogues the lowered graphs pair them with; and their cross-compilation without spills."""

import pytest
import torch
import torch.nn.functional as F

from kiln.codegen.kernels import TORCH_DTYPES, gemm

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # silu tails
EPS = 1e-5


def torch_gemm(prologue, epilogue, x, weight, rows, norm_weight, residual):
    """The graph's ops one by one in x's dtype: gather, RMSNorm (fp32 math as the IR's
    reference), weight scale, matmul, epilogue."""
    if "gather_rows" in prologue:
        x = x[rows.long()]
    if "rms_norm" in prologue:
        h = x.float()
        x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    if "norm_weight" in prologue:
        x = x * norm_weight
    if epilogue[:1] == ("silu_mul",):
        n = weight.shape[0] // 2
        acc = F.silu(x @ weight[:n].T) * (x @ weight[n:].T)
    else:
        acc = x @ weight.T
    return acc + residual if "residual" in epilogue else acc


CASES = [  # (prologue, epilogue): the lowered Llama graphs' forms, and the ops alone
    (("rms_norm",), ()),
    (("rms_norm",), ("silu_mul",)),
    (("gather_rows",), ("residual",)),
    (("gather_rows", "rms_norm", "norm_weight"), ()),
]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", [(1, 70, 50), (19, 64, 72)])
@pytest.mark.parametrize("prologue, epilogue", CASES, ids=lambda ops: "-".join(ops) or "none")
def test_matches_torch(device, target, check_close, dtype, m, n, k, prologue, epilogue):
    generator = torch.Generator().manual_seed(m * n + k)

    def random(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(TORCH_DTYPES[dtype]).to(device)

    source_rows = m + 5 if "gather_rows" in prologue else m  # a gather reads some of more rows
    x = random(source_rows, k, scale=3.0)  # not unit scale: the norm must matter
    weight = random(2 * n if "silu_mul" in epilogue else n, k, scale=k**-0.5)
    rows = torch.randperm(source_rows, generator=generator)[:m].to(torch.int32).to(device)
    norm_weight, residual = random(k), random(m, n)
    operands = {
        "rows": rows if "gather_rows" in prologue else None,
        "norm_weight": norm_weight if "norm_weight" in prologue else None,
        "eps": EPS if "rms_norm" in prologue else None,
        "residual": residual if "residual" in epilogue else None,
    }
    variant = gemm.choose(target, dtype=dtype, m=m, n=n, k=k, epilogue=epilogue, prologue=prologue)
    out = gemm.launch(variant, x, weight, **operands)
    exact = torch_gemm(prologue, epilogue, x.double(), weight.double(), rows, norm_weight.double(), residual.double())
    check_close(out, exact, torch_gemm(prologue, epilogue, x, weight, rows, norm_weight, residual))


def test_rendered_source_holds_the_prologue(target):
    variant = gemm.choose(target, dtype="bf16", m=4, n=64, k=64, prologue=("gather_rows", "rms_norm", "norm_weight"))
    source = gemm.render(variant)
    assert "o_x_rows = tl.load(p_rows + o_m % M)" in source
    statistics, main_loop = source.split("for i_k in range")[1:]
    assert "b_sum_sq += tl.sum(b_x * b_x, 1)" in statistics
    assert "b_norm_weight[None, :]" in main_loop and "tl.dot(b_x, b_w, acc" in main_loop
    assert "acc *= b_rstd" in main_loop
    assert "__gather_rows__rms_norm__norm_weight__" in variant.cache_key
    assert list(gemm.signature(variant)) == ["p_x", "p_w", "p_rows", "p_norm_weight", "p_out", "M", "eps"]


@pytest.mark.parametrize("prologue, message", [
    (("rms_norm", "gather_rows"), "in that order"), (("norm_weight",), "needs rms_norm"), (("softmax",), "distinct"),
])
def test_rejects_malformed_prologues(target, prologue, message):
    with pytest.raises(ValueError, match=message):
        gemm.choose(target, dtype="bf16", m=1, n=64, k=64, prologue=prologue)


def test_operands_must_match_the_prologue(device, target):
    x, weight = torch.ones(2, 64, device=device), torch.ones(64, 64, device=device)
    with pytest.raises(ValueError, match="eps"):
        gemm.launch(gemm.choose(target, dtype="fp32", m=2, n=64, k=64, prologue=("rms_norm",)), x, weight)


def test_smollm2_prologue_gemms_cross_compile_without_spills():
    """SmolLM2's qkv / gate_up / lm_head GEMMs (the prologue forms) for sm_80 .. sm_100a, every
    row bucket."""
    from kiln.codegen.aot import cubin_arch
    from kiln.codegen.kernels import compile_variants
    from kiln.codegen.targets import get_target

    requests = []
    for target in map(get_target, ("a100", "l40s", "h100", "b200")):
        for m in (1, 4096):
            requests += [
                (gemm, gemm.choose(target, dtype="bf16", m=m, n=1536, k=576, prologue=("rms_norm",),
                                   epilogue=("silu_mul",)), target),
                (gemm, gemm.choose(target, dtype="bf16", m=m, n=49152, k=576,
                                   prologue=("gather_rows", "rms_norm", "norm_weight")), target),
            ]
    for (_, variant, target), kernel in zip(requests, compile_variants(requests)):
        assert cubin_arch(kernel.cubin) == target.arch_name
        assert not kernel.resources.spills, (variant.cache_key, target.name, kernel.resources)
