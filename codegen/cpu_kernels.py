"""The cpu target's quantized-linear kernels: C rendered from templates/quant_linear.c.j2, one
pair of functions per QuantFormat (group size and scale dtype compiled in), built by gcc into one
shared library per ISA variant. The artifact carries the libraries as GPU artifacts carry cubins;
runtime/cpu_quant.py picks the variant the CPU runs and binds weights to the functions.

Builds are cached under $KILN_CACHE_DIR/cpu_kernels (else ~/.cache/kiln/cpu_kernels), keyed by
a hash of the source, the flags and gcc's version, so repeated compiles and tests run gcc once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from kiln.codegen.render import render_template, write_if_changed
from kiln.errors import KilnError
from kiln.process import cache_dir
from kiln.quant import QuantFormat

# Tiles (the template's header says what each is), chosen by single-thread timings of int4-g32-f16 on
# the dev machine (2-core AMD EPYC, Zen 3, AVX2): MR 8 beat 4 and 6 from 8 rows of x on and tied
# below; a tile of 2 or 4 weight rows at once (reusing x's loads) was 5-20% slower than one (register
# spills), as was a factored s * sum(q x) + z * sum(x) form at 1 row; the dequantized-block path
# (LARGE_M) ties the register tiles at 8 rows and is 1.25x faster at 12, 1.4x at 16; MB x NBR = 4 x 3
# beat 3 x 4 and 6 x 2.
TILES = {"mr": 8, "large_m": 9, "mb": 4, "nbr": 3, "block_bytes": 64 * 1024}
_COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=gnu11")
# ISA variant -> gcc flags: x86-64-v3 is AVX2 + FMA + F16C, x86-64-v4 adds AVX-512
X86_VARIANTS = {"x86-64-v2": ("-march=x86-64-v2",), "x86-64-v3": ("-march=x86-64-v3",), "x86-64-v4": ("-march=x86-64-v4",)}
GENERIC_VARIANTS = {"generic": ()}


def c_name(fmt: QuantFormat) -> str:
    """The C suffix of `fmt`'s functions: kiln_quant_linear_<c_name>, kiln_quant_rows_<c_name>."""
    return fmt.name.replace("-", "_")


def _format_params(fmt: QuantFormat) -> dict:
    """What the template needs of one format: the group's bytes and the span of codes one pass of
    vectors walks (int4: half a group, each byte holding an element of both halves)."""
    doc = {"int4": "4-bit codes, two per byte (element j low nibble, j + G/2 high)",
           "int8": "signed 8-bit codes", "fp8e4m3": "float8 e4m3fn codes"}[fmt.kind]
    halves = 2 if fmt.kind == "int4" else 1
    # int16 and int8 activations (integer dot products over blocks of 32) where a block's codes share
    # a scale and lie in one load: int4 groups of 32 or multiples of 64, int8 groups of 16 or multiples of 32
    qx = (fmt.kind == "int4" and (fmt.group == 32 or fmt.group % 64 == 0)) or (
        fmt.kind == "int8" and (fmt.group == 16 or fmt.group % 32 == 0))
    return {"qx": qx, "name": fmt.name, "p": c_name(fmt), "kind": fmt.kind, "group": fmt.group, "scale_dtype": fmt.scale_dtype,
            "group_bytes": fmt.group // fmt.codes_per_byte(), "halves": halves, "span": fmt.group // halves, "doc": doc}


def render_quant_source(formats: Iterable[QuantFormat]) -> str:
    """The C source of the kernels for `formats` (each once, in name order)."""
    unique = sorted(set(formats), key=lambda f: f.name)
    ladder = [r for r in (16, 8, 4, 2, 1) if r < TILES["mr"]]  # tiles for the rows of x past the last whole MR
    return render_template("quant_linear.c.j2", formats=[_format_params(f) for f in unique], tiles=TILES | {"ladder": ladder})


def isa_variants() -> dict[str, tuple[str, ...]]:
    """The variants built on this machine's architecture: variant -> its gcc flags."""
    return X86_VARIANTS if platform.machine().lower() in ("x86_64", "amd64") else GENERIC_VARIANTS


def gcc_path() -> str:
    """gcc (11 or newer: -march=x86-64-v2..v4), or a KilnError saying how to install it."""
    path = shutil.which("gcc")
    if path is None:
        raise KilnError("the cpu target compiles its quantized kernels with gcc, which is not on PATH: "
                        "install gcc/g++ (e.g. `apt-get install build-essential`)")
    return path


def _gcc_version(gcc: str) -> str:
    return subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def cpu_kernel_cache_dir() -> Path:
    """$KILN_CACHE_DIR/cpu_kernels, else ~/.cache/kiln/cpu_kernels."""
    return cache_dir("cpu_kernels")


def build_quant_library(formats: Iterable[QuantFormat], out_dir: Path,
                        variants: Iterable[str] | None = None) -> dict[str, str]:
    """Compiles the kernels of `formats` into `out_dir/quant.<variant>.so` (see `build_library`)."""
    return build_library("quant", render_quant_source(formats), _COMMON_FLAGS, out_dir, variants)


def build_library(stem: str, source: str, flags: Iterable[str], out_dir: Path,
                  variants: Iterable[str] | None = None) -> dict[str, str]:
    """Compiles C `source` with gcc `flags` into `out_dir/<stem>.<variant>.so`, one library per ISA
    variant of this architecture (or those of them named in `variants`); gcc runs for all variants at
    once, a cached build (keyed by the source, the flags and gcc's version) is copied. Returns
    {variant: file name}."""
    gcc = gcc_path()
    version = _gcc_version(gcc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, files = [], {}
    for variant, isa_flags in isa_variants().items():
        if variants is not None and variant not in variants:
            continue
        cmd_flags = [*flags, *isa_flags]
        key = hashlib.sha256("\0".join([source, *cmd_flags, version]).encode()).hexdigest()[:20]
        cached = cpu_kernel_cache_dir() / f"{stem}.{variant}.{key}.so"
        if not cached.exists():
            src = write_if_changed(cached.with_suffix(".c"), source)
            tmp = cached.with_suffix(f".tmp{os.getpid()}.so")
            jobs.append((variant, cached, tmp, subprocess.Popen(
                [gcc, *cmd_flags, "-o", str(tmp), str(src), "-lm"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)))
        files[variant] = (cached, f"{stem}.{variant}.so")
    for variant, cached, tmp, proc in jobs:
        output, _ = proc.communicate()
        if proc.returncode:
            raise KilnError(f"gcc failed to build the {variant} {stem} kernels ({cached.with_suffix('.c')}):\n{output}")
        tmp.replace(cached)
    for cached, name in files.values():
        target = out_dir / name
        target.unlink(missing_ok=True)
        shutil.copyfile(cached, target)
    return {variant: name for variant, (_, name) in files.items()}
