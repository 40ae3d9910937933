"""The machine a benchmark ran on, as the results record it: benchmarks must name the CPU, and
kiln's CPU kernels dispatch on its SIMD features."""

from __future__ import annotations

import json
import os
from pathlib import Path

SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni",
              "avx_ne_convert", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """/proc/cpuinfo's model name, the core count, and which of SIMD_FLAGS the CPU has (and lacks)."""
    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "cores": os.cpu_count(), "simd_flags": [f for f in SIMD_FLAGS if f in flags],
            "missing_simd_flags": [f for f in SIMD_FLAGS if f not in flags]}


def write_results(path: Path, results: dict | list) -> None:
    """The benchmark's figures as JSON at `path` (its folder created), and a line saying where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
