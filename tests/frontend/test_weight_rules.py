"""Weight rules (frontend/weights.py): source rules (Concat, Slice) pick checkpoint tensors,
transform rules (AddConstant, Transpose, Cast) then apply in order; load_weights is generic."""

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Linear, RMSNorm
from kiln.frontend.weights import AddConstant, Cast, Concat, Slice, Transpose, checkpoint_sources, load_weights
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
