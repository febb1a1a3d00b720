"""Minimal safetensors reader and writer that never copy a whole model.

The format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes. Reading reads one tensor at a time into its own memory;
writing streams one tensor at a time. Every inconsistency (short file, bad JSON, offsets out of
range, sizes that do not match shapes) raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import struct

import ml_dtypes
import numpy as np

from fw_jax import _progress

from ._errors import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazily readable tensors of one ``.safetensors`` file (validated on open)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(self.path, "truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(
                        self.path, f"corrupted safetensors header (length {n}, file size {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read file ({e})") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(self.path, f"corrupted safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "corrupted safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    self.path, f"tensor {name!r}: bad header entry {info!r}"
                ) from e
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    self.path,
                    f"tensor {name!r}: {end - begin} bytes for shape {shape} {info['dtype']}",
                )
            if end > data_size:
                raise CheckpointError(
                    self.path,
                    f"truncated file: tensor {name!r} ends at byte {end} "
                    f"of a {data_size}-byte data section",
                )
            self._entries[name] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` read into memory of its own (one read, no memory map: what was read is
        freed with the array, so streaming a large checkpoint does not grow the process)."""
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        out = np.empty(count, dtype=dtype)
        view = memoryview(out.view(np.uint8).reshape(-1))
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._data_start + begin)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(self.path, f"truncated file while reading tensor {name!r}")
                    done += n
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read tensor {name!r} ({e})") from e
        return out.reshape(shape)


class WriteError(OSError):
    """A file of an output could not be written (the disk is full, a quota, permissions); the
    message names the file. Nothing is presented as finished: the caller's temporary is removed."""

    def __init__(self, path, error: OSError):
        reason = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            reason += " (the disk is full: free space, or choose an --out on a larger disk)"
        super().__init__(error.errno, f"cannot write {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict | None = None, *,
                      progress: bool = True, fsync: bool = False) -> None:
    """Stream tensors to ``path``, converting one at a time.

    ``tensors`` is a list of ``(name, shape, dtype, get_array)`` so only one tensor is
    materialised in host memory at any moment; each array is converted to ``dtype`` (float32 to
    bfloat16 or float16 rounds to nearest even). ``progress``: a bar over the tensors;
    ``fsync``: flush to the disk before returning. Raises :class:`WriteError` when the file
    cannot be written.
    """
    header = {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            reporter = _progress.current() if progress else _progress.Progress(_progress.QUIET)
            with reporter.steps(len(tensors), f"saving {os.path.basename(os.fspath(path))}",
                                unit="tensor") as steps:
                for name, shape, dtype, get_array in tensors:
                    arr = np.ascontiguousarray(np.asarray(get_array(), dtype=dtype))
                    if arr.shape != tuple(shape):
                        raise ValueError(f"{name}: shape {arr.shape} != declared {tuple(shape)}")
                    f.write(arr.reshape(-1).view(np.uint8))
                    del arr
                    steps.advance()
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e
