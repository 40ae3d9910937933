"""Compilation targets: every module of this package not named `_*` is one target.

A target module defines `TARGET`, a `Target` record named like the module (`h200.py` defines
the target "h200"); adding a target is adding its file. Directories listed in the environment
variable KILN_TARGETS_PATH (os.pathsep-separated) are searched for target modules too, so a
target can live outside the source tree.
"""

import importlib
import os
import pkgutil
import re

from kiln.codegen.targets._base import KERNEL_KINDS, Target, TileConfig
from kiln.contract import arch_name
from kiln.errors import KilnError

TARGETS_PATH_VARIABLE = "KILN_TARGETS_PATH"
__path__ += [d for d in os.environ.get(TARGETS_PATH_VARIABLE, "").split(os.pathsep) if d]


def _discover() -> dict[str, Target]:
    """name -> record of every target module: GPUs by backend and architecture, then `cpu`."""
    found = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        target = importlib.import_module(f"{__name__}.{module_info.name}").TARGET
        if not isinstance(target, Target) or target.name != module_info.name:
            raise KilnError(f"{module_info.name}.py must define TARGET, a Target named {module_info.name!r}")
        found[target.name] = target
    order = {name: (not t.is_gpu, t.backend or "", str(t.arch).zfill(8), name) for name, t in found.items()}
    return {name: found[name] for name in sorted(found, key=order.__getitem__)}


TARGETS: dict[str, Target] = _discover()  # the runtime never reads it: an artifact's manifest names its kernels' arch


def get_target(name: str) -> Target:
    """The target called `name` (case-insensitive); KilnError listing the known ones otherwise."""
    target = TARGETS.get(name.strip().lower()) if isinstance(name, str) else None
    if target is None:
        raise KilnError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return target


def target_for_device(arch: int | str, device_name: str) -> Target:
    """The target of a GPU: of its architecture (the CUDA compute capability as an int, 90; the
    AMDGPU processor, "gfx942"), the one whose name is in the device's ("h200" in "NVIDIA H200",
    "rtx5090" in "NVIDIA GeForce RTX 5090", letters and digits compared), else the first of that
    architecture (an H20 is sm_90 too: h100's record, a card of the same architecture)."""
    candidates = [t for t in TARGETS.values() if t.arch == arch]
    if not candidates:
        raise KilnError(f"kiln has no target for this GPU ({device_name}, {arch_name(arch)}); known: {', '.join(TARGETS)}")
    plain = re.sub(r"[^a-z0-9]", "", device_name.lower())
    return next((t for t in candidates if t.name in plain), candidates[0])


def fp8_targets() -> list[str]:
    """The targets that read fp8e4m3 weights (`Target.fp8`), in registry order."""
    return [name for name, target in TARGETS.items() if target.fp8]


__all__ = ["KERNEL_KINDS", "TARGETS", "Target", "TileConfig", "fp8_targets", "get_target", "target_for_device"]
