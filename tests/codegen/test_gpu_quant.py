"""Quantized weights in generated GPU programs: a tiny random Llama traced with quantized params
(passes/quantize_weights.py: the linears' weights in several kiln.quant formats, the tied
embedding / LM head table too), lowered, generated and run with its Triton kernels under the
interpreter, gives the logits of the reference interpreter on the same graph and weights (which
reads them dequantized): the quantized GEMMs, including packed gate/up and the norm prologues
that no longer fold into quantized weights, and the embedding's gather + dequantize kernel. The
program's form: quantized launches pass qweight and scales; fp8 refused on a100. Granite's (as
Gemma's) `embedding > mul` row group over a quantized table (its rows dequantized into a scratch
first) matches the reference too."""

import pytest
import torch

from kiln.codegen.gpu_program import build_gpu_program
from kiln.codegen.kernel_check import kernel_refusal
from kiln.codegen.targets import get_target
from kiln.errors import KilnError
from kiln.frontend.tracer import StepConfig, trace
from kiln.frontend.weights import random_weights
from kiln.ir import DTYPES
from kiln.ir.step import zero_states
from kiln.models import build_spec
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline
from kiln.passes.quantize_weights import quantize_weights
from kiln.quant import QuantFormat, QuantizedTensor, quantize

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),  # silu tails, interpreted
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter loops
]
# Formats by weight (TINY_LLAMA: hidden 64, intermediate 96): GGUF's Q8_0, Q4_1, Q6_K and Q4_K
# mappings, --quant int8 / fp8 (per channel)
FORMATS = {
    "embed_tokens": "int8-g32-f16", "layers.0.self_attn.qkv_proj": "int4-g32-f16", "o_proj": "int8-g16-f32",
    "layers.0.mlp.gate_up_proj": "int4-g32-f32", "layers.1.mlp.gate_up_proj": "int8-g64-f32",
    "layers.0.mlp.down_proj": "fp8e4m3-g96-f32", "layers.1.mlp.down_proj": "int8-g96-f32",
    "layers.1.self_attn.qkv_proj": "int4-g16-f16",
}


def stored_formats(spec) -> dict[str, QuantFormat]:
    return {name: QuantFormat.parse(fmt) for name, _ in spec.named_parameters()
            for key, fmt in FORMATS.items() if key in name}


class QuantizedTiny:
    """A config traced in `dtype` with its matrices kept quantized (FORMATS), generated for `target`."""

    def __init__(self, config: dict, target: str, directory, dtype: str = "f32"):
        from kiln.runtime.launcher import Launcher
        from tests.codegen.conftest import _import

        spec = build_spec(config)
        stored = stored_formats(spec)
        graph = quantize_weights(trace(spec, StepConfig(dtype=dtype)), stored)
        self.kept = {p.name: p.attrs["quant"] for p in graph.params if "quant" in p.attrs}
        check = lambda body: kernel_refusal(body, get_target(target))  # noqa: E731
        self.graphs, _ = run_pipeline(graph, PipelineOptions(kernel_check=check))
        original = {name: quantize(w, self.kept[name]) if name in self.kept else w.to(DTYPES[dtype])
                    for name, w in random_weights(spec).items()}
        self.weights = {k: v for g in self.graphs.values() for k, v in materialize_weights(g, original).items()}
        self.program = build_gpu_program(self.graphs, get_target(target))
        self.program.write(directory)
        self.modules = {phase: _import(directory / f"program.{phase}.py") for phase in self.graphs}
        self.launcher = Launcher(directory, self.program.kernel_table(), "cpu")

    def run(self, phase, inputs, states):
        return self.modules[phase].step(inputs, self.weights, states, self.launcher)["logits"]

    def reference(self, phase, inputs, states):
        from kiln.ir import interpret

        return interpret(self.graphs[phase], inputs, self.weights, states)["logits"]


def test_tiny_llama_with_quantized_weights_matches_the_dequantized_reference(tmp_path, helpers):
    model = QuantizedTiny(helpers.TINY_LLAMA, "cpu", tmp_path)
    assert set(map(str, model.kept.values())) == set(FORMATS.values())  # all kept (the tied table too)
    packed = [w for w in model.weights.values() if isinstance(w, QuantizedTensor)]
    assert len(packed) == 2 * 4 + 1  # per layer qkv, o, gate_up, down; the table
    kinds = {kind.KIND for kind, _ in model.program.kernels.values()}
    assert "embedding_quant" in kinds
    assert sum(v.quant is not None for k, v in model.program.kernels.values() if k.KIND == "gemm") >= 2 * 4 + 1
    ours, theirs = zero_states(model.graphs["mixed"], 64), zero_states(model.graphs["mixed"], 64)
    for step, (phase, inputs) in enumerate(helpers.step_inputs()):
        got, want = model.run(phase, inputs, ours), model.reference(phase, inputs, theirs)
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), f"step {step}"


def test_bf16_with_quantized_weights_is_as_close_to_fp32_as_the_bf16_reference(tmp_path, helpers):
    """The same quantized weights in a bf16 model (dequantized to bf16 in the kernels) vs the fp32
    model's reference: no further off than the reference interpreter in bf16."""
    model, exact = QuantizedTiny(helpers.TINY_LLAMA, "cpu", tmp_path / "bf16", "bf16"), \
        QuantizedTiny(helpers.TINY_LLAMA, "cpu", tmp_path / "f32")
    ours, theirs, exact_states = (zero_states(m.graphs["mixed"], 64) for m in (model, model, exact))
    for phase, inputs in helpers.step_inputs():
        got, same_dtype = model.run(phase, inputs, ours), model.reference(phase, inputs, theirs)
        assert got.dtype == torch.bfloat16
        helpers.check_close(got, exact.reference(phase, inputs, exact_states), same_dtype, slack=2.0)


def test_quantized_launches_pass_qweight_and_scales(tmp_path, helpers):
    graphs, _ = run_pipeline(quantize_weights(trace(build_spec(helpers.TINY_LLAMA)), {
        "model.embed_tokens.weight": QuantFormat("fp8e4m3", 64, "f32"),
        "model.layers.0.mlp.down_proj.weight": QuantFormat("int4", 32, "f16")}))
    program = build_gpu_program(graphs, get_target("h100"))
    source = program.sources["decode"]
    assert "weights['model.embed_tokens.weight'].qweight, weights['model.embed_tokens.weight'].scales" in source
    assert "weights['model.layers.0.mlp.down_proj.weight'].qweight" in source
    table = program.kernel_table()
    quantized = {name: entry for name, entry in table.items() if "__q" in name}
    assert {name.split("__")[0] for name in quantized} == {"gemm", "embedding_quant"}
    assert all(entry["signature"]["p_w" if name.startswith("gemm") else "p_table"] == "*u8:16"
               for name, entry in quantized.items())
    with pytest.raises(KilnError, match="targets that have it: l40s, h100"):
        build_gpu_program(graphs, get_target("a100"))


def test_a_row_group_led_by_a_quantized_embedding_matches_the_reference(tmp_path, helpers):
    """Granite's (as Gemma's) `embedding > mul` row group over a quantized table: the rows are
    dequantized into a scratch first, then the group's row kernel reads them there."""
    from tests.codegen.test_gpu_families import hf_config

    model = QuantizedTiny(hf_config("granite"), "cpu", tmp_path)
    assert "model.embed_tokens.weight" in model.kept
    lines = model.program.sources["decode"].splitlines()
    start = lines.index("    # fused embedding > mul")
    scratch = lines[start + 1].split(" = ")[0].strip()
    assert lines[start + 1].endswith(" = launcher.empty((B, 64), torch.float32)") and scratch.startswith("dequantized_")
    assert "EMBEDDING_QUANT_0, (B,), weights['model.embed_tokens.weight'].qweight" in lines[start + 2]
    assert lines[start + 3].startswith(f"    launcher.launch(ROWS_0, (B,), {scratch}, ")
    ours, theirs = zero_states(model.graphs["mixed"], 64), zero_states(model.graphs["mixed"], 64)
    for step, (phase, inputs) in enumerate(helpers.step_inputs()):
        got, want = model.run(phase, inputs, ours), model.reference(phase, inputs, theirs)
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), f"step {step}"
