"""Reading and writing adapter files. ``load`` picks the reader from what the path holds."""

from __future__ import annotations

from pathlib import Path

from .base import Adapter, ModuleInfo, memory_adapter, natural_key
from .formats import open_adapter, write_adapter
from .peft import load_peft, write_peft_folder


def load(path: str | Path, name: str | None = None, convert_to_lora: int | None = None) -> Adapter:
    """Open an adapter lazily (tensors are read module by module when merged): a PEFT folder, a kohya or
    diffusers ``.safetensors`` file, or a Hugging Face model id already in the local hub cache.
    ``convert_to_lora``: the rank LoHa / LoKr modules are converted to (truncated SVD); refused without it."""
    return open_adapter(path, name, convert_to_lora)


__all__ = [
    "Adapter",
    "ModuleInfo",
    "load",
    "load_peft",
    "memory_adapter",
    "natural_key",
    "open_adapter",
    "write_adapter",
    "write_peft_folder",
]
