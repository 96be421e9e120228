"""``lego`` (LoRA-LEGO, arXiv 2409.16167, paper-faithful) and ``lego+`` (our measured variant).

Per module: pool the folded units of every input, k-means them into k clusters, turn each cluster into one
rank of the merged LoRA. ``lego`` takes each cluster's mean and applies dual reweighting (parameter
reweighting of each centroid's norm, output reweighting of the whole update by sqrt(r_ref / k)). ``lego+``
changes three things, each also available on ``lego`` as an option, and was chosen over the other variants
on the public evaluation suite (docs/method.md, docs/results.md):

- gauge: a unit (a, b) is only defined up to (c a, b / c); ``balanced`` makes ||a|| = ||b|| and fixes
  the sign, so equivalent units look alike to k-means;
- cluster_on ``directions``: cluster the per-half unit directions, so large and small units that point the
  same way share a cluster (the means and the parameter reweighting still use the units themselves);
- output_scale ``least_squares``: one factor per module, the gamma minimising ||gamma M - E||_F where E is
  the exact weighted ensemble (what ``cat`` returns); and weights 1/n by default, so E is the average of the
  task updates rather than their sum, the scale at which the ensemble itself works.

Other representatives (``rank1``, ``rank1_mean``, ``ties``) and ``match_norm`` are options; they lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cluster import KMeans, cluster_means
from ..lowrank import frobenius_inner, frobenius_norm_sq, truncate
from ..msu import Factors, concat, from_units, to_units
from ..options import MergeOptions
from ..taskmath import ties
from . import register
from .base import ModuleJob, ModuleResult

_EPS = 1e-12


@dataclass(frozen=True)
class LegoVariant:
    """The choices of one rank-wise merge, resolved from the options and the method's defaults."""

    gauge: str
    cluster_on: str
    representative: str
    param_reweight: bool
    output_reweight: bool
    norm: str
    r_ref: float | None
    output_scale: str
    balance: bool
    density: float
    majority_sign: str

    @classmethod
    def resolve(cls, options: MergeOptions, defaults: dict[str, str]) -> LegoVariant:
        return cls(
            gauge=options.gauge or defaults["gauge"],
            cluster_on=options.cluster_on or defaults["cluster_on"],
            representative=options.representative or defaults["representative"],
            param_reweight=options.param_reweight,
            output_reweight=options.output_reweight,
            norm=options.norm,
            r_ref=options.r_ref,
            output_scale=options.output_scale or defaults["output_scale"],
            balance=options.balance,
            density=options.density,
            majority_sign=options.majority_sign,
        )


PAPER = {"gauge": "none", "cluster_on": "units", "representative": "mean", "output_scale": "sqrt_rank"}
PLUS = {"gauge": "balanced", "cluster_on": "directions", "representative": "mean", "output_scale": "least_squares"}


def unit_norms(units: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm of each unit (row): max-abs for ``inf``, Euclidean for ``2``."""
    return units.abs().amax(dim=1) if norm == "inf" else units.norm(dim=1)


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


def feature_gram(lora_a: torch.Tensor, lora_b: torch.Tensor, variant: LegoVariant) -> torch.Tensor:
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


def ensemble_scale(merged: Factors, ensemble: Factors, how: str) -> float:
    """One factor for the whole merged update, from its relation to the exact weighted ensemble ``E``.

    ``match_norm``: ``||gamma M||_F = ||E||_F``. ``least_squares``: the ``gamma`` minimising ``||gamma M - E||_F``,
    ``<M, E> / ||M||^2`` (1 for a truncated SVD of ``E``, which is already an orthogonal projection of it).
    """
    merged_sq = frobenius_norm_sq(merged)
    if merged_sq <= _EPS:
        return 1.0
    if how == "match_norm":
        return math.sqrt(frobenius_norm_sq(ensemble) / merged_sq)
    if how == "least_squares":
        return frobenius_inner(merged, ensemble) / merged_sq
    raise ValueError(f"unknown output scale {how!r}")


def balance_adapters(factors: list[Factors]) -> list[Factors]:
    """Rescale each adapter's update to the mean Frobenius norm of all of them (split evenly over A and B),
    so an adapter with a large alpha / r does not own every cluster; zero updates stay as they are."""
    norms = [math.sqrt(frobenius_norm_sq(f)) for f in factors]
    live = [n for n in norms if n > _EPS]
    if not live:
        return factors
    target = sum(live) / len(live)
    out = []
    for (lora_a, lora_b), norm in zip(factors, norms, strict=True):
        root = math.sqrt(target / norm) if norm > _EPS else 1.0
        out.append((lora_a * root, lora_b * root))
    return out


def ties_representatives(
    units: torch.Tensor, labels: torch.Tensor, k: int, density: float, majority_sign: str
) -> torch.Tensor:
    """For each cluster, TIES inside the cluster: trim each member unit to its ``density`` largest entries,
    elect a sign per coordinate, average the members that agree (meaningful on gauge-fixed units)."""
    rows = [ties(units[labels == cluster], density, majority_sign) for cluster in range(k)]  # type: ignore[arg-type]
    return torch.stack(rows)


def rank1_representatives(
    units: torch.Tensor, labels: torch.Tensor, k: int, d_in: int, divisors: torch.Tensor | None = None
) -> torch.Tensor:
    """For each cluster, the unit whose update is the best rank-1 approximation of the members' summed update,
    divided by ``divisors[cluster]`` when given."""
    rows = []
    for cluster in range(k):
        members = units[labels == cluster]
        lora_a, lora_b = truncate(members[:, :d_in], members[:, d_in:].T, 1)
        if divisors is not None:
            # Split the division evenly between the halves, like the scale folding.
            root = float(divisors[cluster]) ** 0.5
            lora_a, lora_b = lora_a / root, lora_b / root
        rows.append(torch.cat([lora_a[0], lora_b[:, 0]]).to(units.dtype))
    return torch.stack(rows)


def adapters_per_cluster(labels: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """How many distinct input adapters have a unit in each cluster (TIES' disjoint mean, in rank space:
    a direction only one adapter uses keeps its full size, one shared by several is averaged)."""
    pairs = torch.unique(torch.stack([labels.cpu(), owner]), dim=1)
    return torch.bincount(pairs[0], minlength=k).clamp_min(1)


def cluster_labels(features: torch.Tensor, k: int, job: ModuleJob) -> torch.Tensor:
    """k-means labels; with k >= N every unit is its own cluster (the exact ensemble)."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    options = job.options
    return KMeans(k, n_init=options.n_init, max_iter=options.max_iter, seed=job.seed).fit(features).labels_


def pooled_labels(
    lora_a: torch.Tensor, lora_b: torch.Tensor, units: torch.Tensor, k: int, job: ModuleJob, variant: LegoVariant
) -> torch.Tensor:
    """k-means labels of the pool's features in the smallest exact representation.

    N units of dimension d = d_in + d_out: with N < d, k-means runs on the N-dimensional coordinates of the
    features' Gram matrix (from the factors, :func:`feature_gram`), so after one ``N^2 d`` product no distance
    pass depends on the hidden size; with N >= d the d-dimensional features themselves are the smaller form.
    """
    n, d_in = units.shape[0], lora_a.shape[1]
    if k >= n:
        return torch.arange(n, device=units.device)
    if n >= units.shape[1]:
        if variant.gauge == "balanced":
            units = balance_gauge(units, d_in)
        features = directions(units, d_in) if variant.cluster_on == "directions" else units
        return cluster_labels(features, k, job)
    options = job.options
    kmeans = KMeans(k, n_init=options.n_init, max_iter=options.max_iter, seed=job.seed)
    return kmeans.fit_gram(feature_gram(lora_a, lora_b, variant)).labels_


def rankwise_merge(job: ModuleJob, variant: LegoVariant) -> ModuleResult:
    ensemble = concat(job.factors)  # the exact weighted ensemble, the target of the output scale
    lora_a, lora_b = concat(balance_adapters(job.factors)) if variant.balance else ensemble
    d_in = lora_a.shape[1]
    units = to_units(lora_a, lora_b)
    k = min(job.rank if job.rank is not None else max(job.source_ranks), units.shape[0])
    labels = pooled_labels(lora_a, lora_b, units, k, job, variant)
    if variant.gauge == "balanced":
        units = balance_gauge(units, d_in)
    owner = torch.repeat_interleave(torch.tensor(job.adapter_indices), torch.tensor(job.source_ranks))
    if variant.representative in ("rank1", "rank1_mean"):
        divisors = adapters_per_cluster(labels, owner, k) if variant.representative == "rank1_mean" else None
        representatives = rank1_representatives(units, labels, k, d_in, divisors)
    elif variant.representative == "ties":
        representatives = ties_representatives(units, labels, k, variant.density, variant.majority_sign)
    else:
        representatives = units if k == units.shape[0] else cluster_means(units, labels, k)[0]
        if variant.param_reweight:
            representatives = parameter_reweight(representatives, units, labels, variant.norm)
    new_a, new_b = from_units(representatives, d_in)
    if variant.output_reweight:
        if variant.output_scale != "sqrt_rank":
            new_b = new_b * ensemble_scale((new_a, new_b), ensemble, variant.output_scale)
        elif variant.representative == "mean":
            # The paper's gamma compensates the sum of k averaged units; the other representatives are sums.
            new_b = new_b * output_scale(job.source_ranks, k, variant.r_ref)
    return ModuleResult(new_a, new_b, {"labels": labels.cpu(), "unit_adapter": owner})


@register("lego", "LoRA-LEGO: k-means of the pooled rank-1 units, centroids as ranks, dual reweighting")
def merge_lego(job: ModuleJob) -> ModuleResult:
    return rankwise_merge(job, LegoVariant.resolve(job.options, PAPER))


@register(
    "lego+",
    "LoRA-LEGO with gauge-fixed direction clustering, scaled to fit the average ensemble (weights 1/n)",
    average_by_default=True,
)
def merge_lego_plus(job: ModuleJob) -> ModuleResult:
    return rankwise_merge(job, LegoVariant.resolve(job.options, PLUS))
