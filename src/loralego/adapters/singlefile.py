"""What the single-file LoRA formats (kohya, diffusers) share: atomic file writes, shape checks, alphas.

A single-file output is written through :func:`loralego.safeio.atomic_file` (re-exported here): a temporary
folder beside the destination, renamed into place at the end, so a reader never sees a half-written file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from ..safeio import atomic_file, write_text  # noqa: F401 - atomic_file is shared with kohya/diffusers
from .base import Adapter, ModuleInfo, natural_key
from .peft import _DTYPES, file_sha256
from .peft import _has_part as has_part
from .peft import _SafetensorsFile as SafetensorsFile

FLOAT_DTYPES = set(_DTYPES.values())

SUFFIX = ".safetensors"

# Tensor-name fragments of LyCORIS / kohya network types that are not plain LoRA, for one-line refusals.
UNSUPPORTED_FRAGMENTS = {
    "hada_w": "LoHa",
    "lokr_w": "LoKr",
    "lora_mid": "LoCon with a Tucker/CP middle factor (lora_mid)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "oft_": "OFT",
    "ia3_l": "IA3",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
}


def unsupported_feature(key: str) -> str | None:
    """The name of the non-LoRA network a tensor belongs to, if its name says so."""
    for fragment, feature in UNSUPPORTED_FRAGMENTS.items():
        if has_part(key, fragment):  # at the start of a name part: "..._soft_proj" is not OFT
            return feature
    if key.endswith((".diff", ".diff_b")):
        return "full weight differences (.diff)"
    if key.endswith(".bias"):
        return "LoRA with bias"
    return None


def check_factor_shapes(
    path: Path, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], names: tuple[str, str]
) -> None:
    """Linear (``r x in``, ``out x r``) or conv (``r x in x kh x kw``, ``out x r x 1 x 1``) factors of one rank."""
    linear = len(a_shape) == 2 and len(b_shape) == 2
    conv = len(a_shape) == 4 and len(b_shape) == 4 and b_shape[2:] == (1, 1)
    down, up = names
    if not (linear or conv):
        raise LoraLegoError(
            f"{path}: module {module}: {down} {list(a_shape)} and {up} {list(b_shape)} are not LoRA factor shapes"
        )
    if 0 in a_shape or 0 in b_shape:
        raise LoraLegoError(f"{path}: module {module}: rank 0 or empty factor")
    if a_shape[0] != b_shape[1]:
        raise LoraLegoError(f"{path}: module {module}: {down} has rank {a_shape[0]} but {up} has rank {b_shape[1]}")


def read_alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    """A stored ``alpha``: one finite non-zero number (a 0-d tensor, or one element)."""
    if tensor.numel() != 1:
        raise LoraLegoError(f"{path}: tensor {key}: alpha must hold one number, got shape {list(tensor.shape)}")
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value) or value == 0:
        raise LoraLegoError(f"{path}: tensor {key}: alpha must be a finite non-zero number, got {value}")
    return value


def alpha_tensor(alpha: float) -> torch.Tensor:
    """Alphas are written as float32 scalars whatever the weights' dtype: bfloat16 cannot hold e.g. 257."""
    return torch.tensor(float(alpha), dtype=torch.float32)


def require_safetensors_path(out: Path, fmt: str) -> None:
    if out.suffix != SUFFIX:
        raise LoraLegoError(f"{out}: a {fmt} output is one file; give --out a path ending in {SUFFIX}")


def write_text_atomically(out: Path, text: str, *, force: bool = False, kind: str = "yaml") -> Path:
    """A small text file (a recipe copy, a report), written with the same all-or-nothing rule."""
    return write_text(out, text, force=force, kind=kind)


def build_adapter(
    path: Path,
    weights: Any,
    groups: dict[str, tuple[str, str]],
    alphas: dict[str, float],
    *,
    fmt: str,
    factor_names: tuple[str, str],
    name: str | None = None,
    config: dict[str, Any] | None = None,
    use_rslora: bool = False,
) -> Adapter:
    """An :class:`Adapter` over one safetensors file, given each module's ``(A key, B key)`` and its alpha
    (modules without one get ``alpha = rank``, scale 1). Only headers are read here; tensors on demand."""
    if not groups:
        raise LoraLegoError(f"{path}: holds no LoRA tensors")
    modules: dict[str, ModuleInfo] = {}
    dtypes: set[torch.dtype] = set()
    for module in sorted(groups, key=natural_key):
        a_key, b_key = groups[module]
        for key in (a_key, b_key):
            dtype = weights.dtypes[key]
            if dtype not in FLOAT_DTYPES:
                raise LoraLegoError(f"{path}: tensor {key}: not a floating-point tensor")
            dtypes.add(dtype)
        a_shape, b_shape = weights.shapes[a_key], weights.shapes[b_key]
        check_factor_shapes(path, module, a_shape, b_shape, factor_names)
        rank = a_shape[0]
        modules[module] = ModuleInfo(
            module, rank=rank, alpha=alphas.get(module, float(rank)), a_shape=a_shape, b_shape=b_shape
        )

    def loader(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        a_key, b_key = groups[module]
        lora_a, lora_b = weights.get(a_key), weights.get(b_key)
        for key, tensor in ((a_key, lora_a), (b_key, lora_b)):
            if not bool(torch.isfinite(tensor).all()):
                raise LoraLegoError(f"{path}: tensor {key}: contains NaN or Inf")
        return lora_a, lora_b

    return Adapter(
        name=name or path.stem,
        modules=modules,
        loader=loader,
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,  # mixed dtypes: widen, never narrow
        config=dict(config or {}),
        path=path,
        format=fmt,
        sha256=file_sha256(path),
        use_rslora=use_rslora,
        metadata=dict(weights.metadata),
    )


def open_safetensors(path: Path) -> Any:
    """Lazy header access to one safetensors file (shared with the PEFT reader)."""
    return SafetensorsFile(path)


def pair_factors(
    path: Path,
    groups: dict[str, dict[str, str]],
    alpha_keys: dict[str, str],
    slots: tuple[str, str],
    labels: tuple[str, str],
) -> dict[str, tuple[str, str]]:
    """``{module: (down key, up key)}`` from the tensor names grouped by module; every module needs both factors
    and every alpha tensor a module. ``slots`` are the group keys, ``labels`` their names in messages."""
    pairs: dict[str, tuple[str, str]] = {}
    for module, slot in groups.items():
        for which, label in zip(slots, labels, strict=True):
            if which not in slot:
                raise LoraLegoError(f"{path}: module {module} has no {label}.weight tensor")
        pairs[module] = (slot[slots[0]], slot[slots[1]])
    for module, key in alpha_keys.items():
        if module not in pairs:
            raise LoraLegoError(f"{path}: tensor {key}: an alpha without {labels[0]}/{labels[1]} tensors")
    return pairs
