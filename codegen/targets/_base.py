"""The `Target` record: one GPU model (or the CPU), its limits and its tile tables.

A target module (`a100.py`, `mi300x.py`, ...) defines one frozen `Target` instance, `TARGET`,
whose name is the module's. The hardware figures are the vendor's published numbers and feed
tile choices and roofline reports; the tile tables say, per kernel kind and shape bucket, which
block sizes, `num_warps` and `num_stages` to render and compile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kiln.contract import arch_name
from kiln.errors import KilnError

BACKENDS = ("cuda", "hip")
# Every kind a target's tile table must hold (buckets per kind: _tiles.py).
KERNEL_KINDS = ("gemm", "moe", "rows", "rows_tiled", "attention_prefill", "attention_decode")


@dataclass(frozen=True)
class TileConfig:
    """Launch shape for one kernel kind in one shape bucket.

    `blocks` maps a kernel's block-size name (e.g. "BLOCK_M") to its value; which names a kind
    uses is documented in that kind's kernel module.
    """

    blocks: Mapping[str, int]
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        object.__setattr__(self, "blocks", MappingProxyType(dict(self.blocks)))

    def block(self, name: str) -> int:
        return self.blocks[name]


@dataclass(frozen=True)
class Target:
    """A compilation target.

    backend: Triton's backend, "cuda" or "hip"; None for `cpu`, which means "the lowered graph
    rendered as torch ops" (and, for verification, Triton kernels under TRITON_INTERPRET=1 using
    the `cpu` tile table). The hardware figures are None for `cpu`.
    arch: what Triton's `GPUTarget` takes: the CUDA compute capability as an int (80, 90, 120)
    or the AMDGPU processor name ("gfx942").
    sm_count: streaming multiprocessors (NVIDIA) or compute units (AMD).
    warp_size: threads per warp (32) or per wavefront (64 on CDNA).
    tile_table: kind -> bucket -> TileConfig, for every kind in `KERNEL_KINDS`.
    fp8: the GPU converts float8 e4m3 (OCP, "e4m3fn") to f16 in hardware (sm_89 and later NVIDIA
    parts), which GEMMs over fp8e4m3 weights need (kiln.quant). Without it (sm_80; CDNA3's fp8
    is the other e4m3 encoding, e4m3fnuz, so Triton emulates OCP e4m3 in ~20 integer operations a
    value) such weights are refused: `fp8_targets()` lists the targets that have it.
    """

    name: str
    backend: str | None
    arch: int | str | None
    sm_count: int | None
    shared_mem_per_sm: int | None  # bytes
    shared_mem_per_block: int | None  # bytes, the opt-in maximum one CTA may use
    hbm_bandwidth_gbs: float | None  # GB/s
    peak_bf16_tflops: float | None  # dense (no sparsity)
    warp_size: int
    # fp32 accumulator values per thread a GEMM main loop may keep live without spilling:
    # mma.sync (sm_80/89) also holds operand fragments in registers, wgmma/tcgen05 read smem.
    accumulator_values_per_thread: int | None
    tile_table: Mapping[str, Mapping[str, TileConfig]] = field(repr=False)
    fp8: bool = False

    def __post_init__(self):
        if (self.backend is None) != (self.arch is None) or self.backend not in (None, *BACKENDS):
            raise ValueError(f"target {self.name}: backend {self.backend!r} with arch {self.arch!r}")
        missing = sorted(set(KERNEL_KINDS) - set(self.tile_table))
        if missing:
            raise ValueError(f"target {self.name} has no tiles for kernel kinds {missing}")
        frozen = {kind: MappingProxyType(dict(buckets)) for kind, buckets in self.tile_table.items()}
        object.__setattr__(self, "tile_table", MappingProxyType(frozen))

    @property
    def is_gpu(self) -> bool:
        return self.arch is not None

    @property
    def arch_name(self) -> str:
        """The architecture the binaries are built for, as their ELF names it: "sm_90a" (cuobjdump)
        or "gfx942" (the hsaco's target triple); "cpu" for no GPU."""
        return arch_name(self.arch)

    def gpu_target(self):
        """The `triton.backends.compiler.GPUTarget` to cross-compile for this target."""
        if self.arch is None:
            raise KilnError(
                f"target {self.name!r} has no GPU architecture, so nothing can be compiled to a "
                "GPU binary for it; choose a GPU target (`kiln compile --help` lists them) to compile kernels"
            )
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def tiles(self, kind: str, bucket: str) -> TileConfig:
        """The tile config for kernel `kind` in shape `bucket` (buckets are defined per kind)."""
        buckets = self.tile_table.get(kind)
        if buckets is None:
            known = sorted(self.tile_table)
            raise LookupError(f"target {self.name} has no tiles for kernel kind {kind!r}; known: {known}")
        if bucket not in buckets:
            raise LookupError(f"target {self.name}: kind {kind!r} has no bucket {bucket!r}; known: {sorted(buckets)}")
        return buckets[bucket]
