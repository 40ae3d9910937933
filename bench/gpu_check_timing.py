"""The timing sections of the device check (bench/gpu_check.py says what each measures): 4 decode
steps against the HBM roofline, 5 prefill attention against SDPA, 6 CUDA graphs against eager
launches; the rest of the check, and what the sections share, is in gpu_check_sections.py."""

from __future__ import annotations

import functools
import statistics
import sys
import time

from gpu_check_sections import BENCH, Run, artifact, checkpoint, gpu_executor, model_config, release

# ---------------------------------------------------------------- 4 and 6: decode steps

def decode_batch(batch: int, context: int, block_size: int):
    """A decode step of `batch` sequences of `context` tokens, each owning its own blocks
    (bench/gpu_decode.py's)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from gpu_decode import decode_batch as build

    return build(batch, context, block_size)


def median_ms(run: Run, fn, steps: int) -> float:
    """Median milliseconds of `fn()`, the device synchronized before and after each call."""
    times = []
    for _ in range(steps):
        run.sync()
        start = time.perf_counter()
        fn()
        run.sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bytes_read(executor, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step reads: every weight once, but an untied embedding
    table only for its `batch` rows; each sequence's keys and values over `context` tokens."""
    weights = executor.weights
    total = sum(w.numel() * w.element_size() for w in weights.values())
    embedding = weights.get("model.embed_tokens.weight")
    if embedding is not None and any(name.startswith("lm_head.") for name in weights):  # e.g. lm_head.weight*model.norm.weight
        total -= embedding.numel() * embedding.element_size() - batch * embedding[0].numel() * embedding.element_size()
    kv = batch * context * sum(g.bytes_per_token for g in executor.cache_groups)
    return total, kv


def peak_bandwidth(target: str) -> float:
    """The card's peak HBM bytes/s, from its kiln target record."""
    from kiln.codegen.targets import get_target

    return 1e9 * get_target(target).hbm_bandwidth_gbs


def decode_settings(run: Run) -> tuple[int, int, int]:
    """(context tokens per sequence, timed steps, warm-up steps) of the decode sections."""
    return (24, 1, 0) if run.dry_run else (1024, 30, 3)


def section_decode(run: Run) -> None:
    context, steps, warmups = decode_settings(run)
    run.put("context", context)
    rows: list[dict] = []
    for name in run.models:
        executor = gpu_executor(run, artifact(run, checkpoint(run, name), run.target), enforce_eager=False)
        for size in run.batches:
            rows.append(decode_row(run, executor, size, context, steps, warmups))
            rows[-1]["model"] = name
            run.put("rows", rows)
            run.summary(f"{name} B={size}: {rows[-1]['ms']:.3f} ms/step, {rows[-1]['tokens_per_s']:.0f} tok/s, "
                        f"{100 * rows[-1]['hbm_roofline_fraction']:.1f}% of HBM roofline")
        del executor
        release(run)


def decode_row(run: Run, executor, size: int, context: int, steps: int, warmups: int) -> dict:
    """Median decode step of `size` sequences (graphs where they fit), and its share of the roofline."""
    step = functools.partial(executor.execute, decode_batch(size, context, executor.block_size))
    for _ in range(warmups):
        step()
    ms = median_ms(run, step, steps)
    weight_bytes, kv_bytes = bytes_read(executor, size, context)
    return {"batch": size, "ms": ms, "tokens_per_s": size / ms * 1e3, "weight_bytes": weight_bytes,
            "kv_bytes": kv_bytes, "hbm_roofline_fraction": (weight_bytes + kv_bytes) / (ms / 1e3) / peak_bandwidth(run.target)}


def section_graphs(run: Run) -> None:
    """Graph replay vs eager launches of one executor (its `graphs` set aside), steps alternating:
    decode steps per batch size, and a mixed step (a prefill chunk beside three decodes)."""
    from kiln.runtime.gpu_executor import warmup_batches

    context, steps, warmups = decode_settings(run)
    chunk = 8 if run.dry_run else 200
    run.put("captured", not run.dry_run)
    rows: list[dict] = []
    for name in run.models:
        executor = gpu_executor(run, artifact(run, checkpoint(run, name), run.target), enforce_eager=False)
        batches = [(f"decode B={size}", size, decode_batch(size, context, executor.block_size)) for size in run.batches]
        blocks = -(-(chunk + 1) // executor.block_size)
        mixed = warmup_batches([chunk, 1, 1, 1], executor.block_size, blocks, len(executor.cache_groups))[0]
        batches.append((f"mixed T={chunk + 3} B=4", 4, mixed))
        for label, size, batch in batches:
            rows.append({"model": name, "step": label, **graphs_row(run, executor, size, batch, steps, warmups)})
            run.put("rows", rows)
            run.summary(f"{name} {label}: graphs {rows[-1]['graphs_ms']:.3f} ms, eager {rows[-1]['eager_ms']:.3f} ms "
                        f"({rows[-1]['speedup']:.2f}x); host {100 * rows[-1]['host_fraction']:.0f}% of a graphed step "
                        f"(goal <= {100 * HOST_FRACTION_GOAL:.0f}% at batch 1)")
        del executor
        release(run)


def graphs_row(run: Run, executor, size: int, batch, steps: int, warmups: int) -> dict:
    """Median step of `batch` (`size` sequences) replaying graphs and launching eagerly, alternating."""
    graphs, step = executor.graphs, functools.partial(executor.execute, batch)
    times: dict[str, list[float]] = {"graphs": [], "eager": []}
    for _ in range(warmups + steps):  # the first rounds warm up
        for mode in times:
            executor.graphs = graphs if mode == "graphs" else None
            times[mode].append(median_ms(run, step, 1))
    executor.graphs = graphs
    graphs_ms, eager_ms = (statistics.median(t[warmups:]) for t in times.values())
    host_ms = host_time_ms(run, step, steps)
    return {"batch": size, "graphs_ms": graphs_ms, "eager_ms": eager_ms, "speedup": eager_ms / graphs_ms,
            "graphs_host_ms": host_ms, "host_fraction": host_ms / graphs_ms, "host_fraction_goal": HOST_FRACTION_GOAL}


HOST_FRACTION_GOAL = 0.10  # host time of a graphed step at batch 1 <= 10% of its time (issue 16)


def host_time_ms(run: Run, fn, steps: int) -> float:
    """Median milliseconds the host spends in `fn()` before it returns (the device synchronized
    before each call, not after): the step's host time, which a replay overlaps with the GPU's."""
    times = []
    for _ in range(steps):
        run.sync()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    run.sync()
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------- 5: prefill attention vs SDPA

def attention_inputs(run: Run, heads: int, kv_heads: int, head_dim: int, seqs: int, length: int):
    """q [T, H, D], K/V [B, S, Hkv, D] and the same K/V in a paged cache, bf16 on the device."""
    import torch

    from kiln.codegen.kernels.attention_reference import make_paged_step

    gen = torch.Generator().manual_seed(4)
    num_blocks = seqs * -(-length // 16) + 4
    step = make_paged_step([length] * seqs, [length] * seqs, 16, num_blocks, gen, device=run.device)
    q, k, v = (torch.randn(shape, generator=gen).to(torch.bfloat16).to(run.device)
               for shape in ((seqs * length, heads, head_dim), (seqs, length, kv_heads, head_dim),
                             (seqs, length, kv_heads, head_dim)))
    caches = []
    for x in (k, v):
        cache = torch.zeros(num_blocks, 16, kv_heads, head_dim, dtype=torch.bfloat16, device=run.device)
        cache.view(-1, kv_heads, head_dim)[step.slot_mapping.long()] = x.reshape(-1, kv_heads, head_dim)
        caches.append(cache)
    return q, k, v, caches, step


def attention_shape(run: Run, name: str) -> dict:
    """kiln's attention_prefill vs SDPA (flash on a GPU) on one model's attention shape."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kiln.codegen.kernels import attention_prefill
    from kiln.codegen.kernels.attention import AttentionParams
    from kiln.codegen.targets import get_target

    config = model_config(run, name)
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    seqs, length, repeats = (1, 40, 1) if run.dry_run else (4, 2048, 20)
    q, k, v, (k_cache, v_cache), step = attention_inputs(run, heads, kv_heads, head_dim, seqs, length)
    variant = attention_prefill.choose(get_target(run.target), AttentionParams("bf16", heads, kv_heads, head_dim, 16))
    out = torch.empty_like(q)
    kiln = lambda: attention_prefill.launch(variant, q, k_cache, v_cache, step.query_start,  # noqa: E731
                                            step.seq_lens, step.block_tables, out=out)
    q4 = q.view(seqs, length, heads, head_dim).transpose(1, 2)
    k4, v4 = (x.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2) for x in (k, v))
    backend = SDPBackend.MATH if run.dry_run else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True)  # noqa: E731
        expected = sdpa().transpose(1, 2).reshape(q.shape)  # also the warm-up
        sdpa_ms = median_ms(run, sdpa, repeats)
    kiln()  # the warm-up: Triton compiles the kernel for this GPU here
    kiln_ms = median_ms(run, kiln, repeats)
    flops = 4 * heads * head_dim * seqs * length * (length + 1) / 2  # QK^T and PV over the causal pairs
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "seqs": seqs, "tokens_per_seq": length,
            "sdpa_backend": backend.name, "kiln_ms": kiln_ms, "sdpa_ms": sdpa_ms,
            "kiln_tflops": flops / kiln_ms / 1e9, "sdpa_tflops": flops / sdpa_ms / 1e9,
            "kiln_vs_sdpa": sdpa_ms / kiln_ms, "max_abs_diff_vs_sdpa": (out.float() - expected.float()).abs().max().item()}


def section_attention(run: Run) -> None:
    rows = {}
    for name in run.models:
        figures = rows[name] = attention_shape(run, name)
        run.put("shapes", rows)
        run.summary(f"{name} attention (h{figures['heads']}/kv{figures['kv_heads']}/d{figures['head_dim']}): kiln "
                    f"{figures['kiln_tflops']:.1f} TFLOP/s, SDPA {figures['sdpa_backend'].lower()} "
                    f"{figures['sdpa_tflops']:.1f} TFLOP/s ({figures['kiln_vs_sdpa']:.2f}x), max |diff| "
                    f"{figures['max_abs_diff_vs_sdpa']:.3f}")
    run.record["passed"] = all(r["max_abs_diff_vs_sdpa"] < 0.05 for r in rows.values())
