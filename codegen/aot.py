"""Ahead-of-time compilation of Triton kernels for a target GPU, without needing that GPU.

`compile_kernel` runs Triton's own compiler with an explicit `GPUTarget` and returns the cubin,
the metadata a launcher needs, the text IRs, and the static resource usage that the wheel's
`cuobjdump -res-usage` reports (registers, stack/local bytes, i.e. spills, shared memory).

Signature strings follow Triton's: "*bf16", "*fp32", "*i32", "i32", "fp32", "constexpr". A
":16" suffix (as in `triton.tools.compile`) promises the argument is divisible by 16 (for a
pointer: 16-byte aligned), which lets the compiler vectorize; the caller must keep that promise.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.codegen.targets import Target

LAUNCH_METADATA_KEYS = (
    "num_warps", "num_ctas", "shared", "tmem_size", "global_scratch_size", "global_scratch_align",
    "profile_scratch_size", "profile_scratch_align", "launch_pdl", "launch_cooperative_grid",
)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class ResourceUsage:
    """Static per-thread registers and per-CTA memory of one compiled kernel (from its cubin).

    shared_bytes is the static shared memory in the cubin; Triton's dynamic shared memory is the
    metadata's `shared`, reported separately by `resource_table`.
    """

    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes + self.local_bytes > 0


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one target.

    signature/constexprs: what the kernel was compiled with (hints stripped), enough to rebuild
    `ASTSource(fn, signature, constexprs)` for a launcher. metadata: Triton's metadata, json-able.
    asm: the text stages (ttir, ttgir, llir, ptx).
    """

    name: str
    target: str
    arch: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    cubin: bytes
    metadata: dict
    asm: dict[str, str]
    resources: ResourceUsage

    @property
    def launch_metadata(self) -> dict:
        """What a launcher must honour: warps, CTAs per cluster, dynamic shared, scratch, PDL."""
        return {key: self.metadata[key] for key in LAUNCH_METADATA_KEYS if key in self.metadata}


def compile_kernel(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    target: Target,
    *,
    num_warps: int,
    num_stages: int,
) -> CompiledKernel:
    """Cross-compiles the `@triton.jit` function `fn` for `target` (any machine; no GPU needed).

    signature: every runtime argument of `fn` by name -> type string (see module docstring);
    constexpr arguments may be omitted there and are given by value in `constexprs`.
    """
    from triton import compile as triton_compile
    from triton.compiler import ASTSource

    arg_types, attrs = _split_signature(fn, signature, constexprs)
    source = ASTSource(fn, arg_types, dict(constexprs), attrs)
    compiled = triton_compile(
        source, target=target.gpu_target(), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    metadata = json.loads(json.dumps(compiled.metadata._asdict(), default=vars))
    cubin = compiled.asm["cubin"]
    return CompiledKernel(
        name=compiled.name,
        target=target.name,
        arch=target.arch_name,
        signature=arg_types,
        constexprs=dict(constexprs),
        cubin=cubin,
        metadata=metadata,
        asm={stage: text for stage, text in compiled.asm.items() if isinstance(text, str)},
        resources=resource_usage(cubin, compiled.name),
    )


def _split_signature(fn, signature: dict[str, str], constexprs: dict[str, object]):
    """Orders the signature like `fn`'s arguments, marks constexprs, and turns ":16" into attrs."""
    unknown = sorted((set(signature) | set(constexprs)) - set(fn.arg_names))
    missing = [name for name in fn.arg_names if name not in signature and name not in constexprs]
    if unknown or missing:
        raise ValueError(
            f"signature of {fn.__name__} does not match its arguments {fn.arg_names}: "
            f"unknown {unknown}, missing {missing}"
        )
    arg_types, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            arg_types[name] = "constexpr"
            continue
        type_name, _, hint = signature[name].partition(":")
        arg_types[name] = type_name
        if hint == "16":
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif hint:
            raise ValueError(f"argument {name}: only the ':16' hint is supported, got {signature[name]!r}")
    return arg_types, attrs


def cuobjdump_path() -> Path:
    """The cuobjdump that ships inside the triton wheel."""
    from triton import knobs

    return Path(knobs.nvidia.cuobjdump.path)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """Runs the wheel's `cuobjdump <flags> <cubin>` and returns its text output."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        result = subprocess.run([str(cuobjdump_path()), *flags, file.name], capture_output=True, text=True, check=True)
    return result.stdout


def resource_usage(cubin: bytes, kernel_name: str) -> ResourceUsage:
    """Reads registers, stack, local and static shared bytes of `kernel_name` from `cubin`."""
    text = cuobjdump(cubin, "-res-usage")
    lines = text.splitlines()
    for line_index, line in enumerate(lines):
        if re.search(rf"Function {re.escape(kernel_name)}\s*:", line):
            match = _RES_USAGE.search(lines[line_index + 1])
            if match:
                registers, stack, shared, local = (int(group) for group in match.groups())
                return ResourceUsage(registers, stack, local, shared)
    raise RuntimeError(f"cuobjdump -res-usage shows no function {kernel_name}:\n{text}")


def cubin_arch(cubin: bytes) -> str:
    """The SASS architecture a cubin was built for, as `cuobjdump -elf` names it (e.g. "sm_100a")."""
    match = re.search(r"\bsm=(\w+)", cuobjdump(cubin, "-elf"))
    if match is None:
        raise RuntimeError("cuobjdump -elf shows no sm= field")
    return f"sm_{match.group(1)}"


def resource_table(kernels: list[CompiledKernel]) -> str:
    """A fixed-width table: kernel, target, arch, warps, stages, registers, spills, shared bytes."""
    header = ("kernel", "target", "arch", "warps", "stages", "regs", "spill B", "shared B")
    rows = [
        (
            kernel.name, kernel.target, kernel.arch, str(kernel.metadata["num_warps"]),
            str(kernel.metadata["num_stages"]), str(kernel.resources.registers),
            str(kernel.resources.stack_bytes + kernel.resources.local_bytes),
            str(kernel.metadata["shared"] + kernel.resources.shared_bytes),
        )
        for kernel in kernels
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])
