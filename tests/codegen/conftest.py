"""Fixtures of the GPU code generation tests. Without a CUDA GPU, the generated Triton kernels
run under Triton's interpreter: TRITON_INTERPRET is set here, at import time, before anything
imports a kernel module (tests/conftest.py sets it too; this keeps the folder runnable alone)."""

import contextlib
import os
import sys

import pytest
import torch

import kiln.frontend.checkpoint as checkpoint_module
from kiln.frontend.weights import random_weights

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool only adds synchronisation on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _like_the_gpu_machine():
    """No shipped model loads inside: the built-in names are unknown and `import gguf` fails, as on
    the GPU machine (no model wheels, no gguf package)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_module, "BUILTIN_MODELS", {})
        for module in ("gguf", "kiln.frontend.gguf"):  # None in sys.modules: importing it raises ImportError
            patch.setitem(sys.modules, module, None)
        yield


@pytest.fixture(scope="session")
def like_the_gpu_machine():
    """`with like_the_gpu_machine(): ...`: the fixtures of GPU-marked tests build their checkpoints
    inside it, so that any run of them, on a CPU too, proves they need no shipped model."""
    return _like_the_gpu_machine


def _check_close(actual: torch.Tensor, exact: torch.Tensor, same_dtype_reference: torch.Tensor, slack: float = 2.0):
    """`actual`'s max error against `exact` (fp64) is at most `slack` times that of a torch
    computation in `actual`'s dtype, plus 4 ulps of the dtype at the largest magnitude."""
    assert actual.shape == exact.shape == same_dtype_reference.shape, (actual.shape, exact.shape)
    exact64 = exact.double().cpu()
    error = (actual.double().cpu() - exact64).abs().max().item()
    reference_error = (same_dtype_reference.double().cpu() - exact64).abs().max().item()
    floor = 4 * torch.finfo(actual.dtype).eps * exact64.abs().max().item()
    assert error <= slack * reference_error + floor, (
        f"{actual.dtype}: error {error:.3g} vs same-dtype torch error {reference_error:.3g} (floor {floor:.3g})"
    )


@pytest.fixture
def check_close():
    return _check_close


TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
# Three steps on one paged KV cache: a mixed prefill, a decode-only step, and a mixed step (a
# decode, a chunk that starts mid-context, a fresh prompt).
STEPS = (
    (("a", 17), ("b", 5)),
    (("a", 1), ("b", 1)),
    (("a", 1), ("b", 6), ("c", 3)),
)



class CompiledTiny:
    """A model config traced in `dtype`, lowered, and generated for `target` into `directory`:
    `run(phase, inputs, states)` runs the generated program with interpreted kernels,
    `reference(phase, inputs, states)` the reference interpreter on the same lowered graph."""

    def __init__(self, config: dict, dtype: str, target: str, directory):
        from kiln.codegen.gpu_program import build_gpu_program
        from kiln.codegen.kernel_check import kernel_refusal
        from kiln.codegen.targets import get_target
        from kiln.frontend.tracer import StepConfig, trace
        from kiln.ir.types import DTYPES
        from kiln.models import build_spec
        from kiln.passes import PipelineOptions, materialize_weights, run_pipeline
        from kiln.runtime.launcher import Launcher

        spec = build_spec(config)
        self.traced = trace(spec, StepConfig(dtype=dtype))
        check = lambda body: kernel_refusal(body, get_target(target))  # noqa: E731  (fusion asks the target)
        self.graphs, _ = run_pipeline(self.traced, PipelineOptions(kernel_check=check))
        self.original = {k: v.to(DTYPES[dtype]) for k, v in random_weights(spec).items()}
        self.weights = {k: v for g in self.graphs.values() for k, v in materialize_weights(g, self.original).items()}
        self.program = build_gpu_program(self.graphs, get_target(target))
        self.program.write(directory)
        self.modules = {phase: _import(directory / f"program.{phase}.py") for phase in self.graphs}
        self.launcher = Launcher(directory, self.program.kernel_table(), "cpu")

    def run(self, phase: str, inputs: dict, states: dict) -> torch.Tensor:
        return self.modules[phase].step(inputs, self.weights, states, self.launcher)["logits"]

    def reference(self, phase: str, inputs: dict, states: dict) -> torch.Tensor:
        from kiln.ir import interpret

        return interpret(self.graphs[phase], inputs, self.weights, states)["logits"]


def _import(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"kiln_test_program_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def compile_tiny(tmp_path):
    """`compile_tiny(config=TINY_LLAMA, dtype="f32", target="cpu") -> CompiledTiny`."""
    def build(config: dict = TINY_LLAMA, dtype: str = "f32", target: str = "cpu") -> CompiledTiny:
        directory = tmp_path / f"{target}-{dtype}-{len(list(tmp_path.iterdir()))}"
        return CompiledTiny(config, dtype, target, directory)
    return build


def step_inputs(steps=STEPS, vocab: int = 256, num_blocks: int = 64, seed: int = 1) -> list[tuple[str, dict]]:
    """(phase, inputs) per step: token ids drawn with `seed`, blocks from a shuffled pool."""
    from kiln.ir.step import PagedSequences

    generator = torch.Generator().manual_seed(seed)
    pages = PagedSequences(num_blocks, block_size=16, seed=seed)
    out = []
    for chunks in steps:
        phase = "decode" if all(count == 1 for _, count in chunks) else "mixed"
        out.append((phase, pages.step([(seq, torch.randint(0, vocab, (count,), generator=generator).tolist())
                                       for seq, count in chunks])))
    return out


@pytest.fixture
def helpers():
    """Module-level helpers (pytest's importlib mode keeps test files from importing conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(TINY_LLAMA=TINY_LLAMA, STEPS=STEPS, step_inputs=step_inputs, random_weights=random_weights,
                           check_close=_check_close)
