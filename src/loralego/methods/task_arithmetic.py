"""``task_arithmetic``: the weighted sum of the updates, exact (as ``cat``) or truncated by SVD to --rank."""

from __future__ import annotations

from ..lowrank import truncate
from ..msu import concat
from . import register
from .base import ModuleJob, ModuleResult


@register(
    "task_arithmetic",
    "weighted sum of the updates: exact without --rank, best rank-k approximation with it",
    exact_by_default=True,
)
def merge_task_arithmetic(job: ModuleJob) -> ModuleResult:
    lora_a, lora_b = concat(job.factors)
    if job.rank is None or job.rank >= lora_a.shape[0]:
        return ModuleResult(lora_a, lora_b)
    return ModuleResult(*truncate(lora_a, lora_b, job.rank))
