"""Ahead-of-time compilation of Triton kernels for a target GPU, without needing that GPU.

`compile_kernel` runs Triton's own compiler with an explicit `GPUTarget` and returns the binary
(a cubin for CUDA, an hsaco for HIP), the metadata a launcher needs, the text IRs, and the
static resource usage. CUDA: registers, stack, local and shared bytes from the wheel's
`cuobjdump -res-usage`, spill traffic from `ptxas -v`. HIP: the AMDGPU code object metadata
that the AMDGCN assembly carries (`.vgpr_count`, `.vgpr_spill_count`, ...), which is what the
hsaco's note holds.

Signature strings follow Triton's: "*bf16", "*fp32", "*i32", "i32", "fp32", "constexpr". A
":16" suffix (as in `triton.tools.compile`) promises the argument is divisible by 16 (for a
pointer: 16-byte aligned), which lets the compiler vectorize; the caller must keep that promise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kiln.codegen.render import write_if_changed
from kiln.codegen.targets import Target
from kiln.process import cache_dir

LAUNCH_METADATA_KEYS = (
    "num_warps", "num_ctas", "shared", "tmem_size", "global_scratch_size", "global_scratch_align",
    "profile_scratch_size", "profile_scratch_align", "launch_pdl", "launch_cooperative_grid",
)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_AMDGPU_FIELD = re.compile(r"^\s*-?\s*\.(\w+):\s+(\S+)\s*$")
_HSACO_ARCH = re.compile(rb"amdgcn-amd-amdhsa--(gfx\w+)")


@dataclass(frozen=True)
class ResourceUsage:
    """Static per-thread registers and memory of one compiled kernel.

    CUDA: registers, stack/local/shared bytes from `cuobjdump -res-usage` on the cubin
    (shared_bytes is the static part; Triton's dynamic shared memory is the metadata's `shared`);
    spill_stores/loads from `ptxas -v` on the PTX. A stack frame alone is not a spill: libdevice's
    sin/cos keep a 32-byte frame for their rarely taken huge-argument path, so `spills` counts
    spill traffic. HIP: registers are `.vgpr_count`, the VGPRs per lane (on gfx90a and later the
    unified VGPR+AGPR file), stack_bytes the private segment (scratch) per lane, shared_bytes
    the static LDS, and spill_stores/loads 4 bytes per lane for each VGPR spilled to scratch
    (the code object counts registers; each is stored and reloaded). SGPR spills are not
    counted: LLVM spills SGPRs into VGPR lanes (v_writelane/v_readlane, no memory), and only
    through a spilled VGPR could they reach scratch.
    """

    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores + self.spill_loads > 0


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one target.

    binary: a cubin (CUDA) or an hsaco (HIP), named by `binary_ext`. signature/constexprs: what the kernel
    was compiled with (hints stripped), enough to rebuild `ASTSource(fn, signature, constexprs)`
    for a launcher. metadata: Triton's metadata, json-able.
    asm: the text stages (ttir, ttgir, llir, then ptx or amdgcn).
    """

    name: str
    target: str
    arch: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    binary: bytes
    metadata: dict
    asm: dict[str, str]
    resources: ResourceUsage

    def to_record(self) -> dict:
        """Everything but the binary, json-able (for manifests and the compile worker)."""
        record = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "binary"}
        record["resources"] = asdict(self.resources)
        return record

    @classmethod
    def from_record(cls, record: dict, binary: bytes) -> CompiledKernel:
        return cls(**{**record, "resources": ResourceUsage(**record["resources"]), "binary": binary})

    @property
    def binary_ext(self) -> str:
        """The binary's file extension, as Triton names it: "cubin" or "hsaco"."""
        return "hsaco" if self.arch.startswith("gfx") else "cubin"

    @property
    def launch_metadata(self) -> dict:
        """What a launcher must honour: warps, CTAs per cluster, dynamic shared, scratch, PDL."""
        return {key: self.metadata[key] for key in LAUNCH_METADATA_KEYS if key in self.metadata}


@dataclass(frozen=True)
class CompileJob:
    """One `compile_kernel` request; `fn`'s source file must be importable on its own."""

    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    target: Target
    num_warps: int
    num_stages: int


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
    return compile_kernels([CompileJob(fn, signature, constexprs, target, num_warps, num_stages)])[0]


def compile_kernels(jobs: list[CompileJob]) -> list[CompiledKernel]:
    """Compiles several kernels; in one worker process when this one runs Triton interpreted.

    Under TRITON_INTERPRET=1 (set when triton was imported), triton.language's own helpers
    (tl.cdiv, reductions' combine functions) are interpreter objects that the compiler cannot
    use, so the jobs go to a fresh `python -m kiln.codegen.aot` without that variable.
    """
    for job in jobs:  # fail early, before any worker starts
        job.target.gpu_target()
        _split_signature(job.fn, job.signature, job.constexprs)
    if _triton_language_is_interpreted():
        return _compile_in_worker(jobs)
    return [_compile_here(job) for job in jobs]


def _triton_language_is_interpreted() -> bool:
    from triton.language.standard import cdiv
    from triton.runtime.jit import JITFunction

    return not isinstance(cdiv, JITFunction)


def _compile_here(job: CompileJob) -> CompiledKernel:
    from triton import compile as triton_compile
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = job.fn if isinstance(job.fn, JITFunction) else JITFunction(job.fn.fn)  # decorated interpreted
    arg_types, attrs = _split_signature(fn, job.signature, job.constexprs)
    source = ASTSource(fn, arg_types, dict(job.constexprs), attrs)
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
    compiled = triton_compile(source, target=job.target.gpu_target(), options=options)
    hip = job.target.backend == "hip"
    binary = compiled.asm["hsaco" if hip else "cubin"]
    resources = (amdgpu_resources(compiled.asm["amdgcn"], compiled.name) if hip
                 else resource_usage(binary, compiled.asm["ptx"], compiled.name, job.target))
    return CompiledKernel(
        name=compiled.name,
        target=job.target.name,
        arch=job.target.arch_name,
        signature=arg_types,
        constexprs=dict(job.constexprs),
        binary=binary,
        metadata=json.loads(json.dumps(compiled.metadata._asdict(), default=vars)),
        asm={stage: text for stage, text in compiled.asm.items() if isinstance(text, str)},
        resources=resources,
    )


def _compile_in_worker(jobs: list[CompileJob]) -> list[CompiledKernel]:
    """Runs the jobs in `python -m kiln.codegen.aot <jobs.json> <out dir>` without TRITON_INTERPRET."""
    from kiln.codegen.targets import TARGETS

    requests = []
    for job in jobs:
        if TARGETS.get(job.target.name) is not job.target:
            raise ValueError(f"target {job.target.name!r} is not in TARGETS, so a compile worker cannot rebuild it")
        raw_fn = getattr(job.fn, "fn", job.fn)
        requests.append({
            "file": raw_fn.__code__.co_filename, "function": raw_fn.__name__, "signature": job.signature,
            "constexprs": job.constexprs, "target": job.target.name,
            "num_warps": job.num_warps, "num_stages": job.num_stages,
        })
    with tempfile.TemporaryDirectory(prefix="kiln-aot-") as directory:
        jobs_path = Path(directory) / "jobs.json"
        jobs_path.write_text(json.dumps(requests))
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        result = subprocess.run(
            [sys.executable, "-m", "kiln.codegen.aot", str(jobs_path), directory], env=env,
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed:\n{result.stderr[-4000:]}")
        return [
            CompiledKernel.from_record(
                json.loads((Path(directory) / f"{index}.json").read_text()),
                (Path(directory) / f"{index}.bin").read_bytes(),
            )
            for index in range(len(jobs))
        ]


def _worker_main(jobs_path: str, out_dir: str) -> None:
    from kiln.codegen.targets import get_target

    for index, request in enumerate(json.loads(Path(jobs_path).read_text())):
        spec = importlib.util.spec_from_file_location(f"kiln_aot_job_{index}", request["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        job = CompileJob(
            getattr(module, request["function"]), request["signature"], request["constexprs"],
            get_target(request["target"]), request["num_warps"], request["num_stages"],
        )
        kernel = _compile_here(job)
        (Path(out_dir) / f"{index}.bin").write_bytes(kernel.binary)
        (Path(out_dir) / f"{index}.json").write_text(json.dumps(kernel.to_record()))


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


def resource_usage(cubin: bytes, ptx: str, kernel_name: str, target: Target) -> ResourceUsage:
    """Reads `kernel_name`'s registers and memory from `cubin` and its spill traffic from `ptx`."""
    text = cuobjdump(cubin, "-res-usage")
    lines = text.splitlines()
    for line_index, line in enumerate(lines[:-1]):
        match = _RES_USAGE.search(lines[line_index + 1])
        if re.search(rf"Function {re.escape(kernel_name)}\s*:", line) and match:
            registers, stack, shared, local = (int(group) for group in match.groups())
            return ResourceUsage(registers, stack, local, shared, *ptxas_spills(ptx, target))
    raise RuntimeError(f"cuobjdump -res-usage shows no function {kernel_name}:\n{text}")


def ptxas_spills(ptx: str, target: Target) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) that the wheel's `ptxas -v` reports for `ptx`, kept
    in the `ptxas` cache by the PTX, the arch and the ptxas release: Triton's own cache makes a
    recompile of an unchanged kernel cheap, and ptxas would otherwise run again in full for these
    two numbers."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(target.arch)
    key = hashlib.sha256("\0".join((ptx, target.arch_name, ptxas.path, str(ptxas.version))).encode()).hexdigest()
    cached = cache_dir("ptxas") / f"{key}.json"
    if cached.exists():
        stores, loads = json.loads(cached.read_text())
        return stores, loads
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        command = [ptxas.path, "-v", f"--gpu-name={target.arch_name}", file.name, "-o", os.devnull]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    match = _PTXAS_SPILLS.search(report)
    if match is None:
        raise RuntimeError(f"ptxas -v reports no spill figures:\n{report}")
    write_if_changed(cached, json.dumps([int(match.group(1)), int(match.group(2))]))
    return int(match.group(1)), int(match.group(2))


def amdgpu_resources(amdgcn: str, kernel_name: str) -> ResourceUsage:
    """`kernel_name`'s registers, scratch, LDS and spills from the `.amdgpu_metadata` block of its
    AMDGCN assembly: the code object metadata that the hsaco's note section carries (Triton
    compiles one kernel per module, so the block describes that kernel alone)."""
    block = amdgcn.partition(".amdgpu_metadata")[2].partition(".end_amdgpu_metadata")[0]
    fields = {m.group(1): int(m.group(2)) for m in map(_AMDGPU_FIELD.match, block.splitlines())
              if m and m.group(2).isdigit()}
    needed = ("vgpr_count", "vgpr_spill_count", "private_segment_fixed_size", "group_segment_fixed_size")
    if not re.search(rf"^\s*\.name:\s+{re.escape(kernel_name)}\s*$", block, re.M) or not set(needed) <= set(fields):
        raise RuntimeError(f"the AMDGCN metadata shows no kernel {kernel_name} with {needed}:\n{block[-2000:]}")
    spill_bytes = 4 * fields["vgpr_spill_count"]
    scratch = fields["private_segment_fixed_size"]
    return ResourceUsage(fields["vgpr_count"], scratch, 0, fields["group_segment_fixed_size"], spill_bytes, spill_bytes)


def cubin_arch(cubin: bytes) -> str:
    """The architecture a binary was built for: a cubin's SASS architecture as `cuobjdump -elf`
    names it (e.g. "sm_100a"), an hsaco's AMDGPU processor (e.g. "gfx942")."""
    hsaco = _HSACO_ARCH.search(cubin)
    if hsaco:
        return hsaco.group(1).decode()
    match = re.search(r"\bsm=(\w+)", cuobjdump(cubin, "-elf"))
    if match is None:
        raise RuntimeError("cuobjdump -elf shows no sm= field")
    return f"sm_{match.group(1)}"


def resource_table(kernels: list[CompiledKernel]) -> str:
    """A fixed-width table: kernel, target, arch, warps, stages, registers, stack+local bytes,
    spill bytes (stores + loads), shared bytes (dynamic + static)."""
    header = ("kernel", "target", "arch", "warps", "stages", "regs", "stack B", "spill B", "shared B")
    rows = [
        (
            kernel.name, kernel.target, kernel.arch, str(kernel.metadata["num_warps"]),
            str(kernel.metadata["num_stages"]), str(kernel.resources.registers),
            str(kernel.resources.stack_bytes + kernel.resources.local_bytes),
            str(kernel.resources.spill_stores + kernel.resources.spill_loads),
            str(kernel.metadata["shared"] + kernel.resources.shared_bytes),
        )
        for kernel in kernels
    ]
    table = [header, *rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])
