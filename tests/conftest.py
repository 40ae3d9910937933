"""Shared pytest configuration: a private kernel cache, the `quick` tier, and GPU tests skipped
with a reason on machines without CUDA."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Generated kernels and programs go to a fresh cache per test session, not the user's ~/.cache,
# removed when the session ends (its artifacts take about 2 GB).
if "KILN_CACHE_DIR" not in os.environ:
    os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KILN_CACHE_DIR"], ignore_errors=True)
# Without a GPU, Triton kernels run in its interpreter; this must be set before anything imports
# triton (cross-compilation then runs in a worker process without it, see codegen/aot.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The developer's inner loop, `pytest -m quick` (under a minute on 2 cores): the IR, the passes and
# the runtime's units; compiles, kernels, real checkpoints and servers are left to the full run.
QUICK_FOLDERS = ("ir", "passes", "runtime")


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent
    for item in items:
        if item.path.relative_to(tests).parts[0] in QUICK_FOLDERS and "slow" not in item.keywords:
            item.add_marker(pytest.mark.quick)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where kernels run: "cuda" when a GPU is present, else "cpu" (interpreted Triton)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def target():
    """The kiln target whose tile tables kernels use here: this GPU's own, or `cpu`'s small ones."""
    from kiln.codegen.targets import get_target
    from kiln.llm import local_target

    return get_target(local_target())
