"""The GGUF container, read fast: metadata as plain python values and a table of tensors whose
data stay memory-mapped.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array, which takes
~17 s for a 262k-token vocabulary (Gemma's); this reads the same file in well under a second by
decoding strings with `struct` and numeric arrays with one `np.frombuffer` each. The layout
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, little-endian, versions 2 and 3):
magic "GGUF", u32 version, u64 tensor count, u64 metadata count; the metadata as (string key,
u32 type, value); then per tensor (string name, u32 n_dims, u64 dims innermost first, u32 type,
u64 offset); then the data, aligned to `general.alignment` (32 by default).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    """One stored tensor: `shape` in HF (row-major, outermost first) order, `data` its bytes as a
    read-only memory-mapped array ([rows, bytes per row] for block-quantized types, else typed)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict       # key -> str / int / float / bool, or a list of them
    tensors: dict[str, GGUFTensor]


def read_gguf_file(path: Path) -> GGUFFile:
    """The metadata and tensor table of GGUF file `path`. Raises ValueError (or struct.error) for a
    file that is not GGUF, is truncated or is damaged."""
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    reader = _Reader(buffer)
    if reader.take(4) != _MAGIC:
        raise ValueError("no GGUF magic number at the start")
    version = reader.scalar("<I")
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} (kiln reads versions {', '.join(map(str, _VERSIONS))}; a "
                         "big-endian file reads as a huge version)")
    tensor_count, kv_count = reader.scalar("<Q"), reader.scalar("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(GGUFValueType(reader.scalar("<I")))
    infos = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = [reader.scalar("<Q") for _ in range(reader.scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(reader.scalar("<I")), reader.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment}, not a power of two")
    start = -(-reader.offset // alignment) * alignment
    data = np.frombuffer(buffer, dtype=np.uint8)
    tensors = {}
    for name, shape, tensor_type, offset in infos:
        if name in tensors:
            raise ValueError(f"tensor {name!r} is stored twice")
        tensors[name] = GGUFTensor(name, shape, tensor_type,
                                   _tensor_data(data, start + offset, shape, tensor_type, name))
    return GGUFFile(metadata, tensors)


def _tensor_data(data: np.ndarray, begin: int, shape: tuple[int, ...], tensor_type: GGMLQuantizationType,
                 name: str) -> np.ndarray:
    """The bytes of one tensor: [rows, bytes per row] (rows = all but the innermost dim)."""
    if tensor_type not in GGML_QUANT_SIZES:
        raise ValueError(f"tensor {name!r} has unknown type {tensor_type!r}")
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    cols = shape[-1] if shape else 1
    if cols % block_size:
        raise ValueError(f"tensor {name!r}: {cols} columns are not a whole number of {block_size}-wide blocks")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = cols // block_size * type_size
    end = begin + rows * row_bytes
    if end > len(data):
        raise ValueError(f"the file ends before tensor {name!r} does (truncated?)")
    return data[begin:end].reshape(rows, row_bytes)


class _Reader:
    """Reads values at a moving offset of a buffer."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.offset = 0

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.buffer):
            raise ValueError("the file ends inside its header (truncated?)")
        out = self.buffer[self.offset:self.offset + n]
        self.offset += n
        return out

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8")

    def value(self, kind: GGUFValueType):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[kind][0])
        item_kind, count = GGUFValueType(self.scalar("<I")), self.scalar("<Q")
        if item_kind in _SCALARS:
            dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder("<")
            values = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
            return values.tolist()
        return [self.value(item_kind) for _ in range(count)]
