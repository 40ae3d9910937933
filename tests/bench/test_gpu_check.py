"""bench/gpu_check.py --dry-run: the device check's every section on the CPU (Triton interpreter,
tiny shapes), in a process where `import gguf` fails as it does on the GPU machine."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"1": "gpu_tests", "2": "kernels", "3": "models", "4": "decode", "5": "attention", "6": "graphs",
            "7": "startup"}


def _numbers(value):
    """Every int and float in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _without_gguf(tmp_path: Path) -> dict:
    """An environment whose Python processes, children included, cannot import gguf."""
    blocker = tmp_path / "no-gguf"
    blocker.mkdir()
    (blocker / "gguf.py").write_text('raise ImportError("gguf is blocked: the GPU machine has no gguf package")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}


def test_the_dry_run_records_every_section_with_finite_figures(tmp_path):
    env = _without_gguf(tmp_path)
    assert subprocess.run([sys.executable, "-c", "import gguf"], env=env, capture_output=True).returncode != 0
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                             "--workdir", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout[-5000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["target"] == "h100" and "interpreter" in results["device"]
    sections = results["sections"]
    assert {number: SECTIONS[number] for number in sections} == SECTIONS
    for number, record in sections.items():
        assert record["status"] == "ok", (SECTIONS[number], record.get("error"), record.get("traceback"))
        numbers = _numbers(record["figures"])
        assert numbers and all(math.isfinite(n) for n in numbers), (SECTIONS[number], record["figures"])
    gpu_tests = sections["1"]["figures"]
    assert gpu_tests["counts"].get("skipped") and gpu_tests["returncode"] == 0  # collected without gguf; no GPU here
    kernels, models = sections["2"]["figures"], sections["3"]["figures"]["models"]
    assert kernels["kernels_launched"] > 0 and all(s["close"] and s["greedy_ok"] for s in kernels["steps"])
    assert all(model["passed"] for model in models.values())
    assert sections["5"]["figures"]["shapes"] and sections["6"]["figures"]["captured"] is False
    startup = sections["7"]["figures"]
    assert startup["triton_compile_calls"] == startup["jit_cache_misses"] == startup["cache_kernel_binaries"] == 0
