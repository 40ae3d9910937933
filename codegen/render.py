"""Rendering jinja2 kernel templates into importable Triton modules.

Triton reads a `@triton.jit` function's source from its file, so generated kernels are written
to real `.py` files (only when their content changed) and imported from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import jinja2

from kiln.process import cache_dir

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("kiln.codegen", "templates"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def render_template(name: str, **params) -> str:
    """Renders `codegen/templates/<name>` with `params`; a missing parameter is an error."""
    return _ENV.get_template(name).render(**params)


def kernel_cache_dir() -> Path:
    """Where generated kernel sources live: $KILN_CACHE_DIR/kernels, else ~/.cache/kiln/kernels."""
    return cache_dir("kernels")


def write_if_changed(path: Path, text: str) -> Path:
    """Writes `text` to `path` unless it already holds exactly that text (keeps mtimes stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def load_kernel_module(source: str, cache_key: str, directory: Path | None = None) -> ModuleType:
    """Writes `source` to `<directory>/<cache_key>.py` and imports it as a module.

    `cache_key` must be a valid file stem (letters, digits, `_`). The module name includes a hash
    of the source, so two different sources under one key never share a `sys.modules` entry.
    """
    path = write_if_changed((directory or kernel_cache_dir()) / f"{cache_key}.py", source)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    module_name = f"kiln_generated.{cache_key}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
