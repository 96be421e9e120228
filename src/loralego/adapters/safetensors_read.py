"""Read single tensors of a safetensors file with ``pread``, into memory the merge owns and frees.

``safe_open`` memory-maps the whole file; every page a read touches stays resident *in the process* (file
RSS) for as long as the handle lives. A merge keeps one handle per input open across all modules, so its
RSS grew by the full size of every input (3.8 GB for 100 rank-8 Llama-2-7B adapters) although each module
is read once. Reading each tensor's byte range with ``pread`` into a fresh tensor costs the same copy as
``get_tensor`` and leaves nothing mapped: the memory is freed with the module.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

# Byte spans are taken from the header that safe_open has already validated; only little-endian hosts can
# reinterpret the bytes in place (safetensors stores little-endian).
NATIVE = sys.byteorder == "little"


def data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """``{key: (start, end)}`` absolute byte offsets of each tensor's data in the file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {
        key: (base + int(entry["data_offsets"][0]), base + int(entry["data_offsets"][1]))
        for key, entry in header.items()
        if key != "__metadata__"
    }


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
