"""A target is one file: the registry finds every module of codegen/targets (and KILN_TARGETS_PATH),
the CLI and the runtime learn its name from there, and rtx5090 (sm_120a) and mi300x (gfx942
hsaco) cross-compile without spills."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.codegen import aot
from kiln.codegen.targets import TARGETS, get_target, target_for_device
from kiln.errors import KilnError

TARGETS_DIR = Path(aot.__file__).parent / "targets"
NEW_TARGET = '''"""A test GPU: the H100's record under another name, with fewer SMs."""
import dataclasses

from kiln.codegen.targets.h100 import TARGET as H100

TARGET = dataclasses.replace(H100, name="testgpu", sm_count=7)
'''
COMPILE_A_KERNEL = '''
from kiln.codegen import aot
from kiln.codegen.kernels import rows
from kiln.codegen.targets import get_target
from kiln.ir import GraphBuilder, T, TensorType

b = GraphBuilder("embedding")
b.output("out0", b.op("embedding", b.input("in0", TensorType((256, 576), "bf16")), b.input("in1", TensorType((T,), "i32"))))
target = get_target("testgpu")
variant = rows.plan(b.build(), target, "bf16")
kernel = aot.compile_kernel(rows.load(variant).kernel, rows.signature(variant), rows.constexprs(variant), target,
                            num_warps=4, num_stages=1)  # interpreted: in a compile worker, which must find testgpu
print(kernel.target, aot.cubin_arch(kernel.binary), kernel.resources.spills, target.arch)
'''


def test_every_module_of_the_package_is_a_target_named_like_its_file():
    modules = {path.stem for path in TARGETS_DIR.glob("*.py") if not path.stem.startswith("_")}
    assert set(TARGETS) == modules
    assert {"h200", "rtx5090", "mi300x", "cpu"} <= modules
    assert list(TARGETS)[-1] == "cpu"
    for name, target in TARGETS.items():
        assert target.name == name


def test_h200_is_its_own_record():
    h100, h200 = get_target("h100"), get_target("h200")
    assert h200 is not h100 and h200.arch_name == h100.arch_name == "sm_90a"
    assert (h200.sm_count, h200.hbm_bandwidth_gbs) == (132, 4800.0)


@pytest.mark.parametrize("arch, device, want", [
    (90, "NVIDIA H100 80GB HBM3", "h100"), (90, "NVIDIA H200", "h200"), (90, "NVIDIA H20", "h100"),
    (100, "NVIDIA B200", "b200"), (120, "NVIDIA GeForce RTX 5090", "rtx5090"), (80, "NVIDIA A100-SXM4-80GB", "a100"),
    ("gfx942", "AMD Instinct MI300X", "mi300x")])
def test_the_local_gpu_is_matched_by_architecture_then_by_name(arch, device, want):
    assert target_for_device(arch, device).name == want


def test_a_gpu_without_a_target_is_refused_with_the_known_ones():
    with pytest.raises(KilnError, match=r"no target for this GPU \(NVIDIA V100, sm_70\); known: .*h100"):
        target_for_device(70, "NVIDIA V100")


def test_a_target_module_dropped_in_a_targets_directory_is_listed_and_compiles(tmp_path):
    (tmp_path / "testgpu.py").write_text(NEW_TARGET)
    env = {**os.environ, "KILN_TARGETS_PATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True)  # noqa: E731
    assert "testgpu" in run("-m", "kiln.cli", "compile", "--help").stdout
    assert run("-c", COMPILE_A_KERNEL).stdout.split() == ["testgpu", "sm_90a", "False", "90"]
    # the compile cache tells its tiles apart from another version of the same file
    key = ("from kiln.compiler import CompileOptions, compile_cache_key\n"
           "print(compile_cache_key('smollm2-135m', CompileOptions(target='testgpu')))")
    before = run("-c", key).stdout
    (tmp_path / "testgpu.py").write_text(NEW_TARGET.replace("sm_count=7", "sm_count=8"))
    assert run("-c", key).stdout != before


def test_a_module_must_name_its_target_like_itself(tmp_path):
    (tmp_path / "othergpu.py").write_text(NEW_TARGET)
    env = {**os.environ, "KILN_TARGETS_PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "import kiln.codegen.targets"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "othergpu.py must define TARGET, a Target named 'othergpu'" in result.stderr


@pytest.fixture(scope="module")
def gather_kernel():
    """An embedding lookup's row kernel (bf16 rows of 576) for each target it is planned on."""
    from kiln.codegen.kernels import rows
    from kiln.ir import GraphBuilder, T, TensorType

    b = GraphBuilder("embedding")
    b.output("out0", b.op("embedding", b.input("in0", TensorType((256, 576), "bf16")), b.input("in1", TensorType((T,), "i32"))))
    graph = b.build()

    def compile_for(target):
        variant = rows.plan(graph, target, "bf16")
        return aot.compile_kernel(rows.load(variant).kernel, rows.signature(variant), rows.constexprs(variant), target,
                                  num_warps=variant.num_warps, num_stages=1)

    return compile_for


def test_rtx5090_compiles_sm_120a_cubins(gather_kernel):
    kernel = gather_kernel(get_target("rtx5090"))
    assert aot.cubin_arch(kernel.binary) == kernel.arch == "sm_120a" and "ptx" in kernel.asm
    assert kernel.resources.registers > 0 and not kernel.resources.spills


def test_mi300x_compiles_gfx942_hsacos_and_reads_their_resources(gather_kernel):
    kernel = gather_kernel(get_target("mi300x"))
    assert kernel.binary.startswith(b"\x7fELF") and aot.cubin_arch(kernel.binary) == kernel.arch == "gfx942"
    assert kernel.metadata["warp_size"] == 64 and "amdgcn" in kernel.asm
    assert kernel.resources == aot.amdgpu_resources(kernel.asm["amdgcn"], kernel.name)
    assert kernel.resources.registers > 0 and not kernel.resources.spills


def test_amdgpu_spills_count_vgprs_spilled_to_scratch_not_sgprs_kept_in_vgpr_lanes():
    def amdgcn(vgpr_spills, sgpr_spills, scratch):
        return ("\t.amdgpu_metadata\n---\namdhsa.kernels:\n  - .agpr_count:     32\n"
                f"    .group_segment_fixed_size: 1024\n    .name:           k\n"
                f"    .private_segment_fixed_size: {scratch}\n    .sgpr_count:     106\n"
                f"    .sgpr_spill_count: {sgpr_spills}\n    .vgpr_count:     192\n"
                f"    .vgpr_spill_count: {vgpr_spills}\n...\n\t.end_amdgpu_metadata\n")

    lanes = aot.amdgpu_resources(amdgcn(0, 3, 0), "k")
    assert (lanes.registers, lanes.shared_bytes, lanes.spills) == (192, 1024, False)
    scratch = aot.amdgpu_resources(amdgcn(5, 0, 20), "k")
    assert (scratch.spill_stores, scratch.stack_bytes, scratch.spills) == (20, 20, True)
    with pytest.raises(RuntimeError, match="no kernel other"):
        aot.amdgpu_resources(amdgcn(0, 0, 0), "other")
