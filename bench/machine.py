"""The machine a benchmark ran on, as the results record it: benchmarks must name the CPU, and
kiln's CPU kernels dispatch on its SIMD features."""

from __future__ import annotations

import json
import os
from pathlib import Path

SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni",
              "avx_ne_convert", "amx_bf16", "amx_tile")


# (vendor, family, model) -> microarchitecture, for CPUs whose virtualized model name is bare ("AMD EPYC")
_AMD_FAMILIES = {23: "Zen 1/Zen 2", 25: "Zen 3/Zen 4", 26: "Zen 5"}
_AMD_MODELS = {(23, 1): "Zen 1", (23, 49): "Zen 2", (25, 1): "Zen 3", (25, 17): "Zen 4"}


def cpu_description() -> dict:
    """/proc/cpuinfo's model name, family/model/stepping (and the AMD microarchitecture they name),
    the core count, and which of SIMD_FLAGS the CPU has (and lacks)."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if key.strip() == "flags":
            break  # the first processor's fields
    flags = set(fields.get("flags", "").split())
    family, model = (int(fields[k]) if fields.get(k, "").isdigit() else -1 for k in ("cpu family", "model"))
    arch = None
    if fields.get("vendor_id") == "AuthenticAMD":
        arch = _AMD_MODELS.get((family, model)) or _AMD_FAMILIES.get(family)
    return {"model": fields.get("model name", "unknown"), "family": family, "model_number": model,
            "stepping": fields.get("stepping"), "microarchitecture": arch, "cores": os.cpu_count(),
            "simd_flags": [f for f in SIMD_FLAGS if f in flags], "missing_simd_flags": [f for f in SIMD_FLAGS if f not in flags]}


def cpu_label(cpu: dict) -> str:
    """E.g. "AMD EPYC (Zen 1; family 23 model 1)": a `cpu_description` in a line."""
    arch = f"{cpu['microarchitecture']}; " if cpu.get("microarchitecture") else ""
    return f"{cpu['model']} ({arch}family {cpu.get('family')} model {cpu.get('model_number')})"


def write_results(path: Path, results: dict | list) -> None:
    """The benchmark's figures as JSON at `path` (its folder created), and a line saying where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
