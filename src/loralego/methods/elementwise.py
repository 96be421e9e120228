"""``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune``: element-wise combinations of the task
updates (``taskmath``), applied in one of two spaces, chosen with the ``space`` parameter.

- ``dense`` (default): the combination runs on the inputs' full weighted updates ``B_j @ A_j`` of this one
  module (``d_out x d_in`` each, freed when the module is done), then the result is cut to the output rank k
  by the certified truncated SVD of ``densesvd`` (within 1e-7 of the exact one, proved per module, else the
  exact eigh route; the route taken is in the module's details). Works for any mix of ranks. This is PEFT's
  ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd``.
- ``factors``: the combination runs on the A factors, then on the B factors, separately (PEFT's plain
  ``ties``, ``dare_*`` and ``magnitude_prune``). Only defined for inputs of one rank; the output keeps it.
- ``core``: the combination runs on each input's ``N x N`` core in the shared singular bases of the stacked
  factors (``corespace``; Core Space merging, Panariello et al. 2025, ``get_core_matrices`` and
  ``_merge_tensors`` in apanariello4/core-space-merging ``task_merger.py``), the result maps back exactly and
  is cut to rank k by the SVD of the small merged core. Any ranks, thin-factor cost; the kept energy is in the
  module's details.

The factors arrive folded (``sqrt(|w| * scale)`` on each side, the sign of w on A), exactly the per-factor
weights PEFT applies in its factor-wise merges, so no further weighting happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from pydantic import Field, field_validator

from .. import taskmath
from ..corespace import core_space, truncate_core
from ..densesvd import truncate_dense_certified
from ..errors import LoraLegoError
from . import register
from .base import MethodParams, ModuleJob, ModuleResult, RankRequest, check_fraction, thin_rank


class PruneParams(MethodParams):
    density: float = Field(0.2, description="fraction of entries kept")
    space: Literal["dense", "factors", "core"] = Field(
        "dense",
        description="where the combination works: dense = on each module's full update, then the best rank-k "
        "approximation (any ranks; PEFT's *_svd); factors = on A and B separately (PEFT's plain variants; "
        "equal ranks only, output rank = input rank); core = on each input's small core matrix in the shared "
        "singular bases of the stacked factors (Core Space merging), then the exact rank-k truncation",
    )

    _density = field_validator("density")(check_fraction)


class SignedPruneParams(PruneParams):
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="sign election: by total mass (total) or by count (frequency)"
    )


def _output_rank(params: PruneParams, request: RankRequest) -> int:
    """Dense: the truncation's rank, at most the matrix's. Factors: the inputs' one rank (or a refusal)."""
    if params.space == "dense":
        cap = min(request.d_out, request.d_in)
        return max(1, min(request.rank if request.rank is not None else cap, cap))
    if params.space == "core":
        return thin_rank(params, request)
    ranks = sorted(set(request.source_ranks))
    if len(ranks) > 1:
        raise LoraLegoError(
            f"module {request.module}: --space factors needs equal ranks, got {ranks}; "
            "use --space dense (the default), which works for mixed ranks"
        )
    if request.energy is not None or (request.requested and request.rank != ranks[0]):
        asked = "--energy asks for ranks of its own" if request.energy is not None else f"rank {request.rank} was asked"
        raise LoraLegoError(
            f"module {request.module}: --space factors keeps the input rank {ranks[0]}, "
            f"but {asked}; use --space dense to choose the output rank"
        )
    return ranks[0]


# (weighted task tensors, the method's parameters, the module's generator) -> merged tensor
Combine = Callable[[Iterable[torch.Tensor], PruneParams, torch.Generator], torch.Tensor]


def merge_task_tensors(job: ModuleJob, combine: Combine) -> ModuleResult:
    """Run ``combine`` on this module in the space the parameters ask for (its rank checked by the plan)."""
    generator = job.generator(job.factors[0][0].device)
    if job.params.space == "factors":
        # A first, then B, each adapter in order: the order (and so the random stream) of PEFT's merge.
        lora_a = combine((a for a, _ in job.factors), job.params, generator)
        lora_b = combine((b for _, b in job.factors), job.params, generator)
        return ModuleResult(lora_a.contiguous(), lora_b.contiguous(), {"space": "factors"})
    if job.params.space == "core":
        space = core_space(job.factors)
        cut = truncate_core(space, combine(space.cores, job.params, generator), job.rank)
        return ModuleResult(cut.lora_a, cut.lora_b, {"space": "core", "kept_energy": cut.kept_energy})
    updates = (dense_update(lora_a, lora_b) for lora_a, lora_b in job.factors)  # lazy: one alive at a time
    (lora_a, lora_b), found = truncate_dense_certified(combine(updates, job.params, generator), job.rank)
    details: dict[str, object] = {"space": "dense", "dense_route": found.route}
    if found.certificate is not None:
        details["certified_bound"] = found.certificate.output_bound
    return ModuleResult(lora_a, lora_b, details)


def dense_update(lora_a: torch.Tensor, lora_b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``B @ A`` in the factors' dtype, each entry the float64 sum rounded once, by blocks of ``rows`` rows.

    Why float64: a float32 product's last bit depends on the order the BLAS kernel sums the ``r`` terms in, which
    differs between CPUs (AVX2 and AVX-512 kernels), and the trim, the sign election and the truncation then
    make that bit visible; products of float32 numbers are exact in float64, so the rounded sum is the same on
    every machine. The row blocks bound the float64 temporary to ``rows x d_in``.
    """
    out = torch.empty(lora_b.shape[0], lora_a.shape[1], dtype=lora_a.dtype, device=lora_a.device)
    wide_a = lora_a.double()
    for start in range(0, lora_b.shape[0], rows):
        out[start : start + rows] = lora_b[start : start + rows].double() @ wide_a
    return out


def _ties(tensors: Iterable[torch.Tensor], params: SignedPruneParams, generator: torch.Generator) -> torch.Tensor:
    return taskmath.ties(tensors, params.density, params.majority_sign)


def _dare_linear(tensors: Iterable[torch.Tensor], params: PruneParams, generator: torch.Generator) -> torch.Tensor:
    return taskmath.dare_linear(tensors, params.density, generator)


def _dare_ties(tensors: Iterable[torch.Tensor], params: SignedPruneParams, generator: torch.Generator) -> torch.Tensor:
    return taskmath.dare_ties(tensors, params.density, generator, params.majority_sign)


def _magnitude_prune(tensors: Iterable[torch.Tensor], params: PruneParams, generator: torch.Generator) -> torch.Tensor:
    return taskmath.magnitude_prune(tensors, params.density)


_METHODS: tuple[tuple[str, str, type[PruneParams], Combine], ...] = (
    (
        "ties",
        "TIES: trim to density by magnitude, elect signs, disjoint mean (then rank-k SVD)",
        SignedPruneParams,
        _ties,
    ),
    (
        "dare_linear",
        "DARE: random drop to density with rescale, sum (then rank-k SVD); seeded",
        PruneParams,
        _dare_linear,
    ),
    (
        "dare_ties",
        "DARE drop + rescale, then TIES sign election and disjoint mean (then rank-k SVD); seeded",
        SignedPruneParams,
        _dare_ties,
    ),
    (
        "magnitude_prune",
        "keep each update's density largest entries, sum (then rank-k SVD)",
        PruneParams,
        _magnitude_prune,
    ),
)


def _register(name: str, summary: str, params: type[PruneParams], combine: Combine) -> None:
    register(name, summary, params=params, output_rank=_output_rank)(lambda job: merge_task_tensors(job, combine))


for _entry in _METHODS:
    _register(*_entry)
