"""``cat``: concatenate all units along the rank axis. Exact: the update is the sum of the inputs'."""

from __future__ import annotations

from ..msu import concat
from . import register
from .base import ModuleJob, ModuleResult, RankRequest


def pool_rank(params: object, request: RankRequest) -> int:
    return request.pool_size


@register(
    "cat",
    "exact concatenation along the rank axis (the output ensemble)",
    exact_by_default=True,
    takes_rank=False,
    output_rank=pool_rank,
)
def merge_cat(job: ModuleJob) -> ModuleResult:
    lora_a, lora_b = concat(job.factors)
    return ModuleResult(lora_a, lora_b)
