"""``lego``: LoRA-LEGO (arXiv 2409.16167), paper-faithful.

Per module: pool the folded units of every input, k-means them into k clusters, take each centroid as one
rank of the merged LoRA, then apply dual reweighting (parameter reweighting of each centroid's norm,
output reweighting of the whole update). See docs/method.md for every choice and its default.
"""

from __future__ import annotations

import math

import torch

from ..cluster import KMeans
from ..msu import concat, from_units, to_units
from . import register
from .base import ModuleJob, ModuleResult

_EPS = 1e-12


def unit_norms(units: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm of each unit (row): max-abs for ``inf``, Euclidean for ``2``."""
    return units.abs().amax(dim=1) if norm == "inf" else units.norm(dim=1)


def parameter_reweight(centroids: torch.Tensor, units: torch.Tensor, labels: torch.Tensor, norm: str) -> torch.Tensor:
    """Scale each centroid to the mean norm of its members: averaging shrinks norms (norm decay)."""
    k = centroids.shape[0]
    target = torch.bincount(labels, weights=unit_norms(units, norm).double(), minlength=k)
    target = (target / torch.bincount(labels, minlength=k).clamp_min(1)).to(units.dtype)
    return centroids * (target / unit_norms(centroids, norm).clamp_min(_EPS))[:, None]


def output_scale(source_ranks: list[int], k: int, r_ref: float | None) -> float:
    """``gamma = sqrt(r_ref / k)``: k roughly independent rank-1 terms grow the update like sqrt(k)."""
    reference = r_ref if r_ref is not None else sum(source_ranks) / len(source_ranks)
    return math.sqrt(reference / k)


def cluster_units(units: torch.Tensor, k: int, job: ModuleJob) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids and labels; with k >= N every unit is its own cluster (the exact ensemble)."""
    n = units.shape[0]
    if k >= n:
        return units.clone(), torch.arange(n, device=units.device)
    options = job.options
    kmeans = KMeans(k, n_init=options.n_init, max_iter=options.max_iter, seed=job.seed).fit(units)
    return kmeans.cluster_centers_, kmeans.labels_


@register("lego", "LoRA-LEGO: k-means of the pooled rank-1 units, centroids as ranks, dual reweighting")
def merge_lego(job: ModuleJob) -> ModuleResult:
    lora_a, lora_b = concat(job.factors)
    d_in = lora_a.shape[1]
    units = to_units(lora_a, lora_b)
    k = min(job.rank if job.rank is not None else max(job.source_ranks), units.shape[0])
    centroids, labels = cluster_units(units, k, job)
    options = job.options
    if options.param_reweight:
        centroids = parameter_reweight(centroids, units, labels, options.norm)
    new_a, new_b = from_units(centroids, d_in)
    if options.output_reweight:
        new_b = new_b * output_scale(job.source_ranks, k, options.r_ref)
    owner = torch.repeat_interleave(torch.tensor(job.adapter_indices), torch.tensor(job.source_ranks))
    return ModuleResult(new_a, new_b, {"labels": labels.cpu(), "unit_adapter": owner})
