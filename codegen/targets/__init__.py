"""Compilation targets: one module per GPU model (plus `cpu`), listed in one explicit dict."""

from kiln.codegen.targets.a100 import A100
from kiln.codegen.targets.b200 import B200
from kiln.codegen.targets.base import Target, TileConfig
from kiln.codegen.targets.cpu import CPU
from kiln.codegen.targets.h100 import H100
from kiln.codegen.targets.h200 import H200
from kiln.codegen.targets.l40s import L40S
from kiln.contract import TARGET_ARCHS
from kiln.errors import KilnError

TARGETS: dict[str, Target] = {
    "a100": A100,
    "l40s": L40S,
    "h100": H100,
    "h200": H200,
    "b200": B200,
    "cpu": CPU,
}
assert {name: t.arch for name, t in TARGETS.items()} == TARGET_ARCHS  # what the runtime knows of each target


def get_target(name: str) -> Target:
    """The target called `name` (case-insensitive); KilnError listing the known ones otherwise."""
    target = TARGETS.get(name.strip().lower()) if isinstance(name, str) else None
    if target is None:
        raise KilnError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return target


__all__ = ["TARGETS", "Target", "TileConfig", "get_target"]
