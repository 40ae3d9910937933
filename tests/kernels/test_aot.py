"""aot: cross-compiling without a GPU, signature checks, hints, records and the resource table."""

import json

import pytest

from kiln.codegen import aot
from kiln.codegen.kernels import rows
from kiln.codegen.targets import get_target
from kiln.errors import KilnError
from kiln.ir import GraphBuilder, T, TensorType


@pytest.fixture(scope="module")
def gather_kernel():
    """The row kernel of an embedding lookup (bf16 rows of 576) and what it needs to compile."""
    b = GraphBuilder("embedding")
    b.output("out0", b.op("embedding", b.input("in0", TensorType((256, 576), "bf16")), b.input("in1", TensorType((T,), "i32"))))
    variant = rows.plan(b.build(), get_target("h100"), "bf16")
    return rows.load(variant).kernel, rows.signature(variant), rows.constexprs(variant)


@pytest.fixture(scope="module")
def compiled(gather_kernel):
    fn, signature, constexprs = gather_kernel
    return aot.compile_kernel(fn, signature, constexprs, get_target("h100"), num_warps=4, num_stages=1)


def test_compiles_a_cubin_for_the_target(compiled):
    assert aot.cubin_arch(compiled.binary) == "sm_90a"
    assert compiled.arch == "sm_90a" and compiled.target == "h100"
    assert compiled.name.startswith("rows__bf16__")
    assert compiled.metadata["num_warps"] == 4
    assert {"ttir", "ttgir", "llir", "ptx"} <= set(compiled.asm)
    assert compiled.resources.registers > 0 and not compiled.resources.spills


def test_launch_metadata_holds_what_a_launcher_needs(compiled):
    launch = compiled.launch_metadata
    for key in ("num_warps", "num_ctas", "shared", "tmem_size", "global_scratch_size", "launch_pdl"):
        assert key in launch, key
    assert launch["num_warps"] == 4 and launch["num_ctas"] == 1 and launch["shared"] == 0


def test_record_round_trips_through_json(compiled):
    record = json.loads(json.dumps(compiled.to_record()))
    assert aot.CompiledKernel.from_record(record, compiled.binary) == compiled


def test_alignment_hints_let_the_compiler_vectorize(gather_kernel, compiled):
    fn, signature, constexprs = gather_kernel
    unhinted = {name: kind.split(":")[0] for name, kind in signature.items()}
    plain = aot.compile_kernel(fn, unhinted, constexprs, get_target("h100"), num_warps=4, num_stages=1)
    assert "ld.global.v" in compiled.asm["ptx"]
    assert "ld.global.v" not in plain.asm["ptx"]


def test_signature_must_name_every_argument(gather_kernel):
    fn, signature, constexprs = gather_kernel
    missing = {name: kind for name, kind in signature.items() if name != "p_out0"}
    with pytest.raises(ValueError, match=r"missing \['p_out0'\]"):
        aot.compile_kernel(fn, missing, constexprs, get_target("a100"), num_warps=4, num_stages=1)
    extra = {**signature, "p_extra": "*fp32"}
    with pytest.raises(ValueError, match=r"unknown \['p_extra'\]"):
        aot.compile_kernel(fn, extra, constexprs, get_target("a100"), num_warps=4, num_stages=1)


def test_cpu_target_cannot_be_compiled_for(gather_kernel):
    fn, signature, constexprs = gather_kernel
    with pytest.raises(KilnError, match="no GPU architecture"):
        aot.compile_kernel(fn, signature, constexprs, get_target("cpu"), num_warps=4, num_stages=1)


def test_resource_table_has_a_row_per_kernel(compiled):
    lines = aot.resource_table([compiled, compiled]).splitlines()
    assert lines[0].split() == "kernel target arch warps stages regs stack B spill B shared B".split()
    assert len(lines) == 3
    assert lines[1].split()[:6] == [compiled.name, "h100", "sm_90a", "4", "1", str(compiled.resources.registers)]
