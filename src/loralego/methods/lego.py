"""``lego`` (LoRA-LEGO, arXiv 2409.16167, paper-faithful) and ``lego+`` (our measured preset).

Per module: pool the folded units of every input, k-means them into k clusters, turn each cluster into one
rank of the merged LoRA: the mean of its units, with dual reweighting (parameter reweighting of each
centroid's norm, output reweighting of the whole update). ``lego`` takes the paper's choices; ``lego+``
changes three internal steps, chosen over the other variants on the public evaluation suite
(docs/method.md, docs/results.md):

- gauge ``balanced``: a unit (a, b) is only defined up to (c a, b / c); making ||a|| = ||b|| and fixing the
  sign lets equivalent units look alike to k-means;
- cluster on ``directions``: the per-half unit directions, so large and small units that point the same way
  share a cluster (the means and the parameter reweighting still use the units themselves);
- output scale ``least_squares``: one factor per module, the gamma minimising ||gamma M - E||_F where E is
  the exact weighted ensemble (what ``cat`` returns); and weights 1/n by default, so E is the average of the
  task updates rather than their sum, the scale at which the ensemble itself works.

The variants that lost (other representatives, other scales, adapter balancing) live with the evaluation
(``bench/quality/variants.py``), which composes them from the steps here through ``rankwise_merge``'s hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..cluster import KMeans, cluster_means
from ..lowrank import frobenius_inner, frobenius_norm_sq
from ..msu import Factors, concat, from_units, to_units, unit_norms
from . import register
from .base import MethodParams, ModuleJob, ModuleResult, RankRequest, check_count

_EPS = 1e-12

# Bounds that keep a hostile or mistyped count from running for days; far above any useful value.
MAX_N_INIT = 1000
MAX_ITER = 100_000


class RankwiseParams(MethodParams):
    """The parameters every rank-wise merge takes (lego+'s)."""

    n_init: int = Field(4, description=f"k-means restarts (at most {MAX_N_INIT})")
    max_iter: int = Field(100, description=f"k-means iteration cap (at most {MAX_ITER})")
    param_reweight: bool = Field(True, description="scale each centroid to its members' mean norm")
    output_reweight: bool = Field(
        True,
        description="scale the merged update (lego: by sqrt(r_ref / k); lego+: by its least-squares fit to the "
        "exact weighted ensemble)",
    )
    norm: Literal["inf", "2"] = Field("inf", description="norm used by parameter reweighting")

    @field_validator("n_init")
    @classmethod
    def _n_init(cls, value: int) -> int:
        return check_count(value, MAX_N_INIT)

    @field_validator("max_iter")
    @classmethod
    def _max_iter(cls, value: int) -> int:
        return check_count(value, MAX_ITER)


class LegoParams(RankwiseParams):
    """The paper's knobs."""

    r_ref: float | None = Field(
        None, description="reference rank of output reweighting (> 0); default: mean input rank of the module"
    )

    @field_validator("r_ref")
    @classmethod
    def _r_ref(cls, value: float | None) -> float | None:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError("must be a finite number > 0")
        return value


@dataclass(frozen=True)
class RankwiseVariant:
    """The internal choices of a rank-wise merge (not user parameters: each named method fixes them)."""

    gauge: Literal["none", "balanced"]
    cluster_on: Literal["units", "directions"]
    output_scale: Literal["sqrt_rank", "least_squares"]


PAPER = RankwiseVariant(gauge="none", cluster_on="units", output_scale="sqrt_rank")
PLUS = RankwiseVariant(gauge="balanced", cluster_on="directions", output_scale="least_squares")

# Hooks for experiments (bench/quality/variants.py): replace a step, keep the rest.
# (folded factors of each input) -> the factors to pool
Prepare = Callable[[list[Factors]], list[Factors]]
# (units, labels, k, d_in, unit owner) -> k representative units (sums of members: no sqrt_rank scale)
Represent = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor], torch.Tensor]
# (merged factors, exact weighted ensemble) -> one factor for the merged update
Scale = Callable[[Factors, Factors], float]


def gauge_scales(lora_a: torch.Tensor, lora_b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit factors ``(s_a, s_b)`` of the balanced gauge: unit i becomes ``(s_a[i] a_i, s_b[i] b_i)``.

    ``c = sqrt(||b|| / ||a||)`` and the sign that makes a's largest-magnitude entry positive: ``s_a = c sign``,
    ``s_b = sign / c``, which leaves ``b a^T`` unchanged. ``lora_b_t`` holds the b halves as rows.
    """
    norm_a, norm_b = lora_a.norm(dim=1), lora_b_t.norm(dim=1)
    usable = (norm_a > _EPS) & (norm_b > _EPS)
    factor = torch.where(usable, (norm_b / norm_a.clamp_min(_EPS)).sqrt(), torch.ones_like(norm_a))
    pivot = lora_a.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(lora_a.gather(1, pivot)).squeeze(1)
    sign[sign == 0] = 1.0
    return factor * sign, sign / factor


def balance_gauge(units: torch.Tensor, d_in: int) -> torch.Tensor:
    """Rescale each unit to ||a|| = ||b|| and flip it so a's largest-magnitude entry is positive (see
    :func:`gauge_scales`)."""
    lora_a, lora_b = units[:, :d_in], units[:, d_in:]
    scale_a, scale_b = gauge_scales(lora_a, lora_b)
    return torch.cat([lora_a * scale_a[:, None], lora_b * scale_b[:, None]], dim=1)


def balance_gauge_(units: torch.Tensor, d_in: int) -> torch.Tensor:
    """:func:`balance_gauge` in place (the same products, so the same values): for a pool the caller owns, one
    pool-sized copy fewer."""
    scale_a, scale_b = gauge_scales(units[:, :d_in], units[:, d_in:])
    units[:, :d_in] *= scale_a[:, None]
    units[:, d_in:] *= scale_b[:, None]
    return units


def feature_gram(lora_a: torch.Tensor, lora_b: torch.Tensor, variant: RankwiseVariant) -> torch.Tensor:
    """The ``N x N`` Gram matrix of the clustered features of the units ``[a_i ; b_i]`` of ``(A, B)``, from the two
    factor Gram matrices ``A A^T`` and ``B^T B`` (never concatenating the units).

    Every feature (unit, gauge-fixed unit, per-half direction) is a per-half rescaling ``(u_i a_i, v_i b_i)`` of
    a unit, so its Gram matrix is ``(u u^T) * A A^T + (v v^T) * B^T B``: the distances k-means needs, exactly,
    at one ``N x N x (d_in + d_out)`` product and no copy of the pool.
    """
    gram_a, gram_b = lora_a @ lora_a.T, lora_b.T @ lora_b
    n = lora_a.shape[0]
    scale_a = torch.ones(n, dtype=lora_a.dtype, device=lora_a.device)
    scale_b = scale_a
    if variant.gauge == "balanced":
        scale_a, scale_b = gauge_scales(lora_a, lora_b.T)
    if variant.cluster_on == "directions":
        # ||s a|| from the diagonal: the direction's factor is s / max(|s| ||a||, eps), as in :func:`directions`.
        scale_a = scale_a / (scale_a.abs() * gram_a.diagonal().clamp_min(0.0).sqrt()).clamp_min(_EPS)
        scale_b = scale_b / (scale_b.abs() * gram_b.diagonal().clamp_min(0.0).sqrt()).clamp_min(_EPS)
    return scale_a[:, None] * gram_a * scale_a[None, :] + scale_b[:, None] * gram_b * scale_b[None, :]


def directions(units: torch.Tensor, d_in: int) -> torch.Tensor:
    """``[a / ||a|| ; b / ||b||]``: where a unit points, whatever its size."""
    lora_a, lora_b = units[:, :d_in], units[:, d_in:]
    return torch.cat(
        [
            lora_a / lora_a.norm(dim=1, keepdim=True).clamp_min(_EPS),
            lora_b / lora_b.norm(dim=1, keepdim=True).clamp_min(_EPS),
        ],
        dim=1,
    )


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


def least_squares_scale(merged: Factors, ensemble: Factors) -> float:
    """The ``gamma`` minimising ``||gamma M - E||_F``: ``<M, E> / ||M||^2`` (1 for a truncated SVD of ``E``,
    which is already an orthogonal projection of it); 1 for a zero merge."""
    merged_sq = frobenius_norm_sq(merged)
    return 1.0 if merged_sq <= _EPS else frobenius_inner(merged, ensemble) / merged_sq


def cluster_labels(features: torch.Tensor, k: int, params: RankwiseParams, seed: int) -> torch.Tensor:
    """k-means labels; with k >= N every unit is its own cluster (the exact ensemble)."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    return KMeans(k, n_init=params.n_init, max_iter=params.max_iter, seed=seed).fit(features).labels_


def pooled_labels(
    lora_a: torch.Tensor, lora_b: torch.Tensor, units: torch.Tensor, k: int, job: ModuleJob, variant: RankwiseVariant
) -> torch.Tensor:
    """k-means labels of the pool's features in the smallest exact representation.

    N units of dimension d = d_in + d_out: with N < d, k-means runs on the N-dimensional coordinates of the
    features' Gram matrix (from the factors, :func:`feature_gram`), so after one ``N^2 d`` product no distance
    pass depends on the hidden size; with N >= d the d-dimensional features themselves are the smaller form.
    """
    params: RankwiseParams = job.params
    n, d_in = units.shape[0], lora_a.shape[1]
    if k >= n:
        return torch.arange(n, device=units.device)
    if n >= units.shape[1]:
        if variant.gauge == "balanced":
            units = balance_gauge(units, d_in)
        features = directions(units, d_in) if variant.cluster_on == "directions" else units
        return cluster_labels(features, k, params, job.seed)
    kmeans = KMeans(k, n_init=params.n_init, max_iter=params.max_iter, seed=job.seed)
    return kmeans.fit_gram(feature_gram(lora_a, lora_b, variant)).labels_


def rankwise_merge(
    job: ModuleJob,
    variant: RankwiseVariant,
    *,
    prepare: Prepare | None = None,
    represent: Represent | None = None,
    scale: Scale | None = None,
) -> ModuleResult:
    """One module's rank-wise merge; the hooks replace a step for experiments (default: the variant's)."""
    params: RankwiseParams = job.params
    ensemble = concat(job.factors)  # the exact weighted ensemble, the target of the output scale
    lora_a, lora_b = concat(prepare(job.factors)) if prepare is not None else ensemble
    d_in = lora_a.shape[1]
    units = to_units(lora_a, lora_b)
    k = min(job.rank, units.shape[0])
    labels = pooled_labels(lora_a, lora_b, units, k, job, variant)
    if variant.gauge == "balanced":
        units = balance_gauge_(units, d_in)  # units is this merge's own concatenation
    owner = torch.repeat_interleave(torch.tensor(job.adapter_indices), torch.tensor(job.source_ranks))
    details: dict[str, object] = {"labels": labels.cpu(), "unit_adapter": owner}
    if represent is not None:
        representatives = represent(units, labels, k, d_in, owner)
    else:
        representatives = units if k == units.shape[0] else cluster_means(units, labels, k)[0]
        details["centroid_norms"] = unit_norms(representatives, params.norm).double().cpu().numpy()
        if params.param_reweight:
            representatives = parameter_reweight(representatives, units, labels, params.norm)
    new_a, new_b = from_units(representatives, d_in)
    if params.output_reweight:
        if scale is not None:
            new_b = new_b * scale((new_a, new_b), ensemble)
        elif variant.output_scale == "least_squares":
            new_b = new_b * least_squares_scale((new_a, new_b), ensemble)
        elif represent is None:
            # The paper's gamma compensates the sum of k averaged units; other representatives are sums.
            new_b = new_b * output_scale(job.source_ranks, k, getattr(params, "r_ref", None))
    return ModuleResult(new_a, new_b, details)


def kmeans_rank(params: RankwiseParams, request: RankRequest) -> int:
    """k clusters of the pooled units: at most the pool's size."""
    return min(request.rank if request.rank is not None else request.pool_size, request.pool_size)


@register(
    "lego",
    "LoRA-LEGO: k-means of the pooled rank-1 units, centroids as ranks, dual reweighting",
    params=LegoParams,
    output_rank=kmeans_rank,
    clusters=True,
)
def merge_lego(job: ModuleJob) -> ModuleResult:
    return rankwise_merge(job, PAPER)


@register(
    "lego+",
    "LoRA-LEGO with gauge-fixed direction clustering, scaled to fit the average ensemble (weights 1/n)",
    params=RankwiseParams,
    average_by_default=True,
    output_rank=kmeans_rank,
    clusters=True,
)
def merge_lego_plus(job: ModuleJob) -> ModuleResult:
    return rankwise_merge(job, PLUS)
