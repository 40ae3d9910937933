"""What every kernel matcher shares: the program-builder protocol, a launch `Site`, reading a
fused node's body, and the refusal exception (`Unsupported`, whose message is the reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kiln.codegen.kernels import KERNEL_DTYPES
from kiln.codegen.targets import Target
from kiln.errors import KilnError
from kiln.ir import Graph, GraphBuilder, Node, TensorType


class ProgramBuilder(Protocol):
    """What matchers need from the program being built (codegen/gpu_program.py)."""

    target: Target

    def variant(self, kind, variant) -> str:
        """Registers `variant` of kernel module `kind`; returns the program constant naming its
        `step_support.Kernel` record."""

    def bucketed(self, kind, variants: dict[str, object], rows: str) -> str:
        """Registers one variant per tile bucket; returns the expression that picks by `rows`."""

    def rope_table(self, spec) -> str:
        """The expression of `spec`'s inv_freq table on the launcher's device."""

    def hoist(self, name: str, expression: str) -> str:
        """Computes `expression` once per step (before the launches) as `name`; returns `name`."""


@dataclass
class Site:
    """One launch node in the program: `inputs`/`outputs` are Python expressions of its input
    values and of its outputs' planned buffers (None: the output is a KV cache it writes)."""

    node: Node
    inputs: list[str]
    outputs: list[str | None]
    program: ProgramBuilder
    lines: list[str] = field(default_factory=list)

    @property
    def target(self) -> Target:
        return self.program.target


def launch_line(kernel: str, sizes: list[str], args: list[str]) -> str:
    """`launcher.launch(kernel, (sizes...), args...)`: the launcher calls the kernel record's grid
    function with the step sizes (the arguments of its kind's `grid_source` lambda)."""
    return f"launcher.launch({kernel}, ({', '.join(sizes)},), {', '.join(args)})"


def body_of(node: Node) -> Graph:
    """A fused node's body; a plain node as a one-node body (inputs in0..inN, output out0)."""
    if node.op == "fused":
        return node.attrs["body"]
    builder = GraphBuilder(f"plain_{node.op}")
    inputs = [builder.input(f"in{i}", value.type) for i, value in enumerate(node.inputs)]
    builder.output("out0", builder.op(node.op, *inputs, **node.attrs))
    return builder.build()


def pattern_of(node: Node) -> str:
    return str(node.attrs["pattern"]) if node.op == "fused" else node.op


def kernel_dtype(type_: TensorType) -> str:
    if type_.dtype not in KERNEL_DTYPES:
        raise KilnError(f"the GPU kernels run f32, bf16 and f16 activations, not {type_.dtype}; compile with --dtype bf16")
    return KERNEL_DTYPES[type_.dtype]


class Unsupported(Exception):
    """A body that does not have the form a matcher implements (the reason is the message)."""


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsupported(reason)
