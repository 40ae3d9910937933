"""Model-spec selection, tracing errors and the CLI's one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.frontend import Embedding, Linear, trace
from kiln.models import ARCHITECTURES, build_spec

LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=48,
             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(KilnError) as info:
        build_spec({**LLAMA, "architectures": ["GPTNeoXForCausalLM"]})
    assert "'GPTNeoXForCausalLM' is not supported" in str(info.value)
    assert all(name in str(info.value) for name in ARCHITECTURES)
    with pytest.raises(KilnError, match="no `architectures` entry"):
        build_spec({k: v for k, v in LLAMA.items() if k != "architectures"})


def test_unsupported_rope_scaling_is_a_clear_error():
    with pytest.raises(KilnError, match="rope type .ntk-by-parts. is not supported yet"):
        build_spec({**LLAMA, "rope_parameters": {"rope_type": "ntk-by-parts", "factor": 4.0, "rope_theta": 1e4}})


def test_llama3_rope_scaling_reaches_the_rope_spec():
    spec = build_spec({**LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                    "rope_theta": 5e5}})
    rope = spec.model.layers[0].self_attn.rope.spec
    assert rope.scaling.kind == "llama3" and rope.theta == 5e5
    plain = build_spec({**LLAMA, "rope_theta": 5e5}).model.layers[0].self_attn.rope.spec
    assert not torch.equal(rope.inv_freq(), plain.inv_freq())


class _TinySpec(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.embed, self.proj, self.body = Embedding(16, 8), Linear(8, 8), body

    def forward(self, input_ids, positions):
        return self.body(self, input_ids)


def test_tracing_an_unsupported_op_names_it_and_the_spec_line():
    spec = _TinySpec(lambda m, ids: torch.matmul(m.proj(m.embed(ids)), m.proj.weight))
    refusal = r"calls torch.matmul at .*test_specs_and_cli.py:\d+, which kiln cannot trace.*kiln/ir/ops.py"
    with pytest.raises(KilnError, match=refusal):
        trace(spec)


def test_a_registry_op_with_a_bad_argument_is_refused_with_its_signature():
    spec = _TinySpec(lambda m, ids: m.proj(m.embed(ids)).softmax(-1, bogus=1))
    with pytest.raises(KilnError, match=r"softmax does not take the keyword 'bogus'.*it takes x, dim"):
        trace(spec)


def test_an_ill_typed_spec_names_the_node():
    spec = _TinySpec(lambda m, ids: m.proj(ids))  # a linear applied to token ids
    with pytest.raises(KilnError, match=r"ill-typed at .*proj.*inner dims differ"):
        trace(spec)


def _kiln(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_errors_without_a_traceback(tmp_path):
    missing = _kiln("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: ") and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["MambaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    unknown = _kiln("inspect", str(tmp_path))
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "error: " in unknown.stderr


def test_cli_inspect_shows_the_model(tmp_path):
    out = _kiln("inspect", "smollm2-135m")
    assert out.returncode == 0, out.stderr
    assert "30 layers, hidden 576, 9 heads (3 kv, head_dim 64)" in out.stdout
    assert "134.5M" in out.stdout and "30 x dense(h=9, kv=3, d=64" in out.stdout
    ir = _kiln("inspect", "smollm2-135m", "--ir")
    printed = ir.stdout.rstrip()
    assert ir.stdout.count("= attention(") == 30 and printed.endswith("return logits=%" + printed.split("%")[-1])


def test_inspect_describes_a_config_without_rope_settings():
    from kiln.cli import _describe

    class _NoRope(nn.Module):
        config = type("Config", (), {"hidden_size": 8, "vocab_size": 16})()

    line = _describe(_NoRope())
    assert line.startswith("0 layers, hidden 8, ? heads") and "vocab 16" in line and "rope" not in line
    gemma = _describe(build_spec({**LLAMA, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 6,
                                  "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4}))
    assert gemma.startswith("6 layers, hidden 32") and "theta=1e+06" in gemma and "theta=10000" in gemma
