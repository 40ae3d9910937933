"""How a generated GPU step program (codegen/gpu_program.py) runs its kernels.

The program calls, per step: `to_device(t)` for the step inputs, `constant(t)` for its module
constants (rotary tables), `empty(shape, dtype)` for the memory plan's buffers,
`max_context(seq_lens)` for the context length split-K decode is sized for, and
`launch(kernel, sizes, *args)` per kernel, where `kernel` is a `step_support.Kernel` (its name
and grid function), `sizes` the step sizes its grid function takes, and args the kernel's
runtime arguments in signature order (constexprs come from the kernel table). A kernel with
`scratch` (split-K GEMM) gets two more arguments, appended here: an fp32 workspace, fresh per
launch, and int32 counters from one zeroed buffer that such kernels leave at zero. Kernels are
found by name in a directory that holds `kernels/<name>.py` and, for compiled runs,
`binaries/<name>.<cubin|hsaco>` + `binaries/<name>.json` (Triton's metadata).

Two ways to run a kernel:
  compiled     on a GPU, from the AOT binary, without recompiling and without importing its
               source: Triton's own `CompiledKernel` over the metadata and binary, given the
               argument names, types and constexprs from the kernel table; its launcher is a
               small C stub that Triton compiles with gcc on first use.
  interpreted  on a CPU under TRITON_INTERPRET=1, from the kernel's source (verification); the
               sources import kiln.runtime.triton_device only.

Alignment: an argument whose signature in the kernel table ends in ":16" was compiled on the
promise that it is divisible by 16 (a pointer: 16-byte aligned); when it is not, the binary's
vector loads and stores fault (a misaligned address ends the CUDA context) or read wrong data.
Every launch checks the promise first (`data_ptr() % 16` per such tensor: about 2 us for six
pointers, on eager launches only) and raises a KilnError naming the kernel and the argument.
Interpreted runs check it too, so a CPU verification run catches a misaligned view before a GPU
run would. A CUDA-graph replay launches nothing from Python: its pointers are the ones checked
when the graph was captured.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from kiln.errors import KilnError
from kiln.process import apply_interpreter_fixes
from kiln.runtime.step_support import Kernel


def _import_kernel(path: Path) -> ModuleType:
    if not path.is_file():
        raise KilnError(f"kernel source {path} is missing; recompile the artifact")
    name = f"kiln_kernel_{path.stem}_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None  # a .py file
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _Kernel:
    """What both ways of running a kernel share: checking a launch's runtime arguments (their
    count, and the ":16" promises of the kernel table's signature) against the kernel's parameters
    (`arg_names`, constexprs included, in order)."""

    def __init__(self, name: str, arg_names: list[str], entry: dict):
        self.name = name
        self.arguments = [arg for arg in arg_names if arg not in entry["constexprs"]]  # in launch order
        self.aligned = [(index, arg, entry["signature"][arg]) for index, arg in enumerate(self.arguments)
                        if entry["signature"][arg].endswith(":16")]

    def check(self, args: tuple) -> None:
        """Raises unless `args` are as many as the runtime arguments and keep every ":16" promise."""
        if len(args) != len(self.arguments):
            raise TypeError(f"{self.name} takes {len(self.arguments)} runtime arguments, got {len(args)}")
        for index, arg, kind in self.aligned:
            value = args[index]
            if (value.data_ptr() if isinstance(value, torch.Tensor) else value) % 16:
                raise _misaligned(self.name, arg, kind, value)


def _misaligned(kernel: str, arg: str, kind: str, value) -> KilnError:
    if isinstance(value, torch.Tensor):
        what = (f"a {value.dtype} tensor at address {value.data_ptr():#x} (element offset {value.storage_offset()} "
                "in its storage), not 16-byte aligned")
    else:
        what = f"{value}, not a multiple of 16"
    return KilnError(f"kernel {kernel}: argument {arg} ({kind}) is {what}; the kernel was compiled on that promise "
                     "and would fault or read wrong data. This is a kiln bug (the step program passed a misaligned view): "
                     "report it with the model and --target")


class _Interpreted(_Kernel):
    """A kernel from its source, run by Triton's interpreter."""

    def __init__(self, directory: Path, name: str, entry: dict):
        apply_interpreter_fixes()
        self.kernel = _import_kernel(directory / "kernels" / f"{name}.py").kernel
        super().__init__(name, self.kernel.arg_names, entry)
        self.options = {**entry["constexprs"], "num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}

    def prepare(self) -> None:
        """Nothing to load beyond the source."""

    def __call__(self, grid: tuple[int, ...], args: tuple) -> None:
        self.check(args)
        self.kernel[grid](*args, **self.options)


class _BinarySource:
    """What Triton's `CompiledKernel` and its launcher read of the kernel's source (an ASTSource):
    the parameter names, their types and the constexprs, all from the kernel table."""

    def __init__(self, signature: dict[str, str], constexprs: dict[str, object]):
        self.fn = SimpleNamespace(arg_names=list(signature))
        self.signature = signature
        self.constants = {(index,): constexprs[arg] for index, arg in enumerate(signature) if arg in constexprs}


class _Compiled(_Kernel):
    """A kernel from its AOT binary, through Triton's CompiledKernel (no recompilation, and no
    import of its source: the kernel table says everything the launch needs)."""

    def __init__(self, directory: Path, name: str, entry: dict):
        from triton.compiler.compiler import CompiledKernel

        signature, constexprs = dict(entry["compiled_signature"]), entry["constexprs"]  # [name, type] pairs, in order
        binary = directory / "binaries" / f"{name}.{entry['binary']}"
        files = {f"{name}.json": directory / "binaries" / f"{name}.json", binary.name: binary}
        for path in files.values():
            if not path.is_file():
                raise KilnError(f"kernel binary {path} is missing; recompile the artifact")
        super().__init__(name, list(signature), entry)
        source = _BinarySource(signature, constexprs)
        self.kernel = CompiledKernel(source, {k: str(v) for k, v in files.items()}, name)
        # The launcher takes every argument in signature order, constexprs included (ignored).
        self.slots = [(kind == "constexpr", constexprs.get(arg)) for arg, kind in signature.items()]

    def prepare(self) -> None:
        """Loads the binary into the GPU context and builds the launcher stub (gcc, cached by Triton)."""
        self.kernel._init_handles()

    def __call__(self, grid: tuple[int, ...], args: tuple) -> None:
        self.check(args)
        given = iter(args)
        full = [value if fixed else next(given) for fixed, value in self.slots]
        self.kernel[tuple(grid) + (1,) * (3 - len(grid))](*full)


class Launcher:
    """Runs a program's kernels on `device`: compiled binaries on CUDA, interpreted sources on CPU.

    directory: holds kernels/ (and binaries/ on CUDA); table: kernel name -> its entry in the
    artifact's kernel table (constexprs, num_warps, num_stages; compiled_signature on CUDA).
    Kernels load on first launch (so a warm-up step loads them all)."""

    dry_run = False  # runtime/cuda_graphs.py's planning launcher runs nothing: a program's collectives then wait for no one

    def __init__(self, directory: Path, table: dict[str, dict], device: torch.device | str):
        self.directory, self.table, self.device = Path(directory), table, torch.device(device)
        self.interpreted = self.device.type == "cpu"
        if self.interpreted and os.environ.get("TRITON_INTERPRET") != "1":
            raise KilnError("running GPU kernels on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                            "before starting (kiln.process.enable_interpreter)")
        self.kernels: dict[str, _Interpreted | _Compiled] = {}
        self.constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._zeroed: torch.Tensor | None = None  # split-K counters, allocated at the first need

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def constant(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the device, copied once (a program's module constant)."""
        entry = self.constants.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            entry = self.constants[id(tensor)] = (tensor, tensor.to(self.device))
        return entry[1]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def max_context(self, seq_lens: torch.Tensor) -> int:
        """The longest context of the step, from its host copy of seq_lens [B] (no GPU sync):
        what split-K decode chooses its number of splits for."""
        return int(seq_lens.max())

    def load_all(self) -> None:
        """Loads every kernel of the table now (serving then never pauses to load one)."""
        for name in self.table:
            self._kernel(name).prepare()

    def launch(self, kernel: Kernel, sizes: tuple[int, ...], *args) -> None:
        """Runs `kernel` over its grid for the step `sizes`, with its runtime `args` (signature
        order), plus its scratch (workspace, counters) when it has some."""
        if kernel.scratch is not None:
            values, counters = kernel.scratch(*sizes)
            args += (self.empty((max(values, 1),), torch.float32), self._counters(counters))
        self._kernel(kernel.name)(kernel.grid(*sizes), args)

    def _counters(self, count: int) -> torch.Tensor:
        """`count` int32 counters at zero (kernels that take counters leave them at zero)."""
        if self._zeroed is None or self._zeroed.numel() < count:
            size = max(count, 1024, 0 if self._zeroed is None else 2 * self._zeroed.numel())
            self._zeroed = torch.zeros(size, dtype=torch.int32, device=self.device)
        return self._zeroed[:count]

    def _kernel(self, name: str) -> _Interpreted | _Compiled:
        kernel = self.kernels.get(name)
        if kernel is None:
            if name not in self.table:
                raise KilnError(f"the program launches kernel {name}, which the artifact's kernel table lacks; "
                                "recompile the artifact")
            loader = _Interpreted if self.interpreted else _Compiled
            kernel = self.kernels[name] = loader(self.directory, name, self.table[name])
        return kernel
