"""The in-library view of a LoRA adapter: per-module factors, read lazily, whatever the file format."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from ..msu import Factors, fold_scale


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module. ``a_shape``/``b_shape`` are the stored shapes (4-D for conv LoRAs); the math
    always sees the flattened ``r x d_in`` and ``d_out x r`` factors."""

    name: str
    rank: int
    alpha: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return math.prod(self.a_shape[1:])

    @property
    def d_out(self) -> int:
        return self.b_shape[0]


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# Tensor-name fragments of adapters that are not plain LoRA, and what to call them in the one-line refusal:
# one table for every reader. LoHa / LoKr / lora_mid are converted by the single-file reader, so they are
# refused here only where no conversion applies (PEFT folders: their peft_type is refused first anyway).
UNSUPPORTED_FEATURES = {
    "dora_scale": "DoRA (its magnitude vector rescales the whole weight, which no LoRA merge can carry)",
    "lora_magnitude_vector": "DoRA (its magnitude vector rescales the whole weight, which no LoRA merge can carry)",
    "oft_": "OFT",
    "ia3_l": "IA3",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_E": "AdaLoRA",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "lora_diag": "KaSA (kasa_config)",
}
PEFT_ONLY_FEATURES = {"hada_w": "LoHa", "lokr_w": "LoKr"}


def unsupported_feature(key: str, extra: dict[str, str] | None = None) -> str | None:
    """The name of the non-LoRA network a tensor belongs to, if its name says so."""
    for fragment, feature in {**UNSUPPORTED_FEATURES, **(extra or {})}.items():
        if fragment in key:
            return feature
    if key.endswith((".diff", ".diff_b")):
        return "full weight differences (.diff)"
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as error:
        raise LoraLegoError(f"{path}: cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


# Loads the stored (A, B) tensors of one module, in their file dtype and shape.
TensorLoader = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Adapter:
    """A LoRA adapter: its modules, how to scale them, and a loader for their factors.

    Input adapters read their tensors lazily, one module at a time; merged adapters hold theirs in memory.
    """

    name: str
    modules: dict[str, ModuleInfo]
    loader: TensorLoader
    dtype: torch.dtype
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    format: str = "peft"
    sha256: str | None = None
    use_rslora: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    # Kept energy of each module converted to LoRA by truncated SVD (LoHa / LoKr, --convert-to-lora).
    conversions: dict[str, float] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def scale(self, module: str) -> float:
        info = self.modules[module]
        return info.alpha / (math.sqrt(info.rank) if self.use_rslora else info.rank)

    def stored(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's factors as stored (file dtype and shape)."""
        return self.loader(module)

    def factors(self, module: str, device: torch.device | str = "cpu") -> Factors:
        """The module's factors as float32 ``(A: r x d_in, B: d_out x r)``, scale not applied."""
        lora_a, lora_b = self.loader(module)
        rank = self.modules[module].rank
        return (
            lora_a.to(device=device, dtype=torch.float32).reshape(rank, -1),
            lora_b.to(device=device, dtype=torch.float32).reshape(-1, rank),
        )

    def folded(self, module: str, weight: float = 1.0, device: torch.device | str = "cpu") -> Factors:
        """The module's factors with scale and ``weight`` folded in: its weighted update is ``B @ A``."""
        lora_a, lora_b = self.factors(module, device)
        return fold_scale(lora_a, lora_b, self.scale(module), weight)

    @property
    def total_rank(self) -> int:
        return sum(info.rank for info in self.modules.values())

    def describe(self) -> dict[str, Any]:
        """Summary used by ``loralego inspect``."""
        ranks = sorted({info.rank for info in self.modules.values()})
        scales = sorted({round(self.scale(name), 6) for name in self.modules})
        params = sum(info.rank * (info.d_in + info.d_out) for info in self.modules.values())
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "format": self.format,
            "base_model": self.base_model,
            "task_type": self.config.get("task_type"),
            "modules": len(self.modules),
            "module_kinds": sorted({name.rsplit(".", 1)[-1] for name in self.modules}),
            "ranks": ranks,
            "scales": scales,
            "use_rslora": self.use_rslora,
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": params,
            "bytes": params * torch.finfo(self.dtype).bits // 8,
        }

    def save(self, out: str | Path, *, force: bool = False, command: str | None = None) -> Path:
        """Write this adapter in its format (a PEFT folder, or one kohya / diffusers file), atomically."""
        from .formats import write_adapter

        if self.path is not None:  # --force would otherwise replace (delete) the folder being read
            target, source = Path(out).resolve(), self.path.resolve()
            if target == source or target.is_relative_to(source) or source.is_relative_to(target):
                raise LoraLegoError(f"{out}: output overlaps this adapter's own folder {self.path}; choose another")
        tensors = ((name, *self.stored(name)) for name in self.modules)
        write_adapter(
            self.format,
            Path(out),
            tensors=tensors,
            config=self.config,
            metadata=self.metadata,
            force=force,
            card=command,
            alphas={name: info.alpha for name, info in self.modules.items()},
        )
        return Path(out)


def memory_adapter(
    name: str,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    config: dict[str, Any],
    dtype: torch.dtype,
    metadata: dict[str, str] | None = None,
    order: Iterable[str] | None = None,
) -> Adapter:
    """An adapter held in memory at scale 1 (alpha = r for every module), e.g. a merge result."""
    names = list(order) if order is not None else sorted(tensors, key=natural_key)
    modules = {
        module: ModuleInfo(
            module,
            rank=tensors[module][0].shape[0],
            alpha=float(tensors[module][0].shape[0]),
            a_shape=tuple(tensors[module][0].shape),
            b_shape=tuple(tensors[module][1].shape),
        )
        for module in names
    }
    return Adapter(
        name=name,
        modules=modules,
        loader=lambda module: tensors[module],
        dtype=dtype,
        config=config,
        metadata=dict(metadata or {}),
    )
