"""The rank-wise variants of the issue-8 sweep (docs/results-v1.md, "Rank-wise variants"), kept runnable here,
apart from the product: most lost, and the two that won became the first ``lego+``, which is ``lego+_x`` at its
defaults now that ``lego+`` is the canonical-unit merge of issue 15 (src/loralego/methods/lego.py).

Importing this module registers two experimental methods, ``lego_x`` (paper lego's choices as defaults,
weights 1) and ``lego+_x`` (lego+'s, weights 1/n), which take every knob of the sweep as a parameter:
the gauge, what k-means clusters, the cluster representative (mean, rank1, rank1_mean, ties), the output
scale (sqrt_rank, match_norm, least_squares) and adapter balancing. They are built from lego's own steps
through ``rankwise_merge``'s hooks, so a variant differs from lego only where it says.

``route(options)`` sends a run's options to the experimental method when they use one of these knobs, so the
evaluation's recorded runs (bench/quality/evaluate.py) keep their names and results.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from loralego.lowrank import frobenius_norm_sq, truncate
from loralego.methods import ModuleJob, ModuleResult, register
from loralego.methods.lego import PAPER, PLUS, LegoParams, RankwiseVariant, balance_inputs, kmeans_rank, rankwise_merge
from loralego.msu import Factors
from loralego.taskmath import ties

_EPS = 1e-12


class VariantParams(LegoParams):
    gauge: Literal["none", "balanced"] | None = Field(None, description="unit gauge; default: the preset's")
    cluster_on: Literal["units", "directions"] | None = Field(None, description="k-means features; default: preset's")
    representative: Literal["mean", "rank1", "rank1_mean", "ties"] = Field(
        "mean",
        description="each cluster's rank: the mean of its units; the best rank-1 approximation of its summed "
        "update (rank1), or of that sum divided by the number of inputs in the cluster (rank1_mean); TIES "
        "inside the cluster (ties)",
    )
    output_scale: Literal["sqrt_rank", "match_norm", "least_squares"] | None = Field(
        None, description="output reweighting; default: the preset's"
    )
    balance: bool = Field(False, description="equal Frobenius norms of the inputs per module before clustering")
    density: float = Field(0.2, gt=0.0, le=1.0, description="TIES representatives: fraction of entries kept")
    majority_sign: Literal["total", "frequency"] = Field("total", description="TIES representatives: sign election")


VARIANT_KNOBS = frozenset(set(VariantParams.model_fields) - set(LegoParams.model_fields))


def match_norm_scale(merged: Factors, ensemble: Factors) -> float:
    """The factor giving the merged update the Frobenius norm of the exact weighted ensemble."""
    merged_sq = frobenius_norm_sq(merged)
    return 1.0 if merged_sq <= _EPS else math.sqrt(frobenius_norm_sq(ensemble) / merged_sq)


# The sweep's `balance` knob is the product's input balancing (lego+'s `lego_balance`): one implementation.
balance_adapters = balance_inputs


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


def _merge(job: ModuleJob, preset: RankwiseVariant) -> ModuleResult:
    params: VariantParams = job.params
    scale_name = params.output_scale or preset.output_scale
    variant = RankwiseVariant(
        gauge=params.gauge or preset.gauge,
        cluster_on=params.cluster_on or preset.cluster_on,
        output_scale="sqrt_rank" if scale_name == "match_norm" else scale_name,
    )
    represent = None
    if params.representative in ("rank1", "rank1_mean"):
        mean = params.representative == "rank1_mean"

        def represent(units, labels, k, d_in, owner):  # type: ignore[no-untyped-def]
            divisors = adapters_per_cluster(labels, owner, k) if mean else None
            return rank1_representatives(units, labels, k, d_in, divisors)

    elif params.representative == "ties":

        def represent(units, labels, k, d_in, owner):  # type: ignore[no-untyped-def]
            return ties_representatives(units, labels, k, params.density, params.majority_sign)

    return rankwise_merge(
        job,
        variant,
        prepare=balance_adapters if params.balance else None,
        represent=represent,
        scale=match_norm_scale if scale_name == "match_norm" else None,
    )


@register(
    "lego_x",
    "experimental: lego with the research sweep's knobs",
    params=VariantParams,
    output_rank=kmeans_rank,
    clusters=True,
)
def merge_lego_x(job: ModuleJob) -> ModuleResult:
    return _merge(job, PAPER)


@register(
    "lego+_x",
    "experimental: lego+ with the research sweep's knobs (weights 1/n)",
    params=VariantParams,
    average_by_default=True,
    output_rank=kmeans_rank,
    clusters=True,
)
def merge_lego_plus_x(job: ModuleJob) -> ModuleResult:
    return _merge(job, PLUS)


def route(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``loralego.merge``, with lego / lego+ sent to their experimental twin when a knob of
    the sweep is set."""
    if options.get("method") in ("lego", "lego+") and VARIANT_KNOBS & set(options):
        return {**options, "method": options["method"] + "_x"}
    return options
