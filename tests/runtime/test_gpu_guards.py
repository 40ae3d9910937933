"""The GPU runtime's guards, without a GPU: the launcher refuses an argument that breaks its
signature's ":16" promise (a real kernel, interpreted); the executor installs a torch-backed Triton
allocator on the thread that runs each step; a GPU artifact is refused on a machine without CUDA
and on a GPU of another architecture (the device facts faked with monkeypatch)."""

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from kiln.errors import KilnError
from kiln.runtime import gpu_executor
from kiln.runtime.artifact import Artifact
from kiln.runtime.gpu_executor import GpuExecutor, ScratchAllocator
from kiln.runtime.launcher import Launcher, _Kernel
from kiln.runtime.manifest import Manifest, ModelInfo, TokenizerInfo
from kiln.runtime.step_support import Kernel

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="launches a kernel from its source under Triton's interpreter")

DOUBLE = '''import triton
import triton.language as tl


@triton.jit
def kernel(p_x, p_out, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(p_out + offsets, tl.load(p_x + offsets, mask=mask) * 2, mask=mask)
'''


def _entry(n_kind: str = "i32") -> dict:
    """A kernel-table entry as the compiler writes it for DOUBLE (pointers promised 16-byte aligned)."""
    return {"signature": {"p_x": "*fp32:16", "p_out": "*fp32:16", "n": n_kind}, "constexprs": {"BLOCK": 16},
            "num_warps": 1, "num_stages": 1}


@pytest.fixture
def launcher(tmp_path):
    """An interpreted launcher of DOUBLE as `double`, and as `double_n16`, whose `n` is promised a multiple of 16."""
    (tmp_path / "kernels").mkdir()
    for name in ("double", "double_n16"):
        (tmp_path / "kernels" / f"{name}.py").write_text(DOUBLE)
    return Launcher(tmp_path, {"double": _entry(), "double_n16": _entry("i32:16")}, "cpu")


def _launch(launcher: Launcher, name: str, *args) -> None:
    launcher.launch(Kernel(name, lambda: (1,)), (), *args)


@interpreted
def test_aligned_tensors_and_views_at_16_byte_offsets_launch(launcher):
    x = torch.arange(32, dtype=torch.float32)
    out = torch.zeros(32)
    _launch(launcher, "double", x, out, 16)
    _launch(launcher, "double", x[4:], out[16:], 16)  # 16 bytes in: the packed-row views a program passes
    assert torch.equal(out, torch.cat([2 * x[:16], 2 * x[4:20]]))


@interpreted
@pytest.mark.parametrize("misaligned", ["p_x", "p_out"])
def test_a_misaligned_view_is_refused_before_the_kernel_runs(launcher, misaligned):
    x, out = torch.arange(32, dtype=torch.float32), torch.zeros(32)
    views = {"p_x": x, "p_out": out, misaligned: {"p_x": x, "p_out": out}[misaligned][1:]}  # 4 bytes in
    with pytest.raises(KilnError, match=rf"kernel double: argument {misaligned} \(\*fp32:16\) is a torch.float32 "
                                        r"tensor at address 0x[0-9a-f]+ \(element offset 1 in its storage\), not "
                                        r"16-byte aligned.*kiln bug"):
        _launch(launcher, "double", views["p_x"], views["p_out"], 16)
    assert not out.any(), "the kernel ran"


@interpreted
def test_an_integer_promised_divisible_by_16_is_checked_too(launcher):
    x, out = torch.ones(16), torch.zeros(16)
    with pytest.raises(KilnError, match=r"argument n \(i32:16\) is 8, not a multiple of 16"):
        _launch(launcher, "double_n16", x, out, 8)
    _launch(launcher, "double_n16", x, out, 16)
    assert torch.equal(out, 2 * x)
    with pytest.raises(TypeError, match="double takes 3 runtime arguments, got 2"):
        _launch(launcher, "double", x, out)


def test_the_alignment_check_reads_device_pointers(device):
    """The check the compiled path runs too, on this machine's device memory (CUDA on a GPU)."""
    kernel = _Kernel("double", ["p_x", "p_out", "n", "BLOCK"], _entry())
    buffer = torch.zeros(64, device=device)
    kernel.check((buffer, buffer[4:], 3))  # 16 bytes in
    with pytest.raises(KilnError, match=r"argument p_out \(\*fp32:16\) is a torch.float32 tensor .*element offset 2"):
        kernel.check((buffer, buffer[2:], 3))


@pytest.mark.parametrize("alignment", [1, 128, 4096])
def test_the_scratch_allocator_gives_aligned_bytes(device, alignment):
    scratch = ScratchAllocator(torch.device(device))(1000, alignment, None)
    assert scratch.dtype == torch.int8 and scratch.numel() == 1000 and scratch.device.type == device
    assert scratch.data_ptr() % alignment == 0


def test_every_step_installs_the_scratch_allocator_on_its_own_thread():
    """Triton keeps its allocator per thread context (a new thread starts without it), and the
    server steps the engine on its own thread: the executor's step installs it before running."""
    from triton.runtime import _allocation

    scratch = ScratchAllocator(torch.device("cpu"))
    scratch.install()
    seen = []
    executor = object.__new__(GpuExecutor)  # the executor's step, with the program run replaced
    executor._scratch, executor.graphs, executor.states, executor.state_pool = scratch, None, {}, {}
    executor.host_tier = None
    executor._run = lambda batch, states: seen.append(_allocation._allocator.get()) or torch.zeros(1, 4)

    def step():
        seen.append(_allocation._allocator.get())
        executor.execute(SimpleNamespace(state_copies=(), kv_transfers=()))

    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    assert seen[0] is not scratch and seen[1] is scratch


def _artifact(tmp_path: Path, target: str, arch: str) -> Artifact:
    """A GPU artifact's manifest as far as the device checks read it: its target and kernel table."""
    manifest = Manifest(format=5, kiln_version="", runtime_source="", triton_version="", target=target, dtype="bf16",
                        block_size=16,
                        model=ModelInfo("tiny", "LlamaForCausalLM", {}), vocab_size=512, max_model_len=256,
                        cache_groups=(), tokenizer=TokenizerInfo(None, None, None, ()), generation_config={}, graph={},
                        files={}, manifest_sha256="", tensor_parallel=1,
                        kernels={"gemm": {"arch": arch}, "rows": {"arch": arch}})
    return Artifact(tmp_path / target, manifest)


def test_interpreted_weights_sit_in_their_own_allocations_as_on_a_gpu(tmp_path):
    """A mapped safetensors file puts a 3-element bf16 tensor's successor 6 bytes further: the
    interpreted executor copies the weights out, so the alignment checks see what a GPU run would."""
    artifact = _artifact(tmp_path, "b200", "sm_100a")
    artifact.path.mkdir()
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.bfloat16)}
    safetensors.torch.save_file(tensors, artifact.file("weights.safetensors"))
    assert any(t.data_ptr() % 16 for t in safetensors.torch.load_file(artifact.file("weights.safetensors")).values())
    weights = gpu_executor._load_weights(artifact, torch.device("cpu"))
    assert all(weights[name].data_ptr() % 16 == 0 and torch.equal(weights[name], tensors[name]) for name in tensors)


def _fake_gpu(monkeypatch, capability: tuple[int, int], name: str, gcn_arch: str | None = None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", "6.2" if gcn_arch else None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(gcnArchName=gcn_arch))


def test_a_gpu_artifact_without_a_cuda_device_points_to_interpret_and_the_cpu_target(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KilnError, match=r"holds b200 kernels \(sm_100a\), but this machine has no CUDA GPU.*"
                                        r"--target cpu.*--interpret"):
        GpuExecutor(_artifact(tmp_path, "b200", "sm_100a"))


def test_a_gpu_artifact_on_another_architecture_names_both_before_loading_anything(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(KilnError, match=r"compiled for b200 \(sm_100a\), but this GPU \(NVIDIA H100 80GB HBM3\) is sm_90: "
                                        r"recompile with the --target of this GPU, or serve this artifact on b200 hardware"):
        GpuExecutor(_artifact(tmp_path, "b200", "sm_100a"))  # the artifact has no weights: nothing was loaded


@pytest.mark.parametrize("target, arch, capability, runs", [
    ("h100", "sm_90a", (9, 0), True),
    ("h200", "sm_90a", (9, 0), True),
    ("b200", "sm_100a", (10, 0), True),
    ("l40s", "sm_89", (8, 9), True),
    ("a100", "sm_80", (8, 0), True),
    ("h100", "sm_90a", (10, 0), False),  # arch-specific code: that capability only
    ("b200", "sm_100a", (10, 3), False),
    ("b200", "sm_100a", (12, 0), False),
    ("a100", "sm_80", (8, 6), False),  # the cubin would load, but the tiles are the A100's: exact capability
    ("a100", "sm_80", (9, 0), False),  # another major: no PTX to JIT
    ("l40s", "sm_89", (8, 0), False),
])
def test_a_gpu_artifact_runs_only_on_the_capability_it_was_compiled_for(tmp_path, monkeypatch, target, arch,
                                                                          capability, runs):
    _fake_gpu(monkeypatch, capability, "a GPU")
    artifact = _artifact(tmp_path, target, arch)
    if runs:
        gpu_executor._check_gpu(artifact)
    else:
        with pytest.raises(KilnError, match=rf"compiled for {target} \({arch}\), but this GPU \(a GPU\) is "
                                            rf"sm_{capability[0]}{capability[1]}:"):
            gpu_executor._check_gpu(artifact)


def test_amd_gpus_are_matched_by_their_gfx_arch(tmp_path, monkeypatch):
    """Under a ROCm torch the device is named by its gfx arch (not its capability, which ROCm fakes)."""
    _fake_gpu(monkeypatch, (9, 4), "AMD Instinct MI300X", gcn_arch="gfx942:sramecc+:xnack-")
    gpu_executor._check_gpu(_artifact(tmp_path, "mi300x", "gfx942"))
    with pytest.raises(KilnError, match=r"compiled for h100 \(sm_90a\), but this GPU \(AMD Instinct MI300X\) is gfx942"):
        gpu_executor._check_gpu(_artifact(tmp_path, "h100", "sm_90a"))
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    with pytest.raises(KilnError, match=r"compiled for mi300x \(gfx942\), but this GPU .* is sm_90"):
        gpu_executor._check_gpu(_artifact(tmp_path, "mi300x", "gfx942"))
