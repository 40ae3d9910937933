"""Weight rules (frontend/weights.py): source rules (Concat, Slice, Stack) pick checkpoint tensors,
transform rules (AddConstant, Transpose, Deinterleave, Cast) then apply in order; load_weights is generic."""

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Experts, Linear, RMSNorm
from kiln.frontend.weights import (
    AddConstant,
    Cast,
    Concat,
    Deinterleave,
    Slice,
    Stack,
    Transpose,
    checkpoint_sources,
    load_weights,
    weight_value,
)
from kiln.models import build_spec
from kiln.models.gemma import GemmaForCausalLM


class _Spec(nn.Module):
    """Two layers, each with a packed projection and a norm."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": Linear(4, 6), "norm": RMSNorm(4, 1e-6)}) for _ in range(2))


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        out[f"layers.{i}.a.weight"] = torch.randn(2, 4, generator=g)
        out[f"layers.{i}.b.weight"] = torch.randn(4, 4, generator=g)
        out[f"layers.{i}.fused.weight"] = torch.randn(10, 4, generator=g)
        out[f"layers.{i}.norm.weight"] = torch.randn(4, generator=g) * 0.1
    return out


CONCAT = Concat("layers.*.proj.weight", ("layers.*.a.weight", "layers.*.b.weight"))


def test_concat_and_plain_reads():
    t = _tensors()
    w = load_weights(_Spec(), (CONCAT,), t, torch.float32, progress=False)
    assert torch.equal(w["layers.1.proj.weight"], torch.cat([t["layers.1.a.weight"], t["layers.1.b.weight"]]))
    assert torch.equal(w["layers.0.norm.weight"], t["layers.0.norm.weight"])


def test_slice_cuts_a_spec_parameter_out_of_a_fused_checkpoint_tensor():
    t = _tensors()
    w = load_weights(_Spec(), (Slice("layers.*.proj.weight", "layers.*.fused.weight", 0, 2, 8),), t, torch.float32,
                     progress=False)
    assert torch.equal(w["layers.0.proj.weight"], t["layers.0.fused.weight"][2:8])
    with pytest.raises(KilnError, match=r"cuts \[8:14\] out of a dim of size 10"):
        load_weights(_Spec(), (Slice("layers.*.proj.weight", "layers.*.fused.weight", 0, 8, 14),), t, torch.float32,
                     progress=False)


def test_add_constant_takes_one_pattern_or_several_and_adds_in_fp32():
    t = {k: v.to(torch.bfloat16) for k, v in _tensors().items()}
    rules = (CONCAT, AddConstant("layers.*.norm.weight", 1.0))
    w = load_weights(_Spec(), rules, t, torch.float32, progress=False)
    assert torch.equal(w["layers.1.norm.weight"], t["layers.1.norm.weight"].float() + 1.0)  # no bf16 rounding of 1 + w
    assert torch.equal(w["layers.1.proj.weight"][:2], t["layers.1.a.weight"].float())  # other parameters untouched
    several = AddConstant(("layers.0.norm.weight", "layers.1.norm.weight"), 1.0)
    assert several.targets == ("layers.0.norm.weight", "layers.1.norm.weight") and several.applies("layers.1.norm.weight")
    assert AddConstant("layers.*.norm.weight", 1.0).targets == ("layers.*.norm.weight",)


def test_transforms_chain_in_order_on_the_value_a_source_rule_built():
    t = _tensors()
    t["layers.0.b.weight"] = t["layers.1.b.weight"] = torch.randn(4, 4)
    swapped = {k.replace(".a.", ".x."): v.t().contiguous() if ".a." in k else v for k, v in t.items()}
    rules = (Concat("layers.*.proj.weight", ("layers.*.x.weight", "layers.*.b.weight"), dim=1),
             Transpose("layers.*.proj.weight"))
    w = load_weights(_Spec(), rules, swapped, torch.float32, progress=False)
    assert torch.equal(w["layers.0.proj.weight"], torch.cat([t["layers.0.a.weight"].t(), t["layers.0.b.weight"]], 1).t())
    # Cast then AddConstant: 1 + w computed on the bf16-rounded w; the other order rounds 1 + w to bf16
    first_cast = (Cast("layers.*.norm.weight", torch.bfloat16), AddConstant("layers.*.norm.weight", 1.0))
    w1 = load_weights(_Spec(), (CONCAT, *first_cast), t, torch.float32, progress=False)["layers.0.norm.weight"]
    w2 = load_weights(_Spec(), (CONCAT, *first_cast[::-1]), t, torch.float32, progress=False)["layers.0.norm.weight"]
    norm = t["layers.0.norm.weight"]
    assert torch.equal(w1, norm.to(torch.bfloat16).float() + 1)
    assert torch.equal(w2, (norm + 1).to(torch.bfloat16).float())


def test_checkpoint_sources_keeps_its_signature():
    assert checkpoint_sources("layers.3.proj.weight", (CONCAT,)) == (("layers.3.a.weight", "layers.3.b.weight"), 0)
    assert checkpoint_sources("layers.3.proj.weight", (Slice("layers.*.proj.weight", "layers.*.fused.weight", 1, 0, 4),)) \
        == (("layers.3.fused.weight",), 1)
    assert checkpoint_sources("layers.3.norm.weight", (CONCAT, AddConstant("layers.*.norm.weight", 1.0))) \
        == (("layers.3.norm.weight",), 0)


def test_missing_tensors_and_wrong_shapes_are_clear_errors():
    t = _tensors()
    del t["layers.1.b.weight"]
    with pytest.raises(KilnError, match=r"no tensor 'layers.1.b.weight' \(needed for 'layers.1.proj.weight'\)"):
        load_weights(_Spec(), (CONCAT,), t, torch.float32, progress=False)
    with pytest.raises(KilnError, match=r"have shape \(4, 4\), but 'layers.0.proj.weight' needs \(6, 4\)"):
        load_weights(_Spec(), (Transpose("layers.*.norm.weight"),), {**_tensors(), "layers.0.proj.weight": torch.zeros(4, 4)},
                     torch.float32, progress=False)


def test_gemma_adds_one_to_every_rms_norm_weight_and_nothing_else():
    config = dict(architectures=["Gemma3ForCausalLM"], vocab_size=32, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                  query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=64)
    spec = build_spec(config)
    assert isinstance(spec, GemmaForCausalLM)
    norms = {f"{m}.weight" for m, module in spec.named_modules() if isinstance(module, RMSNorm)}
    assert len(norms) == 2 * 6 + 1  # 4 per layer + q/k norms, and the final norm
    plus_one = {name for name, _ in spec.named_parameters()
                if any(rule.applies(name) for rule in spec.WEIGHTS if isinstance(rule, AddConstant))}
    assert plus_one == norms


class _ExpertsSpec(nn.Module):
    def __init__(self, experts: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"experts": Experts(experts, 4, 2)}) for _ in range(2))


STACK = (Stack("layers.*.experts.gate_up_proj", ("layers.*.experts.#.gate.weight", "layers.*.experts.#.up.weight")),
         Stack("layers.*.experts.down_proj", ("layers.*.experts.#.down.weight",)))


def _per_expert(experts: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"layers.{i}.experts.{e}.{name}.weight": torch.randn(shape, generator=g)
            for i in range(2) for e in range(experts) for name, shape in (("gate", (2, 4)), ("up", (2, 4)), ("down", (4, 2)))}


def test_stack_packs_per_expert_projections_and_reads_a_stacked_checkpoint_as_is():
    t = _per_expert(3)
    w = load_weights(_ExpertsSpec(), STACK, t, torch.float32, progress=False)
    assert w["layers.1.experts.gate_up_proj"].shape == (3, 4, 4)
    assert torch.equal(w["layers.1.experts.gate_up_proj"][2],
                       torch.cat([t["layers.1.experts.2.gate.weight"], t["layers.1.experts.2.up.weight"]]))
    assert torch.equal(w["layers.0.experts.down_proj"][1], t["layers.0.experts.1.down.weight"])
    stacked = load_weights(_ExpertsSpec(), STACK, w, torch.float32, progress=False)  # transformers 5's packed names
    assert all(torch.equal(stacked[k], w[k]) for k in w)


def test_stack_with_experts_missing_names_the_count():
    with pytest.raises(KilnError, match=r"shape \(2, 4, 4\), but 'layers.0.experts.gate_up_proj' needs \(3, 4, 4\)"):
        load_weights(_ExpertsSpec(3), STACK, _per_expert(2), torch.float32, progress=False)


def test_deinterleave_then_transpose_turns_gpt_oss_layout_into_gate_rows_first():
    packed = torch.arange(2 * 4 * 6.0).reshape(2, 4, 6)  # [E, hidden, 2I]: gate/up interleaved along 2I
    rules = (Deinterleave("w"), Transpose("w", 1, 2))
    got = weight_value("w", rules, {"w": packed})  # [E, 2I, hidden], gate rows first
    assert torch.equal(got[:, :3], packed[:, :, 0::2].transpose(1, 2))
    assert torch.equal(got[:, 3:], packed[:, :, 1::2].transpose(1, 2))
