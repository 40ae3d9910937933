"""The serving half stays light: importing the runtime (engine, executors, server) loads neither the
compiler (`kiln.frontend`, `kiln.passes`, `kiln.codegen`) nor `kiln.ir` (and so not sympy)."""

import json
import subprocess
import sys

RUNTIME_MODULES = ("kiln.runtime.engine", "kiln.runtime.executor", "kiln.runtime.gpu_executor", "kiln.runtime.server",
                   "kiln.runtime.cuda_graphs", "kiln.runtime.cpu_ops")


def test_the_runtime_imports_no_compiler_module():
    probe = (f"import json, sys\nfor name in {RUNTIME_MODULES!r}:\n    __import__(name)\n"
             "print(json.dumps([sorted({m.split('.')[1] for m in sys.modules if m.startswith('kiln.')}), "
             "'sympy' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    packages, sympy_loaded = json.loads(out)
    assert not {"ir", "frontend", "passes", "codegen"} & set(packages), packages
    assert not sympy_loaded


def test_the_compile_cache_lookup_loads_no_compiler_pass():
    """A warm start (`kiln serve MODEL`, `kiln.LLM(MODEL)` on a cache hit) imports the compile
    cache, not the compiler: no tracer, IR, passes, kernel templates or sympy (~0.5 s to import)."""
    probe = ("import json, sys\nimport kiln.llm, kiln.compile_cache\n"
             "print(json.dumps([sorted(m for m in sys.modules if m.startswith('kiln.')), 'sympy' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    modules, sympy_loaded = json.loads(out)
    assert "kiln.compile_cache" in modules and "kiln.frontend.checkpoint" in modules  # what the lookup needs
    heavy = ("kiln.ir", "kiln.passes", "kiln.compiler", "kiln.models", "kiln.frontend.tracer", "kiln.codegen.kernels")
    assert not [m for m in modules if m.startswith(heavy)] and not sympy_loaded, modules
