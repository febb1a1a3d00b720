"""A lean GGUF reader: metadata, tensor table and memory-mapped tensor bytes.

``gguf.GGUFReader`` turns every vocabulary entry of the metadata into numpy objects (about
0.7 GB for Gemma's 262k-token vocabulary); this reader skips large arrays and keeps only
scalars, strings and short arrays, and validates every tensor's byte range against the file
size. Layout (GGUF v2/v3, little-endian): ``GGUF`` magic, version u32, tensor count u64, KV
count u64; KV pairs (key string, value type u32, value); tensor infos (name, n_dims u32,
dims u64 × n_dims fastest first, ggml type u32, offset u64); padding to ``general.alignment``
(default 32); tensor data.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from ._errors import CheckpointError

# GGUF metadata value types -> struct formats (8 = string, 9 = array).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_LEN = 4096  # longer arrays (vocabularies, merges, scores) are skipped


@dataclasses.dataclass(frozen=True)
class SkippedArray:
    """Placeholder for a metadata array too long to keep (only its length is known)."""

    length: int


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) shape: ``(d_out, d_in)`` for a weight."""
        return tuple(reversed(self.dims))


class GGUFFile:
    """Header of a GGUF file, parsed without materialising its vocabulary."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise CheckpointError(self.path, f"cannot read GGUF file ({e})") from e
        self._pos = 0
        try:
            self._parse()
        except CheckpointError:
            raise
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError) as e:
            problem = f"corrupted or truncated GGUF header ({type(e).__name__}: {e})"
            raise CheckpointError(self.path, problem) from e

    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value[0]

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        s = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _skip_string(self) -> None:
        n = self._read("<Q")
        self._pos += n

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._read("<I"), self._read("<Q")
            if count > _KEEP_ARRAY_LEN:
                if itype in _SCALARS:
                    self._pos += count * struct.calcsize(_SCALARS[itype])
                elif itype == _STRING:
                    for _ in range(count):
                        self._skip_string()
                else:
                    raise ValueError(f"unsupported nested array type {itype}")
                if self._pos > len(self._buf):
                    raise ValueError("array runs past the end of the file")
                return SkippedArray(count)
            return [self._value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        import gguf

        if len(self._buf) < 24 or bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic or too short)")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I")
            dims = tuple(self._read("<Q") for _ in range(n_dims))
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        size = len(self._buf)
        self.tensors = []
        for name, dims, ggml_type, offset in infos:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            elements = int(np.prod(dims, dtype=np.int64))
            if dims and dims[0] % block:
                raise ValueError(
                    f"tensor {name!r}: row of {dims[0]} is not a multiple of block {block}"
                )
            nbytes = elements // block * type_size
            start = data_start + offset
            if start + nbytes > size:
                raise CheckpointError(
                    self.path,
                    f"truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                    f"the file has {size}",
                )
            self.tensors.append(GGUFTensorInfo(name, dims, ggml_type, start, nbytes))

    def raw(self, tensor: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes as ``gguf.quants.dequantize`` expects them (a view, no copy).

        Float types come typed with the numpy shape; block-quantized types as ``uint8`` rows
        ``(rows, bytes per row)``.
        """
        import gguf

        qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
        typed = {
            gguf.GGMLQuantizationType.F32: np.float32,
            gguf.GGMLQuantizationType.F16: np.float16,
        }
        data = self._buf[tensor.offset : tensor.offset + tensor.nbytes]
        if qtype in typed:
            return data.view(typed[qtype]).reshape(tensor.shape)
        rows = int(np.prod(tensor.shape[:-1], dtype=np.int64)) if len(tensor.shape) > 1 else 1
        return data.reshape(rows, -1)
