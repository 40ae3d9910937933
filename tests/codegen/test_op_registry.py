"""An op is defined once: a new elementwise op registered in one place (kiln.ir.ops.register)
traces from a spec, runs in the reference interpreter, renders on the cpu target and inside a
generated GPU row kernel, with no other file touched."""

import pytest
import torch
import torch.fx
from torch import nn

from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.frontend import Embedding, LastTokens, Linear, RMSNorm, trace
from kiln.frontend.weights import random_weights
from kiln.ir import OPS, OpDef, OpKind, interpret, op_types
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline


def squareplus(x):
    """(x + sqrt(x^2 + 4)) / 2: a smooth ReLU no registry entry knows."""
    return (x + torch.sqrt(x * x + 4.0)) / 2


torch.fx.wrap("squareplus")  # calls stay one fx node: the spec author's op

SQUAREPLUS = OpDef(
    "squareplus", OpKind.ELEMENTWISE, (1, 1), op_types.same,
    reference=lambda node, args, bindings: squareplus(args[0]),
    torch=(squareplus,), signature=("%x",),
    cpu="({0} + torch.sqrt({0} * {0} + 4.0)) / 2",
    triton="({0} + tl.sqrt({0} * {0} + 4.0)) / 2",
)


class _Spec(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.proj, self.last = Embedding(64, 32), RMSNorm(32, 1e-6), Linear(32, 64), LastTokens()

    def forward(self, input_ids, positions):
        h = self.embed(input_ids)
        return self.proj(self.last(self.norm(squareplus(h) * 0.5 + h)))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(OPS, SQUAREPLUS.name, SQUAREPLUS)


def _inputs():
    return {"input_ids": torch.tensor([3, 9, 27, 1, 60], dtype=torch.int32), "positions": torch.arange(5, dtype=torch.int32),
            "logits_indices": torch.tensor([4, 2], dtype=torch.int32)}


def _eager(weights, inputs):
    h = torch.nn.functional.embedding(inputs["input_ids"].long(), weights["embed.weight"])
    x = squareplus(h) * 0.5 + h
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weights["norm.weight"]
    return torch.nn.functional.linear(x[inputs["logits_indices"].long()], weights["proj.weight"])


def test_a_registered_op_traces_interprets_and_renders_on_the_cpu_target(registered):
    spec = _Spec()
    graph = trace(spec)
    assert "squareplus" in {n.op for n in graph.nodes}
    weights, inputs = random_weights(spec), _inputs()
    want = _eager(weights, inputs)
    torch.testing.assert_close(interpret(graph, inputs, weights, {})["logits"], want)
    phases, _ = run_pipeline(graph, PipelineOptions(verify=True))
    program = load_kernel_module(render_cpu_program(phases["mixed"]), "test_op_registry_cpu")
    packed = lay_out_weights(phases.values(), materialize_weights(phases["mixed"], weights))
    torch.testing.assert_close(program.step(inputs, packed, {})["logits"], want)


def test_a_registered_op_runs_inside_a_generated_gpu_kernel(registered, tmp_path):
    from kiln.codegen.gpu_program import build_gpu_program
    from kiln.codegen.kernel_check import kernel_check
    from kiln.codegen.targets import get_target
    from kiln.runtime.launcher import Launcher

    spec = _Spec()
    graph = trace(spec)
    target = get_target("h100")
    phases, _ = run_pipeline(graph, PipelineOptions(verify=True, kernel_check=kernel_check(target)))
    fused = [n for n in phases["mixed"].nodes if n.op == "fused" and "squareplus" in str(n.attrs["pattern"])]
    assert fused, "squareplus was not fused into a kernel"
    program = build_gpu_program({"mixed": phases["mixed"]}, get_target("cpu"))  # small tiles for the interpreter
    assert any("tl.sqrt" in kind.render(variant) for kind, variant in program.kernels.values())
    program.write(tmp_path)
    module = load_kernel_module((tmp_path / "program.mixed.py").read_text(), "test_op_registry_gpu")
    weights, inputs = random_weights(spec), _inputs()
    packed = materialize_weights(phases["mixed"], weights)
    got = module.step(inputs, packed, {}, Launcher(tmp_path, program.kernel_table(), "cpu"))["logits"]
    torch.testing.assert_close(got, _eager(weights, inputs), rtol=1e-5, atol=1e-5)
