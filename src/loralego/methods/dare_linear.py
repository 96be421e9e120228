"""``dare_linear``: DARE (Yu et al. 2024): drop each entry of each weighted update with probability
``1 - density``, rescale the survivors by ``1 / density`` (unbiased), sum.

The mask comes from the per-module seed (``--seed`` and the module name): same seed, same bytes.
Default ``--space dense``: on full updates then the best rank-k approximation (PEFT's ``dare_linear_svd``);
``--space factors``: on A and B separately (PEFT's ``dare_linear``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import taskmath
from . import register
from ._taskmerge import merge_task_tensors
from .base import ModuleJob, ModuleResult


def _combine(tensors: Iterable[torch.Tensor], job: ModuleJob, generator: torch.Generator) -> torch.Tensor:
    return taskmath.dare_linear(tensors, job.options.density, generator)


@register("dare_linear", "DARE: random drop to --density with rescale, sum (then rank-k SVD); seeded")
def merge_dare_linear(job: ModuleJob) -> ModuleResult:
    return merge_task_tensors(job, _combine, "dare_linear")
