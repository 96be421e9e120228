"""The driver shared by ties, dare_linear, dare_ties and magnitude_prune: the same element-wise combination
(``taskmath``) applied in one of two spaces, chosen with ``--space``.

- ``dense`` (default): the combination runs on the inputs' full weighted updates ``B_j @ A_j`` of this one
  module (``d_out x d_in`` each, freed when the module is done), then the result is cut to the output rank k
  by an exact truncated SVD (``densesvd``). Works for any mix of ranks. This is PEFT's ``ties_svd``,
  ``dare_linear_svd``, ``dare_ties_svd`` and ``magnitude_prune_svd``.
- ``factors``: the combination runs on the A factors, then on the B factors, separately (PEFT's plain
  ``ties``, ``dare_*`` and ``magnitude_prune``). Only defined for inputs of one rank; the output keeps it.
- ``core``: the combination runs on each input's ``N x N`` core in the shared singular bases of the stacked
  factors (``corespace``; Core Space merging, Panariello et al. 2025), the result maps back exactly and is cut
  to rank k by the SVD of the small merged core. Any ranks; the kept energy is in the module's details.

The factors arrive folded (``sqrt(|w| * scale)`` on each side, the sign of w on A), exactly the per-factor
weights PEFT applies in its factor-wise merges, so no further weighting happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..corespace import core_space, truncate_core
from ..densesvd import truncate_dense
from ..errors import LoraLegoError
from .base import ModuleJob, ModuleResult

# (weighted task tensors, the job for its options, the module's generator) -> merged tensor
Combine = Callable[[Iterable[torch.Tensor], ModuleJob, torch.Generator], torch.Tensor]


def merge_task_tensors(job: ModuleJob, combine: Combine, method: str) -> ModuleResult:
    """Run ``combine`` on this module in the space the options ask for."""
    generator = job.generator(job.factors[0][0].device)
    if job.options.space == "factors":
        return _in_factor_space(job, combine, method, generator)
    rank = job.rank if job.rank is not None else max(job.source_ranks)
    if job.options.space == "core":
        space = core_space(job.factors)
        cut = truncate_core(space, combine(space.cores, job, generator), rank)
        return ModuleResult(cut.lora_a, cut.lora_b, {"space": "core", "kept_energy": cut.kept_energy})
    updates = (lora_b @ lora_a for lora_a, lora_b in job.factors)  # lazy: one dense update alive at a time
    merged = combine(updates, job, generator)
    lora_a, lora_b = truncate_dense(merged, rank)
    return ModuleResult(lora_a, lora_b, {"space": "dense"})


def _in_factor_space(job: ModuleJob, combine: Combine, method: str, generator: torch.Generator) -> ModuleResult:
    ranks = sorted(set(job.source_ranks))
    if len(ranks) > 1:
        raise LoraLegoError(
            f"module {job.module}: {method} --space factors needs equal ranks, got {ranks}; "
            "use --space dense (the default), which works for mixed ranks"
        )
    requested = (
        job.options.rank is not None
        or bool(getattr(job.options, "rank_overrides", None))
        or job.options.energy is not None
    )
    if requested and job.rank is not None and job.rank != ranks[0]:
        raise LoraLegoError(
            f"module {job.module}: {method} --space factors keeps the input rank {ranks[0]}, "
            f"but rank {job.rank} was asked; use --space dense to choose the output rank"
        )
    # A first, then B, each adapter in order: the order (and so the random stream) of PEFT's factor-wise merge.
    lora_a = combine((a for a, _ in job.factors), job, generator)
    lora_b = combine((b for _, b in job.factors), job, generator)
    return ModuleResult(lora_a.contiguous(), lora_b.contiguous(), {"space": "factors"})
