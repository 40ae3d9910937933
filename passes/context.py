"""What every pass may read besides its graph: the phase it specialises for, the representative
sizes its cost decisions are evaluated at, and a list where it explains its decisions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy

from kiln.contract import PHASES
from kiln.errors import KilnError
from kiln.ir import NB, B, Graph, M, T

# Asks the compile's target whether it can render a candidate kernel: the kernel's body (a fused
# node's body graph) -> None, or the reason it cannot (codegen/kernel_check.py provides it).
KernelCheck = Callable[[Graph], "str | None"]


# The sizes at which symbolic byte counts are compared (decode graphs have T = B).
REPRESENTATIVE_SIZES: dict[sympy.Symbol, int] = {T: 512, B: 16, M: 64, NB: 4096}


@dataclass
class PassContext:
    """`notes` collects one line per decision a pass made or refused (the pipeline dumps them).
    `kernel_check` is the target's answer to "can you render this kernel?"; without one, fusion
    keeps to groups that kiln's kernel templates have always rendered (passes/fusion_rules.py)."""

    phase: str = "mixed"
    sizes: dict[sympy.Symbol, int] = field(default_factory=lambda: dict(REPRESENTATIVE_SIZES))
    notes: list[str] = field(default_factory=list)
    kernel_check: KernelCheck | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise KilnError(f"unknown phase {self.phase!r}; the phases are {', '.join(PHASES)}")

    def note(self, line: str) -> None:
        self.notes.append(line)

    def bytes(self, expr: sympy.Expr) -> float:
        """A symbolic byte count evaluated at the representative sizes."""
        return float(sympy.sympify(expr).subs(self.sizes))
