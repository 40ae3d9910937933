"""The general tracer: torch functions and tensor methods that real specs use become IR ops.

Each case traces a tiny spec (embedding -> body -> linear -> last tokens) and checks the
reference interpreter and the compiled cpu program against the same body run eagerly in torch.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.errors import KilnError
from kiln.frontend import Embedding, LastTokens, Linear, RMSNorm, trace
from kiln.frontend.weights import random_weights
from kiln.ir import interpret
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline

D = 8


def _topk_pad(h):
    values, indices = torch.topk(h, 3, dim=-1)
    return torch.cat([values, indices.float() / D, h[:, 6:]], dim=-1)


def _gathers(h):
    order = torch.sort(h, dim=-1, descending=True).indices
    row = torch.topk(h[0], D).indices
    return torch.gather(h, -1, order) + torch.index_select(h, 1, row) * 0.5


BODIES = {
    "softmax": lambda h: torch.softmax(h, dim=-1) * 2 - 1 + F.log_softmax(h, -1) * 0.1,
    "reductions": lambda h: h - h.mean(-1, keepdim=True) + h.amax(-1, keepdim=True) * h.sum(dim=-1, keepdim=True)
    + torch.amin(h, 1, keepdim=True) + h.max(dim=-1, keepdim=True)[0] - h.min(-1, True).values,
    "arg_reductions": lambda h: h + h.argmax(-1, keepdim=True).float() - torch.argmin(h, dim=1, keepdim=True).float(),
    "powers_and_logs": lambda h: torch.sqrt(h.pow(2) + 1) + torch.log(torch.exp(h) + 1) - 2 ** h + h ** 3
    + torch.rsqrt(h * h + 1) - (1 - h) / 2,
    "activations": lambda h: torch.tanh(h) + torch.sigmoid(h) + F.softplus(h) + F.softplus(h, beta=2.0, threshold=1.0)
    + F.gelu(h) + F.gelu(h, approximate="tanh") + F.relu(h) + F.silu(h) + h.abs() - h.neg(),
    "where_clamp_compare": lambda h: torch.where(h > 0, h, h * 0.1).clamp(-0.5, 0.5) + (h <= 0.2).float()
    + torch.clamp(h, min=0.0) + torch.where(h.eq(h.amax(-1, keepdim=True)), 1.0, 0.0) + torch.maximum(h, h * 0.5),
    "cat_and_stack": lambda h: torch.stack([h, 2 * h], dim=1).flatten(1)[:, : D] + torch.cat([h[:, 4:], h[:, :4]], -1),
    "topk": _topk_pad,
    "sort_gather_index_select": _gathers,
    "cumsum": lambda h: torch.cumsum(h, dim=-1) / D + h.cumsum(0) * 0.01,
    "layer_norm": lambda h: F.layer_norm(h, (D,)) + F.layer_norm(h, (D,), eps=1e-3) * 0.5,
    "casts": lambda h: (h.to(torch.bfloat16).float() * 3 + 1) / 2 + h.type_as(h) + (h > 0).long().float(),
    "shapes": lambda h: h.unsqueeze(1).view(-1, 2, D // 2).reshape(h.shape[0], D)[:, None, :].squeeze(1)
    + h.unflatten(-1, (2, 4)).flatten(-2) * h.size(-1),
}


class _Spec(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.embed, self.proj, self.last, self.body = Embedding(32, D), Linear(D, 16), LastTokens(), body

    def forward(self, input_ids, positions):
        return self.proj(self.last(self.body(self.embed(input_ids))))


def _inputs(tokens: int):
    ids = torch.arange(tokens, dtype=torch.int32) * 5 % 32
    return {"input_ids": ids, "positions": torch.arange(tokens, dtype=torch.int32),
            "logits_indices": torch.tensor([tokens - 1, tokens // 2], dtype=torch.int32)}


def _eager(body, weights, inputs):
    h = F.embedding(inputs["input_ids"].long(), weights["embed.weight"])
    return F.linear(body(h)[inputs["logits_indices"].long()], weights["proj.weight"])


@pytest.mark.parametrize("name", list(BODIES))
def test_traced_ops_match_torch_through_the_interpreter_and_the_cpu_program(name):
    body = BODIES[name]
    spec = _Spec(body)
    graph = trace(spec)
    weights = random_weights(spec)
    inputs = _inputs(7)
    want = _eager(body, weights, inputs)
    got = interpret(graph, inputs, weights, {})["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    phases, _ = run_pipeline(graph, PipelineOptions(verify=True))
    program = load_kernel_module(render_cpu_program(phases["mixed"]), f"test_general_tracer_{name}")
    packed = lay_out_weights(phases.values(), materialize_weights(phases["mixed"], weights))
    torch.testing.assert_close(program.step(inputs, packed, {})["logits"], want, rtol=1e-5, atol=1e-5)


def test_a_float64_cast_is_refused_with_the_dtypes_kiln_has():
    with pytest.raises(KilnError, match=r"calls Tensor.double at .*test_general_tracer.py:\d+.*kiln's dtypes are"):
        trace(_Spec(lambda h: h.double().float()))


class _KeepsForward(RMSNorm):
    """A subclass that only renames: still the rms_norm block."""


class _OnePlusWeight(RMSNorm):
    """A subclass with its own forward (Gemma's 1 + w): traced through, op by op."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("norm_class", [_KeepsForward, _OnePlusWeight])
def test_subclasses_of_blocks_trace(norm_class):
    norm = norm_class(D, 1e-6)
    graph = trace(_Spec(norm))
    assert ("rms_norm" in {n.op for n in graph.nodes}) == (norm_class is _KeepsForward)
    weights = random_weights(_Spec(norm))
    inputs = _inputs(5)
    w = weights["body.weight"]
    scale = w if norm_class is _KeepsForward else 1 + w
    want = _eager(lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * scale, weights, inputs)
    torch.testing.assert_close(interpret(graph, inputs, weights, {})["logits"], want, rtol=1e-5, atol=1e-5)


def test_unsupported_indexing_says_what_to_use():
    with pytest.raises(KilnError, match=r"getitem at .*test_general_tracer.py:\d+.*use torch.gather or torch.index_select"):
        trace(_Spec(lambda h: h[h[:, 0].long(), :]))
