"""Spectral merges computed exactly in the core space (``corespace``): ``tsv``, ``iso_c`` and ``iso_cts``.

All three are equivariant to orthogonal changes of basis, so running them on the ``N x N`` cores
(``N = sum r_j``) and mapping back gives what they give on the dense updates, at thin-factor cost. Inputs
arrive folded (scale and weight inside), summed with w = 1 by default as the authors sum task vectors; each
method's scale (``--tsv-alpha``, ``--iso-alpha``) multiplies the merged update.

- ``tsv``: TSV-Merge (Gargiulo et al., CVPR 2025), following ``compute_and_sum_svd_mem_reduction`` in
  AntoAndGar/task_singular_vectors ``src/utils/TSVM_utils.py`` and ``get_tsv_delta_w`` in
  apanariello4/core-space-merging ``task_merger.py``: each task's top singular triplets (1/T of the spectrum:
  for a LoRA, all of its ``r_j`` components), concatenated; U and V each replaced by their orthonormal polar
  factor (the decorrelation); rebuilt as ``U_o diag(S) V_o^T``.
- ``iso_c``: Iso-C (Marczak et al., ICML 2025), following ``iso_c`` in danielm1405/iso-merging
  ``src/utils/iso.py`` and ``isotropize_matrix`` in core-space-merging: the summed update's singular values
  replaced by their mean.
- ``iso_cts``: Iso-CTS, following ``iso_cts`` in the same file: the top ``common_fraction`` of the summed
  update's directions, plus per task the top directions of its update with the common subspace projected out,
  the two sets orthogonalised (polar factors) and the spectrum flattened to its mean.

Spectrum size: the authors' matrices are full-rank weights, so "the spectrum" is ``min(d_out, d_in)`` values.
A LoRA sum has rank at most N, and a mean over ``min(d_out, d_in)`` values would spread the flat spectrum over
null directions (a full-rank output). As Core Space merging does, the spectrum here is the core's: N values.

Output rank: the merged core has rank up to N; the exact rank-k truncation keeps the k largest components
(U and V are orthonormal, so this is the best rank-k approximation). For the flat spectra of Iso-C/CTS every k
components are equally good; the ones kept are those of largest singular value before flattening. The kept
fraction of the merged update's energy is reported in the module's details (``kept_energy``).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..corespace import CoreSpace, Truncation, core_space, polar_factor, truncate_orthogonal
from . import register
from .base import MethodParams, ModuleJob, ModuleResult


def finite_scale(value: float) -> float:
    if value != value or abs(value) == float("inf"):
        raise ValueError("must be a finite number")
    return value


class TsvParams(MethodParams):
    tsv_alpha: float = Field(
        1.0,
        description="scale of the merged update (tsv); the authors pick it on validation data in (0, 3], "
        "publishing no single default",
    )

    _alpha = field_validator("tsv_alpha")(finite_scale)


class IsoCParams(MethodParams):
    iso_alpha: float = Field(
        1.0,
        description="scale of the flattened spectrum (iso_c, iso_cts); the authors pick it on validation data in "
        "(0, 3], publishing no single default",
    )

    _alpha = field_validator("iso_alpha")(finite_scale)


class IsoCtsParams(IsoCParams):
    iso_common_fraction: float = Field(
        0.8, description="share of the core's dimensions given to the common subspace (iso_cts; authors: 0.8)"
    )

    @field_validator("iso_common_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be in [0, 1]")
        return value


def _result(cut: Truncation, method: str) -> ModuleResult:
    return ModuleResult(cut.lora_a, cut.lora_b, {"space": "core", "method": method, "kept_energy": cut.kept_energy})


def _rank(job: ModuleJob) -> int:
    return job.rank


def tsv_components(
    space: CoreSpace, ranks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV's ``(U_o, S, V_o)`` in core coordinates: ``U_o`` (``n_b x m``), ``V_o`` (``n_a x m``) orthonormal.

    Task j contributes its top ``r_j`` triplets; if the ranks add up to more than the core size (a module
    narrower than N), each task gets ``size // T`` as in the authors' ``sv_reduction = 1 / T``.
    """
    tasks = len(space.cores)
    keep = list(ranks) if sum(ranks) <= space.size else [space.size // tasks] * tasks
    us, ss, vs = [], [], []
    for core, count in zip(space.cores, keep, strict=True):
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        us.append(u[:, :count])
        ss.append(s[:count])
        vs.append(vh[:count].T)
    return polar_factor(torch.cat(us, dim=1)), torch.cat(ss), polar_factor(torch.cat(vs, dim=1))


@register(
    "tsv",
    "TSV-Merge: per-task singular vectors, decorrelated (polar factors), rebuilt; core space, exact",
    params=TsvParams,
)
def merge_tsv(job: ModuleJob) -> ModuleResult:
    space = core_space(job.factors)
    u, s, v = tsv_components(space, job.source_ranks)
    scaled = job.params.tsv_alpha * s
    # A negative alpha flips the update: keep the singular values non-negative, move the sign onto V.
    sign = -1.0 if job.params.tsv_alpha < 0 else 1.0
    return _result(truncate_orthogonal(space, u, scaled.abs(), sign * v, s, _rank(job)), "tsv")


def iso_c_components(space: CoreSpace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iso-C in core coordinates: ``(U, flat S, V, original S)`` of the summed core."""
    u, s, vh = torch.linalg.svd(torch.stack(space.cores).sum(0), full_matrices=False)
    return u, torch.full_like(s, float(s.mean())), vh.T, s


def iso_cts_components(
    space: CoreSpace, common_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iso-CTS in core coordinates: ``(U_o, flat S, V_o, S before flattening)``; the authors' split of the
    ``size`` dimensions: common ``int(size * fraction)``, then the task-specific rest rounded to a multiple of T.
    """
    size, tasks = space.size, len(space.cores)
    common = int(size * common_fraction)
    per_task = round((size - common) / tasks)
    common = size - per_task * tasks
    if common < 0:  # more tasks than dimensions: one task-specific direction each is impossible
        per_task, common = 0, size
    u, s, vh = torch.linalg.svd(torch.stack(space.cores).sum(0), full_matrices=False)
    u_common, s_common, v_common = u[:, :common], s[:common], vh[:common].T
    us, ss, vs = [], [], []
    for core in space.cores:
        specific = core - u_common @ (u_common.T @ core)
        u_j, s_j, vh_j = torch.linalg.svd(specific, full_matrices=False)
        us.append(u_j[:, :per_task])
        ss.append(s_j[:per_task])
        vs.append(vh_j[:per_task].T)
    u_all = polar_factor(torch.cat([*us, u_common], dim=1))
    v_all = polar_factor(torch.cat([*vs, v_common], dim=1))
    s_all = torch.cat([*ss, s_common])
    return u_all, torch.full_like(s_all, float(s_all.mean())), v_all, s_all


def _flat(job: ModuleJob, space: CoreSpace, parts: tuple[torch.Tensor, ...], method: str) -> ModuleResult:
    u, flat, v, before = parts
    alpha = job.params.iso_alpha
    sign = -1.0 if alpha < 0 else 1.0
    return _result(truncate_orthogonal(space, u, abs(alpha) * flat, sign * v, before, _rank(job)), method)


@register(
    "iso_c",
    "Iso-C: the summed update with its spectrum flattened to the mean (x iso_alpha); core space",
    params=IsoCParams,
)
def merge_iso_c(job: ModuleJob) -> ModuleResult:
    space = core_space(job.factors)
    return _flat(job, space, iso_c_components(space), "iso_c")


@register(
    "iso_cts",
    "Iso-CTS: common + task-specific subspaces, orthogonalised, flat spectrum (x iso_alpha); core space",
    params=IsoCtsParams,
)
def merge_iso_cts(job: ModuleJob) -> ModuleResult:
    space = core_space(job.factors)
    return _flat(job, space, iso_cts_components(space, job.params.iso_common_fraction), "iso_cts")
