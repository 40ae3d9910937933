"""Quantized weights on the CPU, side by side in one run, every engine on the same cores and threads:
kiln on SmolLM2's Q4_1 GGUF file kept quantized (`kiln compile`'s default, int16 activations at
batch 1; with `--quant-activations fp32`, "kiln-q4-fp32a", exact; with `--quant-activations int8`,
"kiln-q4-int8a", llama.cpp's scheme), kiln on the same file dequantized to fp32
(`--dequantize`), llama.cpp on the same file (llama-cpp-python; skipped with a note when it is
not importable) and on an F32 GGUF of the same values (written once from the
dequantized tensors with gguf-py, `--no-f32-gguf` leaves it out), and transformers fp32 (the
GGUF converted to an HF directory, as bench/offline.py does).

Figures, each the median of `--repeats` runs interleaved across the engines (run r of every
engine, then run r + 1), greedy, ignore_eos, on random prompt ids (speed does not depend on them):
  decode     batch-1 decode tok/s over `--new-tokens` tokens after a 32-token prompt, from the
             first generated token to the last (the prefill excluded); the child's peak RSS is
             the "batch 1" RSS
  prefill    tok/s of one forward over a 512-token prompt (the first token's latency)
  batch8     total output tok/s of 8 requests of `--new-tokens` tokens each, prefills included
             (kiln: continuous batching; transformers: one padded `generate`)
Every measurement runs in its own child process (a warm-up of the same shape first, on another
prompt); its peak RSS is the child's own high-water mark (VmHWM, read as it ends: the ru_maxrss
that wait4 reports for a child is at least its parent's RSS at the spawn, here the compiler's).
On a shared machine each run first waits for the others' load to drop (`--quiet-threshold`,
`--max-wait`), and is rerun (`--retries`) when other processes kept more of the machine busy
while it was timed (`others_busy`: the machine's busy time from /proc/stat less the child's own
CPU time, over all cores' time). Also: artifact sizes against the GGUF file's, the CPU's
model name and SIMD flags, and the ratios the issue's goals name.

    python bench/quant.py [--quick] [--threads 2] [--repeats 3] [--new-tokens 128]

Prints a table and writes bench/results/quant.json.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_description, cpu_label

from kiln.process import cache_dir

MODEL = "smollm2-135m"
RESULTS = Path(__file__).parent / "results" / "quant.json"
KV_CACHE_MEMORY = 256 << 20  # kiln's KV budget: >= batch 8 x (32 + 128) tokens and a 512-token prompt
MAX_MODEL_LEN = 2048
PROMPT_LEN, PREFILL_LEN, BATCH = 32, 512, 8
MB = 1e6
RSS_ALLOWANCE = 300 * MB  # the goal: peak RSS at batch 1 <= weights + KV cache + 300 MB
ENGINES = ("kiln-q4", "kiln-q4-fp32a", "kiln-q4-int8a", "kiln-f32", "llama.cpp-Q4_1", "llama.cpp-F32",
           "transformers-fp32")
ACTIVATION_VARIANTS = ("kiln-q4-fp32a", "kiln-q4-int8a")  # differ from kiln-q4 at one row of x only
TASKS = {"decode": ENGINES, "prefill": tuple(e for e in ENGINES if e not in ACTIVATION_VARIANTS),
         "batch8": ("kiln-q4", "kiln-f32", "transformers-fp32")}
GOALS = {  # ratio name -> (numerator, denominator, figure, at least)
    "kiln_q4_vs_llama_cpp_q4_1_batch1": ("kiln-q4", "llama.cpp-Q4_1", "decode", 1.0),
    "kiln_f32_vs_llama_cpp_f32_batch1": ("kiln-f32", "llama.cpp-F32", "decode", 1.0),
    "kiln_q4_vs_transformers_batch8": ("kiln-q4", "transformers-fp32", "batch8", 2.0),
    "kiln_f32_vs_transformers_batch8": ("kiln-f32", "transformers-fp32", "batch8", 2.0),
}
REFERENCE_RATIOS = {  # printed beside the goals: the other activation modes against llama.cpp
    "kiln_q4_fp32a_vs_llama_cpp_q4_1_batch1": ("kiln-q4-fp32a", "llama.cpp-Q4_1", "decode"),
    "kiln_q4_int8a_vs_llama_cpp_q4_1_batch1": ("kiln-q4-int8a", "llama.cpp-Q4_1", "decode"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prompts(seed: int, vocab: int = 49152) -> dict[str, list]:
    """Random prompt ids per task; 'warmup_*' of the same shapes (other ids: no prefix reuse)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    shapes: dict[str, Callable[[], list]] = {"decode": lambda: ids(PROMPT_LEN), "prefill": lambda: ids(PREFILL_LEN),
                                             "batch8": lambda: [ids(PROMPT_LEN) for _ in range(BATCH)]}
    return {prefix + task: make() for prefix in ("", "warmup_") for task, make in shapes.items()}


# --- the child: one engine, one task ----------------------------------------------------------------------

def kiln_engine(artifact: str):
    """(decode, prefill, batch8) callables over kiln.LLM on `artifact`, and what the RSS bound needs."""
    import kiln
    from kiln.runtime import kv_groups

    import_rss = vm_hwm_bytes()  # python, torch and kiln: what the RSS goal's 300 MB must hold
    llm = kiln.LLM(artifact, kv_cache_memory=KV_CACHE_MEMORY, max_model_len=MAX_MODEL_LEN,
                   enable_prefix_caching=False, progress=False)
    params = lambda n: kiln.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731

    def decode(prompt: list[int], n: int) -> tuple[int, float]:
        times = [time.perf_counter() for _ in llm.stream(prompt, params(n))]
        return len(times) - 1, times[-1] - times[0]

    def prefill(prompt: list[int]) -> None:
        llm.generate([prompt], params(1))

    def batch(prompts_: list[list[int]], n: int) -> int:
        return sum(len(out.outputs[0].token_ids) for out in llm.generate(prompts_, params(n)))

    executor, execute = llm.executor, llm.executor.execute
    steps_by_threads: collections.Counter = collections.Counter()  # fewer threads when other processes are busy

    def counted(step_batch):
        logits = execute(step_batch)
        steps_by_threads[str(executor.step_threads)] += 1
        return logits

    executor.execute = counted
    extra = {"kv_bytes_per_block": kv_groups.block_bytes(executor.cache_groups), "block_size": executor.block_size,
             "weights_bytes": (Path(artifact) / "weights.safetensors").stat().st_size, "steps_by_threads": steps_by_threads,
             "import_rss_bytes": import_rss}
    return decode, prefill, batch, extra


def llama_engine(gguf_file: str, threads: int):
    from llama_cpp import Llama

    llm = Llama(gguf_file, n_ctx=MAX_MODEL_LEN, n_batch=PREFILL_LEN, n_ubatch=PREFILL_LEN, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def decode(prompt: list[int], n: int) -> tuple[int, float]:  # generate() never stops at EOS by itself
        times = [time.perf_counter() for _ in itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, reset=True), n)]
        return len(times) - 1, times[-1] - times[0]

    def prefill(prompt: list[int]) -> None:
        llm.reset()
        llm.eval(prompt)

    return decode, prefill, None, {}


def hf_engine(hf_dir: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.set_grad_enabled(False)

    def decode(prompt: list[int], n: int) -> tuple[int, float]:
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        for _ in range(n - 1):
            out = model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        return n - 1, time.perf_counter() - start

    def prefill(prompt: list[int]) -> None:
        model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)

    def batch(prompts_: list[list[int]], n: int) -> int:
        ids = torch.tensor(prompts_)  # equal lengths: no padding
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    return decode, prefill, batch, {}


def child(spec: dict) -> dict:
    """Runs one measurement (spec: engine, task, path, threads, new_tokens, seed) after a warm-up."""
    start = time.perf_counter()
    engine = spec["engine"]
    if engine.startswith("llama.cpp"):  # without torch: its import alone is ~300 MB of RSS
        decode, prefill, batch, extra = llama_engine(spec["path"], spec["threads"])
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        make = kiln_engine if engine.startswith("kiln") else hf_engine
        decode, prefill, batch, extra = make(spec["path"])
    result = {"load_s": time.perf_counter() - start, **extra}
    ids, n, task = prompts(spec["seed"]), spec["new_tokens"], spec["task"]
    {"decode": lambda: decode(ids["warmup_decode"], 8), "prefill": lambda: prefill(ids["warmup_prefill"]),
     "batch8": lambda: batch(ids["warmup_batch8"], 4)}[task]()
    machine, own, start = cpu_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    if task == "decode":
        tokens, seconds = decode(ids["decode"], n)  # the prefill left out
    elif task == "prefill":
        prefill(ids["prefill"])
        tokens, seconds = PREFILL_LEN, None
    else:
        tokens, seconds = batch(ids["batch8"], n), None
    wall, others = time.perf_counter() - start, cpu_busy_seconds() - machine - (sum(os.times()[:2]) - own)
    result.update(tokens_per_s=tokens / (seconds or wall), tokens=tokens, context_tokens=PROMPT_LEN + n,
                  others_busy=max(0.0, others) / (wall * (os.cpu_count() or 1)))
    result["peak_rss_bytes"] = vm_hwm_bytes()
    return result


def vm_hwm_bytes() -> int:
    """This process's peak resident memory since exec (Linux: VmHWM in /proc/self/status, kB)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024


# --- the parent: files, children, table ---------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    """`child(spec)` in a fresh process, and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{spec['engine']} {spec['task']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - start}


def write_f32_gguf(src: Path, dst: Path) -> None:
    """An F32 GGUF of `src`'s values: every tensor dequantized (gguf.quants), every metadata field
    copied but the file type; llama.cpp's own layout (permuted q/k rows) stays as stored."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst) + ".part", str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(dst) + ".part", dst)


def prepare(args) -> tuple[dict[str, str], dict]:
    """The file each engine loads (compiled, converted or written when missing) and their sizes."""
    from kiln.compile_cache import CompileOptions, compile_cached
    from kiln.frontend.checkpoint import resolve_model_path

    gguf_file = resolve_model_path(MODEL)
    cache = cache_dir("bench-quant")
    cache.mkdir(parents=True, exist_ok=True)
    paths = {"llama.cpp-Q4_1": str(gguf_file)}
    for engine, options in (("kiln-q4", {}), ("kiln-q4-fp32a", {"quant_activations": "fp32"}),
                            ("kiln-q4-int8a", {"quant_activations": "int8"}), ("kiln-f32", {"dequantize": True})):
        log(f"compiling {MODEL} for {engine} (through the compile cache)")
        summary = compile_cached(MODEL, CompileOptions(target="cpu", **options), progress=False)
        paths[engine] = str(summary.artifact)
        log("  " + "\n  ".join(summary.lines()))
    hf_dir = cache / f"hf-{MODEL}"
    if not (hf_dir / "model.safetensors").exists():
        log(f"converting {gguf_file.name} to an HF directory for transformers: {hf_dir}")
        from kiln.frontend import load_checkpoint, save_hf_dir

        save_hf_dir(load_checkpoint(MODEL, progress=False), hf_dir)
    paths["transformers-fp32"] = str(hf_dir)
    if not args.no_f32_gguf:
        f32 = cache / (gguf_file.stem.rsplit(".", 1)[0] + ".F32.gguf")
        if not f32.exists():
            log(f"writing an F32 GGUF for llama.cpp: {f32}")
            write_f32_gguf(gguf_file, f32)
        paths["llama.cpp-F32"] = str(f32)
    sizes = {"gguf_q4_1": gguf_file.stat().st_size}
    for engine in ("kiln-q4", "kiln-f32"):
        files = [p for p in Path(paths[engine]).rglob("*") if p.is_file()]
        sizes[f"{engine}_artifact"] = sum(p.stat().st_size for p in files)
        sizes[f"{engine}_weights"] = (Path(paths[engine]) / "weights.safetensors").stat().st_size
    return paths, sizes


def cpu_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (Linux: /proc/stat, idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]  # guest time is in user
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(threshold: float, max_wait: float) -> None:
    """Waits (up to `max_wait` s) until other processes keep at most `threshold` of all cores busy."""
    deadline, waited = time.monotonic() + max_wait, False
    while True:
        before = cpu_busy_seconds()
        time.sleep(2.0)
        busy = (cpu_busy_seconds() - before) / (2.0 * (os.cpu_count() or 1))
        if busy <= threshold or time.monotonic() > deadline:
            break
        if not waited:
            log(f"the machine is {busy:.0%} busy: waiting up to {max_wait:.0f} s for it to quieten")
        waited = True


def rss_bound(run: dict) -> float:
    """The goal's peak-RSS bound of a kiln decode run: weights + the KV blocks it holds + 300 MB."""
    blocks = math.ceil(run["context_tokens"] / run["block_size"])
    return run["weights_bytes"] + blocks * run["kv_bytes_per_block"] + RSS_ALLOWANCE


def summarize(runs: list[dict], sizes: dict, quiet: float) -> dict:
    """Medians per (engine, task) of the runs timed beside at most `quiet` of others' load (all
    runs when none was), the goals' ratios and the size / RSS checks."""
    medians: dict[str, dict] = {}
    for engine in ENGINES:
        for task in TASKS:
            mine = [r for r in runs if r["engine"] == engine and r["task"] == task]
            used = [r for r in mine if r["others_busy"] <= quiet] or mine
            if used:
                figures = medians.setdefault(engine, {})
                figures[f"{task}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in used)
                figures[f"{task}_runs_used"] = len(used)
                if task == "decode":
                    figures["decode_peak_rss_mb"] = statistics.median(r["peak_rss_bytes"] for r in used) / MB
    ratios = {}
    for name, (num, den, task, goal) in GOALS.items():
        key = f"{task}_tokens_per_s"
        if key in medians.get(num, {}) and key in medians.get(den, {}):
            value = medians[num][key] / medians[den][key]
            ratios[name] = {"ratio": value, "goal": goal, "met": value >= goal}
    for name, (num, den, task) in REFERENCE_RATIOS.items():
        key = f"{task}_tokens_per_s"
        if key in medians.get(num, {}) and key in medians.get(den, {}):
            ratios[name] = {"ratio": medians[num][key] / medians[den][key]}
    for engine in ("kiln-q4", "kiln-f32"):
        value = sizes[f"{engine}_artifact"] / sizes["gguf_q4_1"]
        ratios[f"{engine}_artifact_vs_gguf"] = ({"ratio": value, "goal": 1.15, "met": value <= 1.15}
                                               if engine == "kiln-q4" else {"ratio": value})  # f32: for reference
        decode = [r for r in runs if r["engine"] == engine and r["task"] == "decode"]
        if decode:
            bound, peak = rss_bound(decode[0]) / MB, medians[engine]["decode_peak_rss_mb"]
            ratios[f"{engine}_rss_vs_bound"] = {"ratio": peak / bound, "bound_mb": bound, "goal": 1.0, "met": peak <= bound,
                                                "import_rss_mb": decode[0]["import_rss_bytes"] / MB}
    return {"medians": medians, "ratios": ratios}


def table(summary: dict, sizes: dict) -> str:
    medians = summary["medians"]
    engines = [e for e in ENGINES if e in medians]
    rows = [("batch-1 decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("peak RSS MB (batch 1)", "decode_peak_rss_mb", "{:,.0f}"),
            (f"prefill {PREFILL_LEN} tokens, tok/s", "prefill_tokens_per_s", "{:.0f}"),
            (f"batch-{BATCH} total tok/s", "batch8_tokens_per_s", "{:.1f}")]
    lines = ["| | " + " | ".join(engines) + " |", "| --- " * (len(engines) + 1) + "|"]
    for label, key, fmt in rows:
        cells = [fmt.format(medians[e][key]) if key in medians[e] else "—" for e in engines]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    artifacts = (f"{e} {sizes[f'{e}_artifact'] / MB:.1f} MB (weights {sizes[f'{e}_weights'] / MB:.1f} MB)"
                 for e in ("kiln-q4", "kiln-f32"))
    lines.append(f"GGUF file {sizes['gguf_q4_1'] / MB:.1f} MB; artifacts: " + ", ".join(artifacts))
    for name, r in summary["ratios"].items():
        if "goal" not in r:
            lines.append(f"{name}: {r['ratio']:.2f}")
            continue
        extra = f" (bound {r['bound_mb']:.0f} MB; imports alone {r['import_rss_mb']:.0f} MB)" if "bound_mb" in r else ""
        relation = "<=" if name.endswith(("_vs_gguf", "_vs_bound")) else ">="
        lines.append(f"{name}: {r['ratio']:.2f} (goal {relation} {r['goal']:g}{extra}): {'met' if r['met'] else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 new tokens, one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-f32-gguf", action="store_true", help="leave out llama.cpp on an F32 GGUF")
    parser.add_argument("--quiet-threshold", type=float, default=0.15,
                        help="before each run, wait until the machine is at most this busy (fraction of all cores)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for that before running anyway")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a run while others kept the machine busier")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.repeats, args.new_tokens = 1, 16
    cpu = cpu_description()
    log(f"CPU: {cpu_label(cpu)}, {cpu['cores']} cores, flags {' '.join(cpu['simd_flags'])}; {args.threads} threads each")
    paths, sizes = prepare(args)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        log(f"note: llama.cpp left out, llama_cpp is not importable ({error}): build llama-cpp-python as ENVIRONMENT.md says")
        paths = {e: p for e, p in paths.items() if not e.startswith("llama.cpp")}
    runs = []
    for repeat in range(args.repeats):
        for task, engines in TASKS.items():
            for engine in (e for e in engines if e in paths):
                spec = {"engine": engine, "task": task, "path": paths[engine], "threads": args.threads,
                        "new_tokens": args.new_tokens, "seed": args.seed + repeat}
                for attempt in range(1 + args.retries):
                    wait_for_quiet(args.quiet_threshold, args.max_wait)
                    run = {**spec, "attempt": attempt, **run_child(spec)}
                    log(f"run {repeat + 1}/{args.repeats} {task:7} {engine:17} {run['tokens_per_s']:8.1f} tok/s, peak RSS "
                        f"{run['peak_rss_bytes'] / MB:,.0f} MB (load {run['load_s']:.1f} s, {run['wall_s']:.1f} s in all; "
                        f"others kept {run['others_busy']:.0%} of the machine busy"
                        + (f"; kiln steps by threads {dict(run['steps_by_threads'])})" if "steps_by_threads" in run else ")"))
                    if run["others_busy"] <= args.quiet_threshold:
                        break
                runs.append(run)  # the last attempt
    summary = summarize(runs, sizes, args.quiet_threshold)
    busy = sum(r["others_busy"] > args.quiet_threshold for r in runs)
    print(f"\nSmolLM2-135M-Instruct, {cpu_label(cpu)} ({' '.join(cpu['simd_flags'])}), {args.threads} threads, greedy, "
          f"{args.new_tokens} new tokens, medians of {args.repeats} interleaved runs ({busy} of {len(runs)} timed beside "
          f"other processes keeping > {args.quiet_threshold:.0%} of the machine busy: left out where others were not)\n")
    print(table(summary, sizes))
    result = {"model": MODEL, "cpu": cpu, "threads": args.threads, "args": vars(args), "files": paths, "sizes": sizes,
              **summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
