"""Reading safetensors files: one header parser, one dtype table, tensors read with ``pread``.

``safe_open`` memory-maps the whole file; every page a read touches stays resident *in the process* (file
RSS) for as long as the handle lives. A merge keeps one handle per input open across all modules, so its
RSS grew by the full size of every input (3.8 GB for 100 rank-8 Llama-2-7B adapters) although each module
is read once. Reading each tensor's byte range with ``pread`` into a fresh tensor costs the same copy as
``get_tensor`` and leaves nothing mapped: the memory is freed with the module.

The header is parsed here once and checked as an untrusted input (the public layout: an 8-byte
little-endian length, a JSON object of ``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``, then
the data); every tensor's byte span must lie inside the file and match its shape and dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError

# The file dtypes a LoRA factor may have (safetensors name -> torch dtype); the writer uses the inverse.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = frozenset(DTYPES.values())
# Other dtypes a header may name (integer alphas, masks): read, but never as a factor.
_OTHER_DTYPES = {
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ALL_DTYPES = {**DTYPES, **_OTHER_DTYPES}

# Only little-endian hosts can reinterpret the bytes in place (safetensors stores little-endian).
NATIVE = sys.byteorder == "little"
_MAX_HEADER = 100 << 20


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def parse_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(entries, metadata, data start)`` of a safetensors file; any malformation is a ValueError worded as
    the safetensors library words it (header too small / too large, invalid header length, invalid UTF-8 or
    JSON in header, invalid shape, data type, or offset, file not fully covered)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("header too small")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise ValueError(f"header too large ({length} bytes)")
        if length > size - 8:
            raise ValueError(f"invalid header length {length} (the file has {size} bytes)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("invalid UTF-8 in header") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"invalid JSON in header ({_one_line(error)})") from None
    if not isinstance(header, dict):
        raise ValueError("invalid JSON in header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("invalid JSON in header (__metadata__ must map names to strings)")
    base = 8 + length
    spans = []
    for key, entry in header.items():
        bad = f"invalid shape, data type, or offset for tensor {key}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(bad)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        good_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        if dtype not in _ALL_DTYPES or not good_shape:
            raise ValueError(bad)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(bad)
        start, end = offsets
        itemsize = torch.empty((), dtype=_ALL_DTYPES[dtype]).element_size()
        if not 0 <= start <= end or end - start != math.prod(shape) * itemsize:
            raise ValueError(bad)
        spans.append((start, end))
    position = 0  # the tensors' bytes must tile the data section exactly: no gap, no overlap, nothing after
    for start, end in sorted(spans):
        if start != position:
            raise ValueError("file not fully covered (tensor data overlaps or leaves gaps)")
        position = end
    if base + position != size:
        raise ValueError(f"file not fully covered (tensor data ends at byte {base + position} of {size})")
    return header, metadata, base


def read_tensor(path: Path, span: tuple[int, int], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor stored at ``span``: read straight into a new tensor's memory (no intermediate bytes)."""
    start, end = span
    data = torch.empty(end - start, dtype=torch.uint8)
    view = memoryview(data.numpy())
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < len(view):  # a regular file returns everything at once; loop for the exceptions
            got = os.preadv(handle.fileno(), [view[done:]], start + done)
            if got == 0:
                raise OSError(f"file ended at byte {start + done} (expected {end}); was it changed while read?")
            done += got
    return data.view(dtype).reshape(shape)


class SafetensorsFile:
    """Lazy access to one safetensors file: names, shapes, dtypes and metadata from the header, tensors on
    demand. ``dtypes`` holds None for a dtype that cannot be a LoRA factor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            raise LoraLegoError(f"{path}: expected a file, found a folder")
        try:
            entries, self.metadata, base = parse_header(path)
        except Exception as error:  # any failure to parse an untrusted file is a refusal, whatever its type
            reason = error.strerror if isinstance(error, OSError) and error.strerror else _one_line(error)
            raise LoraLegoError(f"{path}: not a readable safetensors file ({reason})") from None
        self.keys = list(entries)
        self.shapes = {key: tuple(entry["shape"]) for key, entry in entries.items()}
        self.dtypes: dict[str, torch.dtype | None] = {key: DTYPES.get(entry["dtype"]) for key, entry in entries.items()}
        self._stored = {key: _ALL_DTYPES[entry["dtype"]] for key, entry in entries.items()}
        self._spans = {
            key: (base + entry["data_offsets"][0], base + entry["data_offsets"][1]) for key, entry in entries.items()
        }

    def get(self, key: str) -> torch.Tensor:
        try:
            if NATIVE:
                return read_tensor(self.path, self._spans[key], self._stored[key], self.shapes[key])
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as error:  # a file that parsed but cannot be read back is still the file's fault
            raise LoraLegoError(f"{self.path}: tensor {key}: cannot read ({_one_line(error)})") from None
