"""Sparse attention: what bounded cache groups save in KV memory, and what block-sparse layouts
save in decode time.

1. KV bytes one sequence holds at 8k and 32k context for Gemma-3-270M (its real config, traced;
   3 full + 15 sliding-window layers of window 512): its cache groups against the same model
   with every layer full. The KV manager itself (runtime/kv_cache.py) runs the sequence: the
   prompt prefilled in chunks of 2048 tokens, then decode steps; held = blocks after the last
   step, peak = the most held at any step.
2. Decode attention time at 8k context on the CPU path for block-sparse layouts of density about
   1/2, 1/4, 1/8 against dense (bench/sparse_decode.py), and the KV tiles the generated GPU decode
   kernel visits, counted under the Triton interpreter (bench/sparse_tiles.py).

    python bench/sparse.py [--skip-decode] [--skip-tiles]

Prints tables and writes bench/results/sparse.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from kiln.process import enable_interpreter

enable_interpreter()  # the tile counts run the GPU kernels interpreted: before anything imports triton

from sparse_decode import LAYOUTS, decode_times  # noqa: E402  (bench/ scripts: the script's folder is on sys.path)
from sparse_tiles import visited_tiles  # noqa: E402

from kiln.frontend import load_checkpoint, trace  # noqa: E402
from kiln.ir.cache_groups import plan_cache_groups  # noqa: E402
from kiln.models import build_spec  # noqa: E402
from kiln.runtime import kv_groups  # noqa: E402
from kiln.runtime.kv_cache import KVCacheManager  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sparse.json"
CHUNK = 2048


def kv_bytes_per_sequence(groups, context: int, decode_steps: int = 64) -> dict:
    """Bytes one sequence holds (and at most held) over a prefill to `context` - decode_steps
    tokens and `decode_steps` decodes, with `groups` sharing a pool."""
    block_bytes, bs = kv_groups.block_bytes(groups), groups[0].block_size
    kv = KVCacheManager(1 << 22, bs, enable_prefix_caching=False, groups=groups)
    peak, done, prompt = 0, 0, context - decode_steps
    while done < context:
        end = min(done + CHUNK, prompt) if done < prompt else done + 1
        kv.allocate("s", end)
        peak = max(peak, kv.num_held_blocks("s"))
        kv.release_unreachable("s", end)
        done = end
    return {"held_bytes": kv.num_held_blocks("s") * block_bytes, "peak_bytes": peak * block_bytes}


def gemma_kv(contexts=(8192, 32768)) -> list[dict]:
    ckpt = load_checkpoint("gemma3-270m", progress=False)
    graph = trace(build_spec(ckpt.config))
    grouped = plan_cache_groups(graph, max_model_len=ckpt.config["max_position_embeddings"])
    all_full = plan_cache_groups(graph, max_model_len=1)  # every window reaches the whole context
    rows = []
    for context in contexts:
        mine, full = kv_bytes_per_sequence(grouped, context), kv_bytes_per_sequence(all_full, context)
        rows.append({"context": context, "groups": len(grouped), **mine, "all_full_held_bytes": full["held_bytes"],
                     "ratio": mine["held_bytes"] / full["held_bytes"],
                     "peak_ratio": mine["peak_bytes"] / full["peak_bytes"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-decode", action="store_true", help="skip the CPU decode timings")
    parser.add_argument("--skip-tiles", action="store_true", help="skip the interpreted GPU tile counts")
    args = parser.parse_args()
    result = {"machine": {"cpu": _cpu_name(), "python": platform.python_version()}}
    print("Gemma-3-270M KV bytes per sequence (f32 cache), cache groups vs every layer full:")
    result["gemma3_270m_kv"] = gemma_kv()
    for row in result["gemma3_270m_kv"]:
        print(f"  {row['context']:>6} tokens: held {row['held_bytes'] / 2**20:7.1f} MiB vs "
              f"{row['all_full_held_bytes'] / 2**20:7.1f} MiB all full = {row['ratio']:.3f}x "
              f"(peak while prefilling {row['peak_ratio']:.3f}x)")
    if not args.skip_decode:
        print("CPU decode attention at 8k context, batch 4, 32 heads / 8 kv heads of 128 (bench/sparse_decode.py):")
        result["cpu_decode"] = decode_times()
        for name, row in result["cpu_decode"].items():
            print(f"  {name:<11} density {row.get('density', 1.0):.3f}: {row['ms']:8.2f} ms = "
                  f"{row.get('vs_dense', 1.0):.3f}x dense (goal <= {row.get('goal_ms', row['ms']):.2f} ms)")
    if not args.skip_tiles:
        print("GPU decode kernel (h100 tiles, interpreted), KV tiles visited at 8k context (bench/sparse_tiles.py):")
        result["gpu_tiles"] = {name: visited_tiles(layout, 8192) for name, layout in {"dense": None, **LAYOUTS}.items()}
        for name, row in result["gpu_tiles"].items():
            print(f"  {name:<11} {row['visited_tiles']:4} of {row['dense_tiles']} tiles")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
