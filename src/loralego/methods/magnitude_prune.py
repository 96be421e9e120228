"""``magnitude_prune``: keep each weighted update's ``--density`` largest entries, then sum.

Default ``--space dense``: on full updates then the best rank-k approximation (PEFT's
``magnitude_prune_svd``); ``--space factors``: on A and B separately (PEFT's ``magnitude_prune``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import taskmath
from . import register
from ._taskmerge import merge_task_tensors
from .base import ModuleJob, ModuleResult


def _combine(tensors: Iterable[torch.Tensor], job: ModuleJob, generator: torch.Generator) -> torch.Tensor:
    return taskmath.magnitude_prune(tensors, job.options.density)


@register("magnitude_prune", "keep each update's --density largest entries, sum (then rank-k SVD)")
def merge_magnitude_prune(job: ModuleJob) -> ModuleResult:
    return merge_task_tensors(job, _combine, "magnitude_prune")
