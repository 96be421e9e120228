"""What a merge method declares, what it receives for one module and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ..msu import Factors


def check_fraction(value: float) -> float:
    """A share in (0, 1] (densities, energies), with the one message every such parameter gives."""
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def check_count(value: int, limit: int) -> int:
    """A count from 1 to ``limit``: a hostile or mistyped count must not run for days."""
    if not 1 <= value <= limit:
        raise ValueError(f"must be >= 1 and <= {limit}" if value >= 1 else "must be >= 1")
    return value


class MethodParams(BaseModel):
    """A method's own parameters: each method subclasses this with typed, described, validated fields.

    The CLI flags, the recipe's ``parameters:`` block, the Python API's keywords and ``loralego methods
    METHOD`` are all generated from these declarations.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(MethodParams):
    """For methods without parameters of their own."""


@dataclass(frozen=True)
class ModuleJob:
    """The inputs of one module's merge.

    ``factors`` are folded (each adapter's scale and weight are inside, so adapter j's weighted update is
    ``B_j @ A_j``), float32, on the compute device, one entry per adapter that has this module.
    ``rank`` is the module's output rank as planned (see :meth:`MergeMethod.output_rank`); ``rank_requested``
    says whether the user asked for it (``--rank``, a matching ``--rank-override`` or ``--energy``) rather
    than it being the method's default. ``seed`` is derived from the user's seed and the module name, so a
    module's result does not depend on which other modules are merged.
    """

    module: str
    factors: list[Factors]
    adapter_indices: list[int]
    source_ranks: list[int]
    rank: int
    rank_requested: bool
    seed: int
    params: Any  # the method's own MethodParams subclass

    @property
    def pool_size(self) -> int:
        return sum(self.source_ranks)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class ModuleResult:
    """Merged factors at scale 1 (the update is ``B @ A``) and what the method wants reports to show.

    ``details`` keys read by the report: ``labels`` (cluster of each pooled unit), ``unit_adapter`` (input
    index of each unit), ``centroid_norms`` (norms of the plain cluster means, before reweighting).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankRequest:
    """What decides one module's output rank: the requested or default k (None: exact, or uncapped with
    ``--energy``), whether the user asked for it, the ``--energy`` target (the final k is then picked from
    the tensors, at most the planned one), the inputs' ranks of this module and the weight's shape (``d_in``
    flattens conv kernels)."""

    module: str
    rank: int | None
    requested: bool
    energy: float | None
    source_ranks: list[int]
    d_out: int
    d_in: int

    @property
    def pool_size(self) -> int:
        return sum(self.source_ranks)


# (the method's parameters, the request) -> the rank the method returns; raises LoraLegoError if it cannot
OutputRank = Callable[[Any, RankRequest], int]


def thin_rank(params: Any, request: RankRequest) -> int:
    """A thin-factor truncation returns at most the pool's rank and the matrix's: ``min(k, N, d_out, d_in)``."""
    pool = request.pool_size
    return min(pool if request.rank is None else request.rank, pool, request.d_out, request.d_in)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``params``: its parameter declaration. ``exact_by_default``: without ``--rank`` the method returns the
    exact result (its rank is the pool size) instead of the largest input rank. ``equal_ranks``: the method is
    only defined for inputs of one rank. ``average_by_default``: without ``--weights`` every adapter gets
    ``1 / n`` (the method targets the average of the task updates), not 1. ``takes_rank``: the method can
    return a chosen output rank (``--energy`` needs one); False where the inputs fix it. ``output_rank``: the
    rank it returns for a module, known before any tensor is read (the plan and ``--target vllm`` use it).
    ``clusters``: its results carry cluster labels (the report draws them).
    """

    name: str
    merge: Callable[[ModuleJob], ModuleResult]
    summary: str
    params: type[MethodParams] = NoParams
    exact_by_default: bool = False
    equal_ranks: bool = False
    average_by_default: bool = False
    takes_rank: bool = True
    output_rank: OutputRank = thin_rank
    clusters: bool = False
