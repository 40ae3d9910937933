"""Fusion asks the target: groups that only a target's templates can render form when the
compile's kernel check says yes, and forms that used to crash GPU code generation compile."""

import torch
from torch import nn

from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.kernel_check import kernel_check
from kiln.codegen.render import load_kernel_module
from kiln.codegen.targets import get_target
from kiln.frontend import Attention, Embedding, LastTokens, Linear, RMSNorm, Rope, trace
from kiln.frontend.weights import random_weights
from kiln.ir import AttentionKind, AttentionSpec, GraphBuilder, RopeSpec, T, TensorType, interpret
from kiln.ir.step import PagedSequences, zero_states
from kiln.passes import PassContext, materialize_weights, run_pipeline
from kiln.passes.fuse import fuse
from kiln.passes.pipeline import PipelineOptions
from kiln.runtime.launcher import Launcher

X = TensorType((T, 64), "f32")


def test_post_norm_residual_and_next_pre_norm_become_one_gpu_kernel():
    """o -> rms_norm -> + residual -> rms_norm: refused without a target ("needed by two
    reductions", a rule of the old fixed kernels); the row kernel renders the whole chain."""
    b = GraphBuilder()
    o, residual = b.input("o", X), b.input("r", X)
    h = b.op("add", residual, b.op("rms_norm", o, b.param("w_post", TensorType((64,), "f32")), eps=1e-6))
    b.output("h", h)
    b.output("x", b.op("rms_norm", h, b.param("w_pre", TensorType((64,), "f32")), eps=1e-6))
    graph = b.build()
    ctx = PassContext(kernel_check=kernel_check(get_target("h100")))
    fused = fuse(graph, ctx)
    kernels = [n for n in fused.nodes if n.op == "fused"]
    assert len(kernels) == 1 and str(kernels[0].attrs["pattern"]) == "rms_norm > add, rms_norm"
    assert not any(line.startswith("kept apart") for line in ctx.notes)


class _ScaledKey(nn.Module):
    """A spec that scales its rotated key (crashed GPU codegen with KeyError 'spec')."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.o = Embedding(64, 32), Linear(32, 64), Linear(32, 32)
        self.norm, self.last, self.head = RMSNorm(32, 1e-6), LastTokens(), Linear(32, 64)
        self.rope = Rope(RopeSpec(16, 10000.0))
        self.attn = Attention(AttentionSpec(AttentionKind.DENSE, 2, 2, 16))

    def forward(self, input_ids, positions):
        h = self.embed(input_ids)
        q, k = self.qkv(h).split([32, 32], dim=-1)
        q, k = self.rope(q.view(-1, 2, 16), positions), self.rope(k.view(-1, 2, 16), positions) * 1.5
        h = h + self.o(self.attn(q, k, k).flatten(1))
        return self.head(self.last(self.norm(h)))


def test_a_scaled_rotated_key_compiles_for_a_gpu_and_matches_the_reference(tmp_path):
    spec = _ScaledKey()
    graph = trace(spec)
    phases, _ = run_pipeline(graph, PipelineOptions(kernel_check=kernel_check(get_target("h100")), verify=True))
    build_gpu_program(phases, get_target("h100"))  # the crash was here
    program = build_gpu_program(phases, get_target("cpu"))  # small tiles for the interpreter
    program.write(tmp_path)
    module = load_kernel_module((tmp_path / "program.mixed.py").read_text(), "test_kernel_check_scaled_key")
    weights = materialize_weights(phases["mixed"], random_weights(spec))
    inputs = PagedSequences(8, 16).step([("a", [1, 5, 9, 2, 7]), ("b", [3, 4])])
    ours, theirs = zero_states(phases["mixed"], 8), zero_states(phases["mixed"], 8)
    got = module.step(inputs, weights, ours, Launcher(tmp_path, program.kernel_table(), "cpu"))["logits"]
    want = interpret(phases["mixed"], inputs, weights, theirs)["logits"]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def _offset_gather(quant: str | None):
    """A vocab-parallel rank's lookup (ids minus the rank's offset, clamped) of a table, scaled;
    quantized when `quant`."""
    b = GraphBuilder()
    table = b.param("table", TensorType((64, 32), "f32"), **({"quant": quant} if quant else {}))
    ids, start = b.input("ids", TensorType((T,), "i32")), b.param("table.vocab_start", TensorType((), "i32"))
    local = b.op("clamp", b.op("sub", ids, start), min=0, max=63)
    rows = b.op("mul", b.op("embedding", table, local), b.op("const", value=2.0, dtype="f32"))
    b.output("h", rows)
    return b.build()


def test_a_quantized_gather_by_ids_computed_in_the_kernel_is_the_gpu_targets_refusal():
    """The GPU's quantized gather (embedding_quant) reads its ids from memory: a GPU target keeps
    the offset ids out of the gather's kernel and says why; a dense table's gather fuses with them."""
    found = {}
    for quant in ("int8-g32-f16", None):
        ctx = PassContext(kernel_check=kernel_check(get_target("h100")))
        fused = fuse(_offset_gather(quant), ctx)
        found[quant] = [str(n.attrs["pattern"]) for n in fused.nodes if n.op == "fused"], ctx.notes
    (quantized, why), (dense, _) = found["int8-g32-f16"], found[None]
    assert quantized == ["sub, clamp", "embedding > mul"] and dense == ["sub, clamp > embedding > mul"]
    assert any(line.startswith("kept apart") and line.endswith("the gather of a quantized table's rows reads its ids "
                                                               "from memory (not ids computed in the kernel)")
               for line in why), why
