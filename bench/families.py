"""`kiln compile` of every supported family for every GPU target: tiny random checkpoints (built
with transformers, saved as HF directories) compiled with the real compiler (trace, passes with
fusion asking the target, kernel generation, cross-compilation of every kernel), with the
launches per decoder layer, kernel count, register spills and compile time of each.

    python bench/families.py [--families gemma3 granite ...] [--targets h100 mi300x ...]  (default: every GPU target)
                             [--tp 2 4] [--json PATH]

`--tp` compiles tensor-parallel artifacts of those degrees instead (one rank's kernels and
launches, collectives included). Prints a table and writes bench/results/families.json (or
PATH). No GPU needed (cross-compilation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers
from machine import write_results

from kiln.codegen.targets import TARGETS
from kiln.compiler import CompileOptions, compile_model
from kiln.runtime.artifact import load_artifact

RESULTS = Path(__file__).parent / "results" / "families.json"
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "smollm2": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=7, head_dim=16)),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                                   num_hidden_layers=6)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=32,
                                               attn_logit_softcapping=3.0, final_logit_softcapping=2.5)),
    "phi3": (transformers.Phi3Config, dict(partial_rotary_factor=0.5, original_max_position_embeddings=64,
                                           pad_token_id=0, rope_parameters={
                                               "rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                                               "long_factor": [2.0, 3.0, 5.0, 9.0]})),
    "granite": (transformers.GraniteConfig, dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                                                 attention_multiplier=0.09, logits_scaling=4.0)),
    "olmo2": (transformers.Olmo2Config, dict(attention_bias=True)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                    moe_intermediate_size=48, norm_topk_prob=True)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    shared_expert_intermediate_size=80)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": (transformers.GptOssConfig, dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                                sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
    "qwen3_next": (transformers.Qwen3NextConfig, dict(  # Qwen3-Next-80B's linear layer widths
        head_dim=16, num_hidden_layers=4, mlp_only_layers=[0, 1, 2, 3], linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128)),
    "mamba2": (transformers.Mamba2Config, dict(num_heads=8, head_dim=16, expand=2, state_size=128, n_groups=2)),
}


def checkpoint(family: str, directory: Path) -> Path:
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**TINY, **extra}))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory / family)
    return directory / family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    gpu_targets = [name for name, target in TARGETS.items() if target.is_gpu]
    parser.add_argument("--targets", nargs="+", default=gpu_targets, choices=list(TARGETS))
    parser.add_argument("--tp", nargs="+", type=int, default=[1], help="tensor-parallel degrees (default 1)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in args.families:
            source = checkpoint(family, tmp)
            for target, tp in ((target, tp) for target in args.targets for tp in args.tp):
                start = time.perf_counter()
                summary = compile_model(str(source), tmp / f"{family}-{target}-tp{tp}",
                                        CompileOptions(target=target, tp=tp), progress=False)
                kernels = load_artifact(summary.artifact).manifest["kernels"]
                spills = sorted(n for n, k in kernels.items()
                                if k["resources"]["spill_stores"] + k["resources"]["spill_loads"])
                row = {"family": family, "target": target, "tp": tp, "seconds": round(time.perf_counter() - start, 1),
                       "kernels": len(kernels), "spilling_kernels": spills,
                       **{f"launches_per_layer_{p}": round(info["launches_per_layer"], 2)
                          for p, info in summary.phases.items()}}
                rows.append(row)
                print(f"{family:8} {target:5} tp {tp} {row['launches_per_layer_mixed']:5.2f} / "
                      f"{row['launches_per_layer_decode']:5.2f} launches per layer (mixed / decode), "
                      f"{row['kernels']:3} kernels, {len(spills)} spilling, "
                      f"{row['seconds']:5.1f} s", flush=True)
    write_results(args.json, rows)


if __name__ == "__main__":
    main()
