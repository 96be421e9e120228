"""A safetensors writer that streams tensors to disk as they are produced.

``safetensors.torch.save_file`` needs every tensor in memory at once; a merge of hundreds of adapters
should hold only the module being merged. Tensors are appended to a data file as they arrive; ``close``
writes the header and the data into the final file. The format is the public safetensors layout: an
8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes), then the raw data.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from .safetensors_read import DTYPE_NAMES


class SafetensorsStreamWriter:
    """Append tensors one by one; ``close()`` produces ``path``. Use as a context manager."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._entries: dict[str, dict[str, object]] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        tensor = tensor.detach().to("cpu").contiguous()
        # reshape(-1): a 0-d tensor (a kohya alpha) cannot be viewed as bytes; the header keeps its shape.
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self._data.write(raw)
        self._entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._offset += len(raw)

    def close(self) -> None:
        self._data.close()
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = dict(sorted(self.metadata.items()))
        header.update(self._entries)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        try:
            with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(encoded)))
                out.write(encoded)
                shutil.copyfileobj(data, out, 1 << 22)
        finally:
            self._data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Remove the data file. Closing flushes, which fails again on a full disk: the unlink must not
        depend on it (the atomic writer removes its temporary folder as well)."""
        try:
            self._data.close()
        except OSError:
            pass
        finally:
            self._data_path.unlink(missing_ok=True)

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
