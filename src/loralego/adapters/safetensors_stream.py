"""A safetensors writer that streams tensors to disk as they are produced, writing each byte once.

``safetensors.torch.save_file`` needs every tensor in memory at once; a merge of hundreds of adapters
should hold only the module being merged. The format is the public safetensors layout: an 8-byte
little-endian header length, a JSON header (which the format lets end in spaces), then the raw data, each
tensor's bytes at the offsets the header names. The header depends on every tensor's shape, known only at
the end, but its size can be bounded up front from the tensor names: the writer reserves that many bytes,
writes each tensor in place behind them as it arrives, and on ``close`` writes the header, padded with
spaces to the reserved size, into the gap. The caller renames the finished file into place (the atomic
writers do), so the output's data is written once, never copied.

Without the names up front (or with more tensors than announced) the reservation is a guess; a header that
outgrows it moves the data back by the difference on ``close`` (read and written again once: correct, only
slower). ``bytes_written`` counts what went to the file, for the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .safetensors_read import DTYPE_NAMES

# The longest header entry a tensor of a given name can have: its quoted name plus
# ``:{"dtype":"BF16","shape":[d,d,d,d],"data_offsets":[o,o]},`` with up to 4 dimensions (a conv LoRA's A) of
# up to 12 digits and offsets of up to 16 digits (10 PB).
_ENTRY_OVERHEAD = len(':{"dtype":"XXXX","shape":[],"data_offsets":[,]},') + 4 * 12 + 3 + 2 * 16
_GUESS = 1 << 16  # bytes reserved for the tensor entries when no names are announced
_MOVE_CHUNK = 1 << 22


def header_reservation(metadata: dict[str, str], names: Iterable[str] | None) -> int:
    """Bytes to reserve for the JSON header (a multiple of 8, so the data starts aligned)."""
    size = len(json.dumps({"__metadata__": dict(sorted(metadata.items()))}, separators=(",", ":"))) + 2
    size += _GUESS if names is None else sum(len(json.dumps(name)) + _ENTRY_OVERHEAD for name in names)
    return size + (-size % 8)


class SafetensorsStreamWriter:
    """Add tensors one by one; ``close()`` completes ``path``. Use as a context manager.

    ``names``: the tensor names that will be added (any order), so the header's space is reserved exactly
    enough; optional (see the module docstring).
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None, names: Iterable[str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._reserved = header_reservation(self.metadata, names)
        self._file = open(self.path, "w+b")  # noqa: SIM115 - closed in close()/abort(); read back by _move_data
        self._file.seek(8 + self._reserved)
        self._entries: dict[str, dict[str, object]] = {}
        self._offset = 0
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        tensor = tensor.detach().to("cpu").contiguous()
        # reshape(-1): a 0-d tensor (a kohya alpha) cannot be viewed as bytes; the header keeps its shape.
        size = tensor.numel() * tensor.element_size()
        if size:
            self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + size],
        }
        self._offset += size
        self.bytes_written += size

    def close(self) -> None:
        try:
            self._write_header()
        finally:
            self._file.close()

    def _write_header(self) -> None:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = dict(sorted(self.metadata.items()))
        header.update(self._entries)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        if len(encoded) > self._reserved:
            needed = len(encoded) + (-len(encoded) % 8)
            self._move_data(8 + self._reserved, 8 + needed)
            self._reserved = needed
        encoded += b" " * (self._reserved - len(encoded))
        self._file.seek(0)
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.bytes_written += 8 + len(encoded)

    def _move_data(self, old_start: int, new_start: int) -> None:
        """Move the data written so far from ``old_start`` to ``new_start`` (later), last chunk first."""
        self._file.flush()
        descriptor = self._file.fileno()
        end = self._offset
        while end > 0:
            start = max(0, end - _MOVE_CHUNK)
            chunk = os.pread(descriptor, end - start, old_start + start)
            os.pwrite(descriptor, chunk, new_start + start)
            self.bytes_written += len(chunk)
            end = start

    def abort(self) -> None:
        """Remove the partial file. Closing flushes, which fails again on a full disk: the unlink must not
        depend on it (the atomic writer removes its temporary folder as well)."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
