"""``svd``: best rank-k approximation of the weighted sum of the updates, from the thin factors."""

from __future__ import annotations

from ..lowrank import truncate
from ..msu import concat
from . import register
from .base import ModuleJob, ModuleResult


@register("svd", "best rank-k approximation (truncated SVD) of the weighted sum of the updates")
def merge_svd(job: ModuleJob) -> ModuleResult:
    lora_a, lora_b = concat(job.factors)
    return ModuleResult(*truncate(lora_a, lora_b, job.rank))
