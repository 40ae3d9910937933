"""Rope types: kiln's inv_freq and attention factor equal transformers' `ROPE_INIT_FUNCTIONS`
for the same config, RopeSpec stays frozen/hashable/readable, and bad rope settings are clear
errors."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kiln.errors import KilnError
from kiln.ir.specs import LongRopeScaling, RopeSpec, YarnScaling
from kiln.models import build_spec

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _kiln_rope(hf_config, layer: int = 0) -> tuple[RopeSpec, object]:
    config = {**hf_config.to_dict(), "architectures": [hf_config.architectures[0]]}
    spec = build_spec(config)
    return spec.model.layers[layer].self_attn.rope.spec, spec


def _check(hf_config, kind: str, **kwargs):
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, **kwargs)
    rope, spec = _kiln_rope(hf_config)
    assert rope.scaling.kind == kind
    assert torch.equal(rope.inv_freq(), want_freq), (rope.inv_freq(), want_freq)
    assert rope.attention_factor == pytest.approx(want_factor, rel=1e-12)
    assert hash(rope) == hash(RopeSpec(rope.head_dim, rope.theta, rope.rotary_dim, rope.scaling))
    return rope, spec


def _llama(rope_parameters: dict, **extra):
    return transformers.LlamaConfig(**{**TINY, **extra}, rope_parameters=rope_parameters,
                                    architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("params", [
    dict(factor=4.0, original_max_position_embeddings=64),
    dict(factor=8.0, original_max_position_embeddings=32, beta_fast=16, beta_slow=2, truncate=False),
    dict(factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=1.0),
    dict(factor=4.0, original_max_position_embeddings=64, attention_factor=1.5),
])
def test_yarn_matches_transformers(params):
    rope, _ = _check(_llama({"rope_type": "yarn", "rope_theta": 10000.0, **params}), "yarn")
    assert isinstance(rope.scaling, YarnScaling) and rope.attention_factor != 1.0
    assert "yarn x" in str(rope)


def test_yarn_with_partial_rotary_matches_transformers():
    hf = transformers.Qwen3Config(**TINY, head_dim=32, architectures=["Qwen3ForCausalLM"],
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                   "original_max_position_embeddings": 64})
    _check(hf, "yarn")


@pytest.mark.parametrize("factor, max_position", [(2.0, 256), (1.7, 100)])
def test_dynamic_ntk_matches_transformers_within_max_position(factor, max_position):
    hf = _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor}, max_position_embeddings=max_position)
    rope, spec = _check(hf, "dynamic")
    assert spec.config.max_position_embeddings == max_position  # beyond it transformers raises the base


@pytest.mark.parametrize("params, served", [
    ({}, 64),  # factor from max/original positions: attention factor sqrt(1 + ln 4 / ln 64)
    ({"attention_factor": 1.25}, 64),
    ({"factor": 1.0}, 64),  # attention factor 1
])
def test_longrope_matches_transformers_short_factors(params, served):
    hf = transformers.Phi3Config(**TINY, original_max_position_embeddings=64, pad_token_id=0,
                                 architectures=["Phi3ForCausalLM"],
                                 rope_parameters={"rope_type": "longrope",
                                                  "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                                                  "long_factor": [2.0] * 8, **params})
    rope, spec = _check(hf, "longrope")
    assert isinstance(rope.scaling, LongRopeScaling) and isinstance(rope.scaling.short_factor, tuple)
    assert spec.config.max_position_embeddings == served  # the long factors start beyond it
    long_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, seq_len=65)
    assert not torch.equal(rope.inv_freq(), long_freq)


def test_phi3_su_rope_reads_as_longrope():
    config = {**TINY, "architectures": ["Phi3ForCausalLM"], "original_max_position_embeddings": 64,
              "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    rope = build_spec(config).model.layers[0].self_attn.rope.spec
    assert rope.scaling.kind == "longrope"


@pytest.mark.parametrize("kind, params", [
    ("linear", dict(factor=3.0)),
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
])
def test_linear_and_llama3_match_transformers(kind, params):
    _check(_llama({"rope_type": kind, "rope_theta": 50000.0, **params}), kind)


def test_gemma3_rope_per_layer_type_in_both_config_formats():
    hf = transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=16, architectures=["Gemma3ForCausalLM"],
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                        "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                           "rope_theta": 1e6}})
    v5 = [_kiln_rope(hf, i)[0] for i in range(3)]
    assert [r.theta for r in v5] == [1e4, 1e6, 1e4] and v5[1].scaling.kind == "linear" and v5[0].scaling is None
    want, _ = ROPE_INIT_FUNCTIONS["linear"](hf, layer_type="full_attention")
    assert torch.equal(v5[1].inv_freq(), want)
    # transformers 4 wrote rope_theta / rope_local_base_freq / rope_scaling (full layers only)
    v4 = {k: v for k, v in hf.to_dict().items() if k != "rope_parameters"}
    v4.update(architectures=["Gemma3ForCausalLM"], rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling={"rope_type": "linear", "factor": 8.0})
    spec = build_spec(v4)
    assert [layer.self_attn.rope.spec for layer in spec.model.layers] == v5


def test_unknown_rope_type_names_it_and_the_supported_ones():
    with pytest.raises(KilnError, match=r"rope type 'ntk-by-parts' is not supported.*dynamic.*linear.*llama3.*longrope.*yarn"):
        build_spec({**TINY, "architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "ntk-by-parts"}})


@pytest.mark.parametrize("config, missing", [
    ({**TINY, "architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn"}}, "factor"),
    ({**TINY, "architectures": ["Phi3ForCausalLM"], "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8}},
     "long_factor"),
    ({k: v for k, v in TINY.items() if k != "hidden_size"} | {"architectures": ["Olmo2ForCausalLM"]},
     "hidden_size"),
    ({**TINY, "architectures": ["Gemma3ForCausalLM"]}, "query_pre_attn_scalar"),
    ({**TINY, "architectures": ["GraniteForCausalLM"]}, "embedding_multiplier"),
])
def test_a_missing_config_key_is_a_clear_error(config, missing):
    with pytest.raises(KilnError, match=rf"has no '{missing}', which kiln needs.*re-export"):
        build_spec(config)


def test_rope_spec_prints_its_scaling():
    rope = RopeSpec(16, 1e4, None, YarnScaling(factor=4.0, original_max_position=64, attention=1.1386))
    assert str(rope) == "rope(d=16, theta=10000, yarn x4 orig=64 attn=1.1386)"
    assert len({rope, RopeSpec(16, 1e4, None, YarnScaling(factor=4.0, original_max_position=64, attention=1.1386))}) == 1
