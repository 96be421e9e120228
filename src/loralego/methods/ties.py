"""``ties``: TIES-merging (Yadav et al. 2023) of the weighted updates: trim each to its ``--density`` largest
entries, elect a sign per entry (``--majority-sign``), average the entries that agree with it.

Default ``--space dense``: on full updates then the best rank-k approximation (PEFT's ``ties_svd``);
``--space factors``: on A and B separately (PEFT's ``ties``). See ``_taskmerge`` and ``taskmath``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import taskmath
from . import register
from ._taskmerge import merge_task_tensors
from .base import ModuleJob, ModuleResult


def _combine(tensors: Iterable[torch.Tensor], job: ModuleJob, generator: torch.Generator) -> torch.Tensor:
    return taskmath.ties(tensors, job.options.density, job.options.majority_sign)


@register("ties", "TIES: trim to --density by magnitude, elect signs, disjoint mean (then rank-k SVD)")
def merge_ties(job: ModuleJob) -> ModuleResult:
    return merge_task_tensors(job, _combine, "ties")
