"""``dare_ties``: DARE's random drop with rescale (seeded per module), then TIES' sign election
(``--majority-sign``) and disjoint mean.

Default ``--space dense``: on full updates then the best rank-k approximation (PEFT's ``dare_ties_svd``);
``--space factors``: on A and B separately (PEFT's ``dare_ties``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import taskmath
from . import register
from ._taskmerge import merge_task_tensors
from .base import ModuleJob, ModuleResult


def _combine(tensors: Iterable[torch.Tensor], job: ModuleJob, generator: torch.Generator) -> torch.Tensor:
    return taskmath.dare_ties(tensors, job.options.density, generator, job.options.majority_sign)


@register("dare_ties", "DARE drop + rescale, then TIES sign election and disjoint mean (then rank-k SVD)")
def merge_dare_ties(job: ModuleJob) -> ModuleResult:
    return merge_task_tensors(job, _combine, "dare_ties")
