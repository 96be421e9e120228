"""``lego`` (LoRA-LEGO, arXiv 2409.16167, paper-faithful) and ``lego+`` (ours, issue 15).

``lego``, per module: pool the folded LoRA units of every input, k-means them into k clusters, turn each
cluster into one rank of the merged LoRA: the mean of its units, with dual reweighting (parameter reweighting
of each centroid's norm, output reweighting of the whole update by ``sqrt(r_ref / k)``).

``lego+``, per module (``canonical_merge``):

1. balance (``lego_balance``, default on): each input's update rescaled to the module's mean Frobenius norm;
2. canonical units: each input's own SVD components ``s u v^T``. A LoRA unit ``(a, b)`` is only defined up to
   ``(c a, b / c)`` and any rotation of the input's rank space mixes its units; the SVD components are unique
   up to sign, orthogonal within an input and carry their size;
3. k-means on the sign-invariant, energy-weighted kernel ``s_a s_b (<u_a,u_b><v_a,v_b>)^2`` (a PSD Gram
   matrix, so Lloyd's algorithm runs on it exactly; ``M`` and ``-M`` are one point);
4. each cluster becomes one rank: the top singular pair of its members' summed update (opposing members
   cancel);
5. the k directions made orthonormal (polar factors, TSV-Merge's decorrelation) and every rank given one size,
   ``lego_alpha`` x the mean singular value of the summed update (Iso-C's flat spectrum; Iso-C, Marczak et al.
   ICML 2025, is ``lego_alpha = 1`` on the summed update's own top directions).

Why: the flat spectrum is what makes the 2025 subspace methods lead (a direction shared by all tasks does not
drown the tasks' own ones); the rank-wise part chooses the k directions by clustering every input's units, so
each rank is a group of like directions. Inputs are summed (weights 1), as Iso-C sums them. The defaults
(energy kernel, balancing, ``lego_alpha = 2``) were chosen on a development proxy built from the tasks'
training splits (bench/quality/research_log.md), not on the test suite.

Exact cases (tests/test_lego_plus.py): one input at k = r is Iso-C of it; with k >= the pooled rank every unit
is its own cluster and the merge is TSV-Merge's directions with Iso-C's flat spectrum, independent of the
inputs' order. With k below the pooled rank the k-means seeding depends on the order of the pool (inputs'
order), like ``lego``: same inputs, order and seed give the same bytes.

The first ``lego+`` (balanced gauge, direction clustering, least-squares scale to the average ensemble; the
``PLUS`` preset below) and the other variants of that sweep live with the evaluation as ``lego+_x``
(``bench/quality/variants.py``), composed from the steps here through ``rankwise_merge``'s hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..cluster import KMeans, cluster_means
from ..corespace import canonical_factors, core_space, pad_rank, polar_factor
from ..lowrank import frobenius_inner, frobenius_norm_sq, thin_svd
from ..msu import Factors, concat, from_units, to_units, unit_norms
from . import register
from .base import MethodParams, ModuleJob, ModuleResult, RankRequest, check_count

_EPS = 1e-12

# Bounds that keep a hostile or mistyped count from running for days; far above any useful value.
MAX_N_INIT = 1000
MAX_ITER = 100_000


class KMeansParams(MethodParams):
    """The k-means counts every rank-wise merge takes."""

    n_init: int = Field(4, description=f"k-means restarts (at most {MAX_N_INIT})")
    max_iter: int = Field(100, description=f"k-means iteration cap (at most {MAX_ITER})")

    @field_validator("n_init")
    @classmethod
    def _n_init(cls, value: int) -> int:
        return check_count(value, MAX_N_INIT)

    @field_validator("max_iter")
    @classmethod
    def _max_iter(cls, value: int) -> int:
        return check_count(value, MAX_ITER)


class RankwiseParams(KMeansParams):
    """The parameters of the unit-pool rank-wise merges (paper lego's, and its experimental variants')."""

    param_reweight: bool = Field(True, description="scale each centroid to its members' mean norm")
    output_reweight: bool = Field(
        True,
        description="scale the merged update (lego: by sqrt(r_ref / k); lego+: by its least-squares fit to the "
        "exact weighted ensemble)",
    )
    norm: Literal["inf", "2"] = Field("inf", description="norm used by parameter reweighting")


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


# ---------------------------------------------------------------- lego+: canonical units, isotropic ranks

PLUS_ALPHA = 2.0  # chosen on the development proxy (bench/quality/research_log.md), never on a test set


class LegoPlusParams(KMeansParams):
    """lego+'s knobs."""

    lego_alpha: float = Field(
        PLUS_ALPHA,
        description="scale of the flat spectrum: each merged rank gets lego_alpha x the mean singular value of "
        "the summed update (Iso-C's value at lego_alpha = 1)",
    )
    lego_balance: bool = Field(
        True, description="rescale the inputs of each module to their mean Frobenius norm before merging"
    )

    @field_validator("lego_alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError("must be a finite number > 0")
        return value


@dataclass(frozen=True)
class CanonicalUnits:
    """Every input's own SVD components, pooled: unit i is ``s[i] u_i v_i^T`` of input ``owner[i]`` (float64)."""

    u: torch.Tensor  # d_out x n, orthonormal within each input
    s: torch.Tensor  # n singular values
    vh: torch.Tensor  # n x d_in, orthonormal within each input
    owner: torch.Tensor  # n input indices


def canonical_units(factors: list[Factors], adapter_indices: list[int]) -> CanonicalUnits:
    """Each input's SVD ``B_j A_j = sum_i s_i u_i v_i^T`` from its thin factors (lowrank.thin_svd), pooled.

    Unlike LoRA units ``(a, b)``, which are defined only up to ``(c a, b / c)`` and mix the input's directions
    through any rotation of its rank space, these are unique up to the sign of ``u v^T``, orthogonal within an
    input and carry their singular values. Components below ``1e-9`` of the module's largest are rounding
    noise of a rank-deficient input and are left out.
    """
    us, ss, vhs, owners = [], [], [], []
    for (lora_a, lora_b), index in zip(factors, adapter_indices, strict=True):
        u, s, vh = thin_svd(lora_a, lora_b)
        count = min(u.shape[1], vh.shape[0], s.numel())
        us.append(u[:, :count].double())
        ss.append(s[:count].double())
        vhs.append(vh[:count].double())
        owners.append(torch.full((count,), index, dtype=torch.long))
    u, s, vh, owner = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0), torch.cat(owners)
    live = s > _CANONICAL_DROP * float(s.max().clamp_min(_EPS))
    return CanonicalUnits(u[:, live], s[live], vh[live], owner[live])


_CANONICAL_DROP = 1e-9


def canonical_kernel(units: CanonicalUnits) -> torch.Tensor:
    """``K_ab = s_a s_b (<u_a, u_b> <v_a, v_b>)^2``: a sign-invariant, PSD similarity of the units.

    ``<u_a, u_b> <v_a, v_b>`` is the Frobenius inner product of the unit matrices ``u v^T``; its square is the
    inner product of ``vec(u v^T) (x) vec(u v^T)``, so ``K`` is the Gram matrix of the features
    ``sqrt(s_a) vec(M_a) (x) vec(M_a)``: k-means on it sees ``M`` and ``-M`` as one point, and large units weigh
    more in the clusters' centers.
    """
    cosines = (units.u.T @ units.u) * (units.vh @ units.vh.T)
    return cosines**2 * (units.s[:, None] * units.s[None, :])


def cluster_directions(units: CanonicalUnits, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster, the top singular pair ``(u, v)`` of its members' summed update ``sum s_a u_a v_a^T`` (signs
    included, so opposing members cancel): ``(U_k, Vh_k)``, ``d_out x k`` and ``k x d_in``."""
    cols, rows = [], []
    for cluster in range(k):
        members = (labels == cluster).nonzero().squeeze(1)
        if members.numel() == 1:
            cols.append(units.u[:, members])
            rows.append(units.vh[members])
            continue
        u, _, vh = thin_svd(units.vh[members], units.u[:, members] * units.s[members], 1)
        cols.append(u[:, :1].double())
        rows.append(vh[:1].double())
    return torch.cat(cols, 1), torch.cat(rows, 0)


def isotropic_value(factors: list[Factors]) -> float:
    """Iso-C's flat singular value: the mean singular value of the summed update, over the core's dimensions
    (methods/spectral.py, ``iso_c_components``)."""
    space = core_space(factors)
    return float(torch.linalg.svdvals(torch.stack(space.cores).sum(0)).mean())


def balance_inputs(factors: list[Factors]) -> list[Factors]:
    """Each input's update rescaled to the mean Frobenius norm of the module's inputs (split evenly over A and
    B), so an input trained longer or at a larger alpha / r does not own the k ranks; zero updates stay."""
    norms = [math.sqrt(frobenius_norm_sq(f)) for f in factors]
    live = [n for n in norms if n > _EPS]
    if not live:
        return factors
    target = sum(live) / len(live)
    return [
        (a * math.sqrt(target / n), b * math.sqrt(target / n)) if n > _EPS else (a, b)
        for (a, b), n in zip(factors, norms, strict=True)
    ]


def canonical_merge(job: ModuleJob) -> ModuleResult:
    """One module's lego+ merge (see the module docstring)."""
    params: LegoPlusParams = job.params
    factors = balance_inputs(job.factors) if params.lego_balance else job.factors
    units = canonical_units(factors, job.adapter_indices)
    n = units.s.numel()
    k = min(job.rank, n)
    if k >= n:
        labels = torch.arange(n)
    else:
        kmeans = KMeans(k, n_init=params.n_init, max_iter=params.max_iter, seed=job.seed)
        labels = kmeans.fit_gram(canonical_kernel(units)).labels_.cpu()
    u_k, vh_k = cluster_directions(units, labels, k)
    # The k directions made orthonormal (polar factors, TSV's decorrelation), every rank at one size.
    u_o, v_o = polar_factor(u_k), polar_factor(vh_k.T)
    flat = torch.full((k,), params.lego_alpha * isotropic_value(factors), dtype=torch.float64)
    lora_a, lora_b = pad_rank(canonical_factors(u_o, flat, v_o.T), job.rank)
    return ModuleResult(lora_a, lora_b, {"labels": labels, "unit_adapter": units.owner})


def canonical_rank(params: KMeansParams, request: RankRequest) -> int:
    """k ranks: at most the pool's rank and the matrix's (``min(k, N, d_out, d_in)``, as the SVD truncations)."""
    pool = request.pool_size
    k = request.rank if request.rank is not None else pool
    return min(k, pool, request.d_out, request.d_in)


@register(
    "lego+",
    "LoRA-LEGO on canonical units: sign-invariant k-means of each input's SVD components, one orthogonal rank "
    "per cluster, flat spectrum",
    params=LegoPlusParams,
    output_rank=canonical_rank,
    clusters=True,
)
def merge_lego_plus(job: ModuleJob) -> ModuleResult:
    return canonical_merge(job)
