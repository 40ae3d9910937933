"""Linear attention on the cpu target, on a tiny-but-not-toy Qwen3-Next-shaped hybrid (random
weights: 8 layers, 6 Gated DeltaNet + 2 gated full attention, hidden 1024, heads of 128).

  decode     one decode step at each context (default 1k and 16k tokens): the whole step and,
             inside it, the linear layers (linear attention + causal conv1d) and the full
             attention layers; the linear layers' cost must not grow with the context. The
             steps are timed on a KV cache and state that hold random values (the time does not
             depend on them), so no 16k-token prefill is needed.
  prefill    tokens/s of kiln's chunked gated delta rule (runtime/cpu_linear_attention) against
             transformers' torch implementation of the same layer (torch_chunk_gated_delta_rule),
             at the shapes of Qwen3-Next-80B's linear layers (16 key heads, 32 value heads of 128).
  state      state-pool bytes per sequence: the bench model's and Qwen3-Next-80B's, as kiln plans them.
  prefix     a 2048-token prompt, then one sharing its first 2000 tokens: prompt tokens computed and
             time to first token of the second, with state snapshots every 256 tokens and without
             prefix caching.

Medians of `runs` (interleaved where two things are compared). Writes JSON (default
bench/results/linear.json).

    python bench/linear.py [--contexts 1024 16384] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from machine import cpu_description, write_results
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from kiln.compile_cache import compile_cached
from kiln.compiler import CompileOptions
from kiln.frontend import load_checkpoint, trace
from kiln.ir.cache_groups import plan_state_groups
from kiln.models import build_spec
from kiln.runtime import cpu_linear_attention, cpu_ops
from kiln.runtime.artifact import Artifact, load_artifact
from kiln.runtime.engine import LLMEngine
from kiln.runtime.executor import CpuExecutor
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_batch import StepBatch

CACHE = Path.home() / ".cache" / "kiln" / "bench-linear"
HYBRID = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
              num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
              linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
              mlp_only_layers=list(range(8)), max_position_embeddings=32768)
RECURRENT_OPS = ("linear_attention", "causal_conv1d")
ATTENTION_OPS = ("prefill_attention", "decode_attention")
I32 = dict(dtype=torch.int32)


def hybrid_artifact() -> Artifact:
    """The hybrid's cpu artifact (its random checkpoint saved once; compiled through the compile cache)."""
    if not (CACHE / "hf" / "config.json").exists():
        torch.manual_seed(0)
        transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**HYBRID)).save_pretrained(CACHE / "hf")
    return load_artifact(compile_cached(str(CACHE / "hf"), CompileOptions(target="cpu"), progress=False).artifact)


class OpTimer:
    """Wraps cpu_ops functions to add up the seconds their calls take, per name."""

    def __init__(self, names):
        self.seconds: dict[str, float] = defaultdict(float)
        self.originals = {name: getattr(cpu_ops, name) for name in names}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(cpu_ops, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(cpu_ops, name, fn)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


def decode_batch(context: int, block_size: int) -> StepBatch:
    """One sequence's decode step at `context` tokens (blocks 0.. in order, state slot 0)."""
    blocks = -(-context // block_size)
    return StepBatch(input_ids=torch.tensor([7], **I32), positions=torch.tensor([context - 1], **I32),
                     query_start=torch.tensor([0, 1], **I32), seq_lens=torch.tensor([context], **I32),
                     block_tables=torch.arange(blocks, **I32)[None], slot_mapping=torch.tensor([context - 1], **I32),
                     logits_indices=torch.tensor([0], **I32), num_decodes=1, state_indices=torch.tensor([0], **I32))


def bench_decode(executor: CpuExecutor, contexts: list[int], runs: int) -> dict:
    times: dict[int, dict[str, list[float]]] = {c: defaultdict(list) for c in contexts}
    for run in range(runs + 1):  # run 0 warms up
        for context in contexts:
            with OpTimer(RECURRENT_OPS + ATTENTION_OPS) as timer:
                start = time.perf_counter()
                executor.execute(decode_batch(context, executor.block_size))
                step = time.perf_counter() - start
            if run:
                times[context]["step_ms"].append(1e3 * step)
                times[context]["linear_layers_ms"].append(1e3 * sum(timer.seconds[n] for n in RECURRENT_OPS))
                times[context]["attention_layers_ms"].append(1e3 * sum(timer.seconds[n] for n in ATTENTION_OPS))
    return {str(c): {k: round(statistics.median(v), 3) for k, v in t.items()} for c, t in times.items()}


def kiln_chunked(q, k, v, decay, beta) -> None:
    """kiln's gated delta rule over one fresh sequence of q, k [L, Hk, D], v [L, Hv, D], decay, beta [L, Hv]."""
    length, hv, dim = v.shape
    spans = (torch.tensor([0, length], **I32), torch.tensor([length], **I32), torch.tensor([0], **I32))
    cpu_linear_attention.linear_attention(q, k, v, decay, torch.zeros(1, hv, dim, dim), *spans, beta,
                                          rule="gated_delta", group=hv // q.shape[1], scale=dim ** -0.5, qk_l2norm=True)


def transformers_chunked(q, k, v, decay, beta) -> None:
    """transformers' torch_chunk_gated_delta_rule on the same inputs (a batch of one)."""
    hf.torch_chunk_gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None], output_final_state=True,
                                    use_qk_l2norm_in_kernel=True)


def bench_prefill(lengths: list[int], runs: int, hk: int = 16, hv: int = 32, dim: int = 128) -> dict:
    results = {}
    for length in lengths:
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(length, hk, dim, generator=g), torch.randn(length, hk, dim, generator=g),
                  torch.randn(length, hv, dim, generator=g), -torch.rand(length, hv, generator=g),
                  torch.rand(length, hv, generator=g))
        times = defaultdict(list)
        for run in range(runs + 1):
            for name, fn in (("kiln", kiln_chunked), ("transformers", transformers_chunked)):
                start = time.perf_counter()
                with torch.inference_mode():
                    fn(*inputs)
                if run:
                    times[name].append(time.perf_counter() - start)
        tokens_per_s = {name: round(length / statistics.median(t)) for name, t in times.items()}
        results[str(length)] = {**{f"{n}_tok_s": s for n, s in tokens_per_s.items()},
                                "ratio": round(tokens_per_s["kiln"] / tokens_per_s["transformers"], 2)}
    return results


def state_bytes(artifact) -> dict:
    """State-pool bytes per sequence: the bench model's (manifest) and Qwen3-Next-80B's (planned
    from transformers' default Qwen3NextConfig, its MLPs taken dense: they hold no state)."""
    config = transformers.Qwen3NextConfig().to_dict()
    config.update(architectures=["Qwen3NextForCausalLM"], mlp_only_layers=list(range(config["num_hidden_layers"])))
    (group,) = plan_state_groups(trace(build_spec(config)))
    return {"bench_model": sum(g.slot_bytes for g in artifact.manifest.recurrent_groups),
            "qwen3_next_80b": group.slot_bytes, "qwen3_next_80b_linear_layers": len(group.layers)}


def bench_prefix(artifact, runs: int) -> dict:
    tokenizer = load_checkpoint("smollm2-135m", progress=False).tokenizer
    g = torch.Generator().manual_seed(1)
    leader = torch.randint(0, 8192, (2048,), generator=g).tolist()
    follower = leader[:2000] + torch.randint(0, 8192, (48,), generator=g).tolist()
    results = {}
    for name, options in (("snapshots_every_256", dict(state_snapshot_interval=256)),
                          ("no_prefix_caching", dict(enable_prefix_caching=False))):
        engine = LLMEngine(CpuExecutor(artifact, kv_cache_memory=1 << 30, max_model_len=4096), tokenizer,
                           eos_token_ids=[], **options)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        ttfts, computed = [], 0
        for run in range(runs):
            engine.add_request(f"leader{run}", leader, params)
            while engine.has_unfinished_requests():
                engine.step()
            before, start = engine.scheduler.prompt_tokens_computed, time.perf_counter()
            engine.add_request(f"follower{run}", follower, params)
            while engine.has_unfinished_requests():
                engine.step()
            ttfts.append(time.perf_counter() - start)
            computed = engine.scheduler.prompt_tokens_computed - before
        results[name] = {"follower_prompt_tokens_computed": computed, "ttft_ms": round(1e3 * statistics.median(ttfts), 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "linear.json")
    args = parser.parse_args()
    artifact = hybrid_artifact()
    print(f"machine: {cpu_description()}")
    executor = CpuExecutor(artifact, kv_cache_memory=1 << 30, max_model_len=max(args.contexts), enforce_eager=True)
    results = {"machine": cpu_description(), "threads": torch.get_num_threads(), "model": HYBRID}
    results["decode"] = bench_decode(executor, args.contexts, args.runs)
    for context, row in results["decode"].items():
        print(f"decode at {context:>6} tokens: step {row['step_ms']:8.2f} ms, linear layers {row['linear_layers_ms']:6.2f} "
              f"ms, full attention layers {row['attention_layers_ms']:6.2f} ms")
    results["prefill"] = bench_prefill(args.prefill, args.runs)
    for length, row in results["prefill"].items():
        print(f"chunked gated delta rule, {length} tokens: kiln {row['kiln_tok_s']} tok/s, transformers "
              f"{row['transformers_tok_s']} tok/s ({row['ratio']}x)")
    results["state_bytes_per_sequence"] = state_bytes(artifact)
    print(f"state pool per sequence: {results['state_bytes_per_sequence']}")
    results["prefix"] = bench_prefix(artifact, max(1, args.runs // 2))
    print(f"prefix hit: {results['prefix']}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
