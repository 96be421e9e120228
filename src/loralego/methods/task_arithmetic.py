"""``task_arithmetic``: the weighted sum of the updates, exact (as ``cat``) or truncated by SVD to --rank."""

from __future__ import annotations

from ..lowrank import truncate
from ..msu import concat
from . import register
from .base import ModuleJob, ModuleResult, RankRequest, thin_rank


def _output_rank(params: object, request: RankRequest) -> int:
    """Exact (the pool's rank) unless a smaller k asks for the truncation."""
    if request.rank is None or request.rank >= request.pool_size:
        return request.pool_size
    return thin_rank(params, request)


@register(
    "task_arithmetic",
    "weighted sum of the updates: exact without --rank, best rank-k approximation with it",
    exact_by_default=True,
    output_rank=_output_rank,
)
def merge_task_arithmetic(job: ModuleJob) -> ModuleResult:
    lora_a, lora_b = concat(job.factors)
    if job.rank >= lora_a.shape[0]:
        return ModuleResult(lora_a, lora_b)
    return ModuleResult(*truncate(lora_a, lora_b, job.rank))
