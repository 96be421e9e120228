"""What a merge method receives for one module and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..msu import Factors
from ..options import MergeOptions


@dataclass(frozen=True)
class ModuleJob:
    """The inputs of one module's merge.

    ``factors`` are folded (each adapter's scale and weight are inside, so adapter j's weighted update is
    ``B_j @ A_j``), float32, on the compute device, one entry per adapter that has this module.
    ``rank`` is the requested output rank, or None for an exact merge. ``seed`` is derived from the user's
    seed and the module name, so a module's result does not depend on which other modules are merged.
    """

    module: str
    factors: list[Factors]
    adapter_indices: list[int]
    source_ranks: list[int]
    rank: int | None
    seed: int
    options: MergeOptions

    @property
    def pool_size(self) -> int:
        return sum(self.source_ranks)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class ModuleResult:
    """Merged factors at scale 1 (the update is ``B @ A``) and optional per-module details for reports."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``exact_by_default``: without ``--rank`` the method returns the exact result (its rank is the pool size)
    instead of the largest input rank. ``equal_ranks``: the method is only defined for inputs of one rank.
    ``average_by_default``: without ``--weights`` every adapter gets ``1 / n`` (the method targets the average
    of the task updates), not 1. ``takes_rank``: the method can return a chosen output rank (``--energy``
    needs one); False where the inputs fix it.
    """

    name: str
    merge: Callable[[ModuleJob], ModuleResult]
    summary: str
    exact_by_default: bool = False
    equal_ranks: bool = False
    average_by_default: bool = False
    takes_rank: bool = True
