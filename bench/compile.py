"""Compile time of a model for every target, cold and warm, and each GPU target's kernel table.

Cold: a fresh process with empty kiln and Triton caches (tracing, passes, weight loading and
conversion, kernel rendering and cross-compilation, writing the artifact). Warm: a second fresh
process on the same caches (`compile_cached` finds and validates the artifact). Each figure
includes the process's Python imports. Per GPU target it also reports the kernels, their
registers / spills / shared memory (from `cuobjdump -res-usage` and `ptxas -v`), and the
launches per decoder layer.

    python bench/compile.py [--model smollm2-135m] [--targets a100 l40s h100 h200 b200 cpu]
    python bench/compile.py --targets b200 --verify-interpreted   # + the whole b200 artifact, interpreted

--verify-interpreted runs a short mixed step and a decode step through the b200 artifact's own
program with its kernels under TRITON_INTERPRET=1 (about a minute per step for SmolLM2's 30
layers), and compares its logits with the cpu target's fp32 and bf16 programs.

Prints the figures and writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compile.json"
_COMPILE = """
import json, sys, time
start = time.perf_counter()
from kiln.compiler import CompileOptions, compile_cached
summary = compile_cached(sys.argv[1], CompileOptions(target=sys.argv[2]), progress=False)
print(json.dumps({"artifact": str(summary.artifact), "cached": summary.cached,
                  "seconds_in_process": time.perf_counter() - start, "lines": summary.lines()}))
"""


def compile_once(model: str, target: str, env: dict) -> dict:
    """Runs one compile in a fresh process; returns its summary and the wall time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _COMPILE, model, target], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"compiling {model} for {target} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start}


def kernel_rows(manifest: dict) -> list[dict]:
    return [{"kernel": name, "kind": entry["kind"], "warps": entry["num_warps"], "stages": entry["num_stages"],
             **entry["resources"]} for name, entry in sorted(manifest.get("kernels", {}).items())]


def measure(model: str, target: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-compile-") as caches:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        env.update(KILN_CACHE_DIR=str(Path(caches) / "kiln"), TRITON_CACHE_DIR=str(Path(caches) / "triton"))
        cold, warm = compile_once(model, target, env), compile_once(model, target, env)
        manifest = json.loads((Path(cold["artifact"]) / "manifest.json").read_text())
    if cold["cached"] or not warm["cached"]:
        raise SystemExit(f"{target}: the warm compile missed the compile cache (did kiln's source change meanwhile?)")
    kernels = kernel_rows(manifest)
    return {
        "cold_s": round(cold["wall_s"], 2), "warm_s": round(warm["wall_s"], 2),
        "cold_in_process_s": round(cold["seconds_in_process"], 2), "warm_in_process_s": round(warm["seconds_in_process"], 2),
        "launches_per_layer": {phase: info["launches_per_layer"] for phase, info in manifest["graph"].items()},
        "kernels": len(kernels), "spilling_kernels": sum(1 for k in kernels if k["spill_stores"] + k["spill_loads"]),
        "kernel_table": kernels, "summary": cold["lines"],
    }


def verify_interpreted(model: str) -> dict:
    """The whole b200 artifact's program, kernels interpreted, vs the cpu target's programs."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from kiln.compiler import CompileOptions, compile_cached
    from kiln.ir.step import PagedSequences
    from kiln.runtime.artifact import load_artifact
    from kiln.runtime.executor import CpuExecutor
    from kiln.runtime.gpu_executor import GpuExecutor
    from kiln.runtime.step_batch import StepBatch

    def executor(target: str, dtype: str):
        artifact = load_artifact(compile_cached(model, CompileOptions(target=target, dtype=dtype), progress=False).artifact)
        if target == "cpu":
            return CpuExecutor(artifact, kv_cache_memory=64 << 20, max_model_len=512)
        return GpuExecutor(artifact, interpret=True, kv_cache_memory=64 << 20, max_model_len=512)

    logits = {}
    for name, target, dtype in (("b200", "b200", "bf16"), ("cpu-f32", "cpu", "f32"), ("cpu-bf16", "cpu", "bf16")):
        run = executor(target, dtype)
        pages = PagedSequences(run.num_blocks, run.block_size, seed=5)
        batches = [StepBatch(**pages.step([("a", [1, 504, 3353, 282, 4649, 314, 253, 3881]), ("b", [1, 2, 3])]),
                             num_decodes=0),
                   StepBatch(**pages.step([("a", [30]), ("b", [4])]), num_decodes=2)]
        start = time.perf_counter()
        logits[name] = [run.execute(batch).float() for batch in batches]
        print(f"{name}: {time.perf_counter() - start:.1f} s for a mixed and a decode step")
    report = []
    for step, (got, exact, same_dtype) in enumerate(zip(logits["b200"], logits["cpu-f32"], logits["cpu-bf16"])):
        report.append({"step": step, "b200_interpreted_max_error": (got - exact).abs().max().item(),
                       "cpu_bf16_max_error": (same_dtype - exact).abs().max().item(),
                       "greedy_tokens_equal": bool(torch.equal(got.argmax(-1), exact.argmax(-1)))})
    return {"steps": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", nargs="+", default=["a100", "l40s", "h100", "h200", "b200", "cpu"])
    parser.add_argument("--verify-interpreted", action="store_true")
    args = parser.parse_args()
    results = {"model": args.model, "cpus": os.cpu_count(), "targets": {}}
    for target in args.targets:
        figures = results["targets"][target] = measure(args.model, target)
        print(f"\n{target}: cold {figures['cold_s']:.1f} s, warm {figures['warm_s']:.1f} s (wall, with imports); "
              f"{figures['kernels']} kernels, {figures['spilling_kernels']} spilling")
        print("\n".join(figures["summary"]))
    if args.verify_interpreted:
        results["verify_interpreted"] = verify_interpreted(args.model)
        print(json.dumps(results["verify_interpreted"], indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
