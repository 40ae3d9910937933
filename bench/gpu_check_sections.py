"""The sections of the device check (bench/gpu_check.py, whose docstring says what each
measures) and what they share: the run record, checkpoints and artifacts built on the machine,
comparisons. The timing sections (4 decode, 5 attention, 6 graphs) are in gpu_check_timing.py.
`run_section_here` is the body of one section's process."""


from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SECTIONS = {1: "gpu_tests", 2: "kernels", 3: "models", 4: "decode", 5: "attention", 6: "graphs", 7: "startup"}
LLAMA = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
SHAPES = {  # the real models' widths; 4 layers and a 32k vocabulary
    "llama-3.2-1b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=1024)
BATCHES = (1, 8, 64)
SECTION_CAPS_S = {1: 120}  # section 1's cap, so that a hanging test leaves time for the other sections
# what a dry run's section processes find imported (see section_processes)
PRELOAD = ["torch", "triton", "transformers.models.llama.modeling_llama", "kiln.compiler", "kiln.runtime.executor",
           "kiln.runtime.gpu_executor", "pytest"]


class Run:
    """One section's process: its options, workdir (checkpoints, compile cache) and figures."""

    def __init__(self, args: argparse.Namespace):
        self.dry_run, self.target, self.workdir = args.dry_run, args.target, Path(args.workdir)
        self.t0, self.name = args.t0, SECTIONS[args.section]
        self.path = self.workdir / f"section-{args.section}.json"
        self.record: dict = {"status": "running", "figures": {}, "summary": []}

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {self.name}: {message}", flush=True)

    def put(self, key: str, value) -> None:
        """Records a figure now (a section killed later keeps it)."""
        self.record["figures"][key] = value
        self.save()

    def summary(self, line: str) -> None:
        self.record["summary"].append(line)
        self.say(line)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.record, indent=1, default=float))

    @property
    def models(self) -> list[str]:
        """The SHAPES the model sections run: one in a dry run, where every model is SMALL."""
        return list(SHAPES)[:1] if self.dry_run else list(SHAPES)

    @property
    def batches(self) -> tuple[int, ...]:
        """The decode batch sizes: BATCHES, or 1 and 2 in a dry run."""
        return (1, 2) if self.dry_run else BATCHES

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def sync(self) -> None:
        if not self.dry_run:
            import torch

            torch.cuda.synchronize()


# ---------------------------------------------------------------- models, artifacts, executors

def model_config(run: Run, name: str) -> dict:
    """The HF config of `name` ("small" or a SHAPES key); every model is SMALL in a dry run."""
    if run.dry_run or name == "small":
        return {**LLAMA, **SMALL}
    return {**LLAMA, **SHAPES[name]}


def quiet_transformers():
    """transformers, its progress bars off."""
    import transformers

    transformers.logging.disable_progress_bar()
    return transformers


def checkpoint(run: Run, name: str) -> Path:
    """An HF directory of a random-weight Llama (bf16, seed 0), built once per config in the workdir."""
    config = model_config(run, name)
    path = run.workdir / "checkpoints" / ("small" if config == {**LLAMA, **SMALL} else name)
    if (path / "config.json").exists():
        return path
    import torch

    transformers = quiet_transformers()
    run.say(f"building a random-weight checkpoint {path.name} ({config['num_hidden_layers']} layers, "
            f"hidden {config['hidden_size']})")
    torch.manual_seed(0)
    with torch.device(run.device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    staging = Path(tempfile.mkdtemp(dir=path.parent.parent))
    model.save_pretrained(staging)
    staging.rename(path)
    return path


def artifact(run: Run, ckpt: Path, target: str, dtype: str | None = None) -> Path:
    """The artifact of `ckpt` for `target` through the compile cache of the workdir."""
    from kiln.compiler import CompileOptions, compile_cached

    run.say(f"compiling {ckpt.name} for {target} (or finding it in the compile cache)")
    start = time.perf_counter()
    summary = compile_cached(str(ckpt), CompileOptions(target=target, dtype=dtype), progress=False)
    run.say(f"{ckpt.name} for {target}{'/' + dtype if dtype else ''}: "
            f"{'compile cache' if summary.cached else 'compiled'} in {time.perf_counter() - start:.1f} s")
    return summary.artifact


def gpu_executor(run: Run, path: Path, *, enforce_eager: bool | None = None, max_model_len: int | None = None):
    """A GpuExecutor of the artifact at `path`: on the GPU (30% of its memory), or interpreted."""
    from kiln.runtime.artifact import load_artifact
    from kiln.runtime.gpu_executor import GpuExecutor

    return GpuExecutor(load_artifact(path, check_hashes=False), interpret=run.dry_run, gpu_memory_utilization=0.3,
                       kv_cache_memory=32 << 20, max_model_len=max_model_len or (256 if run.dry_run else 2048),
                       max_num_seqs=max(run.batches), max_num_batched_tokens=256 if run.dry_run else 2048,
                       enforce_eager=enforce_eager)


def release(run: Run) -> None:
    """Frees the device memory of dropped executors and models (an executor and its CUDA graphs
    form a reference cycle): the next executor sizes its KV cache from what is free."""
    gc.collect()
    if not run.dry_run:
        import torch

        torch.cuda.empty_cache()


def bf16_tolerance(exact, same_dtype) -> float:
    """The error a bf16 computation is allowed against fp32 `exact`: twice that of a same-dtype
    reference, plus 4 bf16 ulps at the largest magnitude (the tests' criterion)."""
    import torch

    reference_error = (same_dtype.double() - exact.double()).abs().max().item()
    return 2 * reference_error + 4 * torch.finfo(torch.bfloat16).eps * exact.abs().max().item()


def compare(got, exact, same_dtype) -> dict:
    """Logits [B, V] of kiln vs fp32 `exact` and a bf16 reference: errors, and greedy agreement,
    where a differing token passes only as a near-tie (exact margin within the tolerance)."""
    got, exact, same_dtype = (t.detach().float().cpu() for t in (got, exact, same_dtype))
    tolerance = bf16_tolerance(exact, same_dtype)
    error = (got - exact).abs().max().item()
    mine, theirs = got.argmax(-1), exact.argmax(-1)
    rows = range(len(mine))
    margins = [(exact[r, theirs[r]] - exact[r, mine[r]]).item() for r in rows]
    return {"max_abs_logit_diff": error, "bf16_reference_diff": (same_dtype - exact).abs().max().item(),
            "tolerance": tolerance, "close": error <= tolerance,
            "greedy_agreement": sum(int(mine[r] == theirs[r]) for r in rows) / len(mine),
            "greedy_ok": all(m <= tolerance for m in margins)}


# ---------------------------------------------------------------- 1: the GPU-marked tests

class Outcomes:
    """A pytest plugin that keeps the counts of pytest's summary line and the failures' reports."""

    KINDS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "error": "errors", "deselected": "deselected"}

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.not_passed: list[tuple[str, object]] = []  # ("FAILED" or "ERROR", its report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        stats = terminalreporter.stats
        self.counts = {kind: len(stats[key]) for key, kind in self.KINDS.items() if stats.get(key)}
        self.not_passed = [(kind.upper(), report) for kind in ("failed", "error") for report in stats.get(kind, [])]


def section_gpu_tests(run: Run) -> None:
    """`pytest -m gpu` over the test files that mark any test gpu, in this section's process (its
    imports are already done); counts as pytest's summary line gives them."""
    import pytest

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    run.put("files", files)
    run.say(f"pytest -m gpu on {len(files)} files")
    os.chdir(ROOT)
    outcomes = Outcomes()
    returncode = int(pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", *files], plugins=[outcomes]))
    run.put("counts", outcomes.counts)
    run.put("returncode", returncode)
    run.put("not_passed", [f"{kind} {report.nodeid}" for kind, report in outcomes.not_passed][:20])
    counts = outcomes.counts
    run.record["passed"] = returncode in (0, 5) and not counts.get("failed") and not counts.get("errors")
    if not run.record["passed"]:
        run.put("output_tail", "\n".join(report.longreprtext for _, report in outcomes.not_passed)[-3000:])
    run.summary(", ".join(f"{n} {kind}" for kind, n in counts.items()) or f"pytest exited {returncode}")


# ---------------------------------------------------------------- 2: every kernel of an artifact

def kernel_steps(run: Run, vocab: int) -> list[tuple[str, list]]:
    """(phase, chunks) over one paged cache: sized so that every GEMM bucket (decode <= 16 rows,
    small <= 128, large) runs in both phases, and a long context makes decode split K. A dry
    run's steps are small (the interpreter runs ~100 programs a second): they run part of the table."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    if run.dry_run:
        return [("mixed", [("a", ids(20)), ("b", ids(5))]), ("decode", [("a", ids(1)), ("b", ids(1))]),
                ("mixed", [("a", ids(1)), ("b", ids(3)), ("c", ids(4))])]
    many = [f"s{i}" for i in range(140)]
    return [
        ("mixed", [("a", ids(520)), ("b", ids(40))] + [(s, ids(1)) for s in many]),   # T 700, B 142: large
        ("decode", [(s, ids(1)) for s in ("a", "b", *many)]),                          # B 142: large
        ("decode", [(s, ids(1)) for s in ("a", "b", *many[:18])]),                     # B 20: small, split-K
        ("decode", [("a", ids(1)), ("b", ids(1))]),                                    # B 2: decode bucket
        ("mixed", [("a", ids(1)), ("b", ids(30)), ("d", ids(20))] + [(s, ids(1)) for s in many[:18]]),  # small
        ("mixed", [("a", ids(1)), ("b", ids(5))]),                                     # T 7: decode bucket
    ]


def recording(launcher) -> set[str]:
    """The names of the kernels `launcher` runs from now on."""
    launched: set[str] = set()
    launch = launcher.launch

    def record(kernel, sizes, *args):
        launched.add(kernel.name)
        return launch(kernel, sizes, *args)

    launcher.launch = record
    return launched


def section_kernels(run: Run) -> None:
    """The card's artifact of a small random Llama, step by step, vs the cpu target's programs."""
    from kiln.ir.step import PagedSequences
    from kiln.runtime.artifact import load_artifact
    from kiln.runtime.executor import CpuExecutor
    from kiln.runtime.step_batch import StepBatch

    ckpt = checkpoint(run, "small")
    gpu = gpu_executor(run, artifact(run, ckpt, run.target), enforce_eager=True, max_model_len=1024)
    launched = recording(gpu.launcher)
    references = {dtype: CpuExecutor(load_artifact(artifact(run, ckpt, "cpu", dtype)), kv_cache_memory=64 << 20,
                                     max_model_len=1024) for dtype in ("f32", "bf16")}
    executors = {"gpu": gpu, **references}
    pages = {name: PagedSequences(e.num_blocks, e.block_size, seed=1) for name, e in executors.items()}
    steps = []
    for number, (phase, chunks) in enumerate(kernel_steps(run, SMALL["vocab_size"])):
        decodes = len(chunks) if phase == "decode" else 0
        logits = {name: e.execute(StepBatch(**pages[name].step(chunks), num_decodes=decodes)).cpu()
                  for name, e in executors.items()}
        row = {"phase": phase, "tokens": sum(len(c) for _, c in chunks), "seqs": len(chunks),
               **compare(logits["gpu"], logits["f32"], logits["bf16"])}
        steps.append(row)
        run.put("steps", steps)
        run.say(f"step {number} ({phase}, {row['tokens']} tokens): max |diff| {row['max_abs_logit_diff']:.4f} "
                f"(bf16 torch {row['bf16_reference_diff']:.4f}), greedy {row['greedy_agreement']:.0%}")
    table = set(gpu.launcher.table)
    run.put("kernels_in_table", len(table))
    run.put("kernels_launched", len(table & launched))
    run.put("kernels_not_launched", sorted(table - launched))
    run.record["passed"] = all(s["close"] and s["greedy_ok"] for s in steps)
    run.summary(f"{len(table & launched)}/{len(table)} kernels run over {len(steps)} steps; worst |diff| "
                f"{max(s['max_abs_logit_diff'] for s in steps):.4f} vs bf16 torch "
                f"{max(s['bf16_reference_diff'] for s in steps):.4f}; "
                f"{'all close' if run.record['passed'] else 'NOT CLOSE'}")


# ---------------------------------------------------------------- 3: 1B- and 8B-shaped models vs transformers

def hf_logits(model, tokens: list[int], positions: range):
    """transformers' logits [len(positions), V] of the sequence `tokens` at `positions`."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens], device=model.device)).logits[0]
    return out[list(positions)].float().cpu()


def kiln_greedy(executor, prompts: dict[str, list[int]], decode_steps: int) -> tuple[dict, list]:
    """Greedy decoding of `prompts` on `executor`: (tokens fed per sequence, logits [B, V] per step)."""
    from kiln.ir.step import PagedSequences
    from kiln.runtime.step_batch import StepBatch

    pages = PagedSequences(executor.num_blocks, executor.block_size, seed=2)
    fed = {seq: list(p) for seq, p in prompts.items()}
    chunks, steps = list(prompts.items()), []
    for number in range(decode_steps + 1):
        logits = executor.execute(StepBatch(**pages.step(chunks), num_decodes=len(chunks) if number else 0)).cpu()
        steps.append(logits)
        chunks = [(seq, [int(token)]) for seq, token in zip(prompts, logits.argmax(-1))]
        if number < decode_steps:
            for seq, token in chunks:
                fed[seq] += token
    return fed, steps


def check_model(run: Run, name: str) -> dict:
    """kiln's artifact of `name` vs transformers' eager model (fp32; bf16 as the yardstick)."""
    import torch

    transformers = quiet_transformers()
    ckpt = checkpoint(run, name)
    executor = gpu_executor(run, artifact(run, ckpt, run.target))
    gen = torch.Generator().manual_seed(3)
    vocab = model_config(run, name)["vocab_size"]
    (long, short), decode_steps = ((12, 5), 1) if run.dry_run else ((48, 21), 4)
    prompts = {"a": torch.randint(0, vocab, (long,), generator=gen).tolist(),
               "b": torch.randint(0, vocab, (short,), generator=gen).tolist()}
    fed, steps = kiln_greedy(executor, prompts, decode_steps)
    del executor
    release(run)
    run.say(f"{name}: kiln ran a prefill and {decode_steps} decode steps; transformers' eager model next")
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager")
        model.to(run.device)
        rows[dtype] = {seq: hf_logits(model, fed[seq], range(len(prompts[seq]) - 1, len(fed[seq])))
                       for seq in prompts}
        del model
        release(run)
    per_step = [compare(kiln, *(torch.stack([rows[d][seq][i] for seq in prompts]) for d in (torch.float32, torch.bfloat16)))
                for i, kiln in enumerate(steps)]
    return {"layers": model_config(run, name)["num_hidden_layers"], "steps": per_step,
            "max_abs_logit_diff": max(s["max_abs_logit_diff"] for s in per_step),
            "bf16_reference_diff": max(s["bf16_reference_diff"] for s in per_step),
            "greedy_agreement": statistics.mean(s["greedy_agreement"] for s in per_step),
            "passed": all(s["close"] and s["greedy_ok"] for s in per_step)}


def section_models(run: Run) -> None:
    results = {}
    for name in run.models:
        figures = results[name] = check_model(run, name)
        run.put("models", results)
        run.summary(f"{name}: max |logit diff| {figures['max_abs_logit_diff']:.4f} (transformers bf16 "
                    f"{figures['bf16_reference_diff']:.4f}), greedy agreement {figures['greedy_agreement']:.0%}, "
                    f"{'pass' if figures['passed'] else 'FAIL'}")
    run.record["passed"] = all(f["passed"] for f in results.values())


# ---------------------------------------------------------------- 7: start-up without compiling

STARTUP = r"""
import json, sys, time
start = time.perf_counter()
import torch, triton, triton.compiler, triton.compiler.compiler as compiler
from triton import knobs
counts = {"triton_compile_calls": 0, "jit_cache_misses": 0}
real_compile = compiler.compile
def counting_compile(*args, **kwargs):
    counts["triton_compile_calls"] += 1
    return real_compile(*args, **kwargs)
compiler.compile = triton.compiler.compile = triton.compile = counting_compile
def on_jit_miss(*args, **kwargs):
    counts["jit_cache_misses"] += 1
    return False
knobs.runtime.jit_cache_hook = on_jit_miss
from kiln.runtime.artifact import load_artifact
from kiln.runtime.gpu_executor import GpuExecutor
sys.path.insert(0, sys.argv[3])
from gpu_decode import decode_batch
imported = time.perf_counter()
artifact = load_artifact(sys.argv[1])
loaded = time.perf_counter()
interpret = sys.argv[2] == "1"
executor = GpuExecutor(artifact, interpret=interpret, gpu_memory_utilization=0.3, kv_cache_memory=32 << 20,
                       max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=256 if interpret else 2048,
                       enforce_eager=False)
ready = time.perf_counter()
executor.execute(decode_batch(1, 16, executor.block_size))
None if interpret else torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_artifact_s": loaded - imported, "executor_s": ready - loaded,
                  "first_step_s": done - ready, "total_s": done - start, **counts}))
"""


def section_startup(run: Run) -> None:
    """A fresh process serving the 1B-shaped artifact, with an empty Triton cache."""
    path = artifact(run, checkpoint(run, "llama-3.2-1b"), run.target)
    with tempfile.TemporaryDirectory(prefix="gpu-check-triton-cache-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        run.say("starting a fresh process on the artifact (empty TRITON_CACHE_DIR)")
        result = subprocess.run([sys.executable, "-c", STARTUP, str(path), "1" if run.dry_run else "0",
                                 str(BENCH)], env=env, capture_output=True, text=True, timeout=240)
        if result.returncode:
            raise RuntimeError(f"the start-up process failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        files = [p for p in Path(cache).rglob("*") if p.is_file()]
    figures["cache_kernel_binaries"] = sum(1 for p in files if p.suffix == ".cubin")
    figures["cache_launcher_stubs"] = sum(1 for p in files if p.suffix == ".so")
    for key, value in figures.items():
        run.put(key, value)
    compiles = figures["triton_compile_calls"] + figures["jit_cache_misses"] + figures["cache_kernel_binaries"]
    run.record["passed"] = compiles == 0
    run.summary(f"ready in {figures['total_s']:.1f} s (import {figures['import_s']:.1f}, executor "
                f"{figures['executor_s']:.1f}, first step {figures['first_step_s']:.2f}); {compiles} Triton "
                f"compilations; {figures['cache_launcher_stubs']} native launcher stubs (.so) built by gcc")


def run_section_here(args: argparse.Namespace) -> None:
    """The child process of one section: runs it and leaves its record in the workdir. It leads a
    process group of its own, so that the time guard kills its children (compile workers) too."""
    from gpu_check_timing import section_attention, section_decode, section_graphs  # they import this module

    sections = {1: section_gpu_tests, 2: section_kernels, 3: section_models, 4: section_decode, 5: section_attention,
                6: section_graphs, 7: section_startup}
    os.setsid()
    run = Run(args)
    run.save()
    try:
        sections[args.section](run)
        run.record["status"] = "failed" if run.record.get("passed") is False else "ok"
    except Exception as error:  # recorded, not raised: the driver goes on with the next section
        run.record.update(status="error", error=f"{type(error).__name__}: {error}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
        run.say(f"ERROR {type(error).__name__}: {str(error)[:500]}")
    run.save()
