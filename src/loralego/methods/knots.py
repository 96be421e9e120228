"""KnOTS (Stoica et al., ICLR 2025): ``knots_ties`` and ``knots_dare``.

Following ``SVDMerger.apply_svd`` / ``SVDMerger.merge`` in gstoica27/KnOTS ``task_merger.py`` (with
``ties_masking`` and ``masked_merge`` of ``masking_ops.py``), ``concat_across_output=True``: the SVD of the
updates concatenated side by side, ``[dW_1 ... dW_T] = U S [V_1 ... V_T]``, gives a shared basis ``U``; each task
is ``diag(S) V_j`` in it (so ``U diag(S) V_j = dW_j`` exactly); those task representations (``R x d_in``) are
merged element-wise and the update is ``alpha * U @ merged``.

- ``knots_ties``: TIES on the representations: trim each to ``--knots-ties-density``, elect signs by the sum of
  values, disjoint mean (authors' Llama-3-8B config: topK 100, i.e. no trim, scale 0.5).
- ``knots_dare``: the authors' KnOTS-DARE-TIES: DARE's random drop with rescale (keep probability
  ``--knots-dare-density``; authors: drop 0.8), then the sign election and disjoint mean (scale 0.4). Seeded
  per module.

Computed exactly on thin factors: in the core space (``corespace``), ``[dW_j] = Q_b [C_1 ... C_T]
blockdiag(Q_a^T)``, so the SVD comes from the small ``n_b x T n_a`` matrix of the cores and ``V_j = V^c_j Q_a^T``.
The element-wise merge then runs on the ``R x d_in`` representations in the input coordinates, as the authors'
does (element-wise operations depend on coordinates; these cost ``O(T R d_in)``). Components with singular value
at most ``1e-9`` of the largest are dropped (the authors drop ``s <= 1e-5`` in absolute terms; relative here so
that the result does not depend on the scale of the inputs). Trimming and signs are per module, where the
authors trim over the whole model's flattened representation.

The merged update has rank up to R <= N; the exact rank-k truncation (kept energy in the details) follows.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from .. import taskmath
from ..corespace import CoreSpace, core_space, truncate_factors
from . import register
from .base import MethodParams, ModuleJob, ModuleResult, check_fraction
from .spectral import finite_scale


class KnotsTiesParams(MethodParams):
    knots_ties_alpha: float = Field(0.5, description="scale of the merged update (authors' Llama-3-8B config: 0.5)")
    knots_ties_density: float = Field(
        1.0, description="fraction of each task's entries kept by TIES' trim (authors' Llama config: topK 100%)"
    )

    _alpha = field_validator("knots_ties_alpha")(finite_scale)
    _density = field_validator("knots_ties_density")(check_fraction)


class KnotsDareParams(MethodParams):
    knots_dare_alpha: float = Field(0.4, description="scale of the merged update (authors' Llama-3-8B config: 0.4)")
    knots_dare_density: float = Field(
        0.2, description="DARE keep probability (authors' Llama config: drop 0.8)"
    )

    _alpha = field_validator("knots_dare_alpha")(finite_scale)
    _density = field_validator("knots_dare_density")(check_fraction)

RELATIVE_CUTOFF = 1e-9


def knots_basis(space: CoreSpace) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(U, [diag(S) V_j])``: the shared basis (``d_out x R``, orthonormal) and each task's representation
    (``R x d_in``), with ``U @ rep_j`` the task's update."""
    stacked = torch.cat(space.cores, dim=1)  # n_b x T n_a
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > RELATIVE_CUTOFF * float(s.max()) if s.numel() and float(s.max()) > 0 else s > 0
    if not bool(keep.any()):
        keep[0] = True  # an all-zero module: one zero component
    u, s, vh = u[:, keep], s[keep], vh[keep]
    width = space.q_in.shape[1]
    reps = [space.lift_in((s[:, None] * vh[:, j * width : (j + 1) * width]).T).T for j in range(len(space.cores))]
    return space.lift_out(u), reps


def _merge(job: ModuleJob, merged_reps: torch.Tensor, basis: torch.Tensor, alpha: float, method: str) -> ModuleResult:
    cut = truncate_factors(alpha * merged_reps, basis, job.rank)
    return ModuleResult(cut.lora_a, cut.lora_b, {"space": "core", "method": method, "kept_energy": cut.kept_energy})


@register(
    "knots_ties",
    "KnOTS-TIES: shared SVD basis of the concatenated updates, TIES on the task parts",
    params=KnotsTiesParams,
)
def merge_knots_ties(job: ModuleJob) -> ModuleResult:
    basis, reps = knots_basis(core_space(job.factors))
    merged = taskmath.ties(reps, job.params.knots_ties_density, "total")
    return _merge(job, merged, basis, job.params.knots_ties_alpha, "knots_ties")


@register(
    "knots_dare",
    "KnOTS-DARE: shared SVD basis, DARE drop + TIES sign and disjoint mean; seeded",
    params=KnotsDareParams,
)
def merge_knots_dare(job: ModuleJob) -> ModuleResult:
    basis, reps = knots_basis(core_space(job.factors))
    generator = job.generator(reps[0].device)
    merged = taskmath.dare_ties(reps, job.params.knots_dare_density, generator, "total")
    return _merge(job, merged, basis, job.params.knots_dare_alpha, "knots_dare")
