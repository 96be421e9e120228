"""Reading and writing adapter files. ``load`` picks the reader from what the path holds."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraLegoError
from .base import Adapter, ModuleInfo, memory_adapter, natural_key
from .peft import load_peft, write_peft_folder


def load(path: str | Path, name: str | None = None) -> Adapter:
    """Open an adapter (a PEFT folder) lazily; tensors are read module by module when merged."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as error:  # e.g. a parent folder without search permission
        raise LoraLegoError(f"{path}: cannot open: {error.strerror or error}") from None
    if not exists:
        raise LoraLegoError(f"{path}: no such file or folder")
    return load_peft(path, name=name)


__all__ = ["Adapter", "ModuleInfo", "load", "load_peft", "memory_adapter", "natural_key", "write_peft_folder"]
