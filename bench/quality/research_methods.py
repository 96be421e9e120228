"""Issue 15's research candidates: experimental rank-wise merges, registered apart from the product.

Importing this module registers ``rlego``, a rank-wise merge on each input's *canonical units*: adapter j's
update ``B_j A_j`` is written as its own SVD ``sum_i s_i u_i v_i^T``; those rank-1 terms are orthogonal
within an input, carry their singular values and have no gauge (a LoRA unit ``(a, b)`` is only defined up to
``(c a, b / c)``; a canonical unit is defined up to the sign of ``u v^T``, which k-means must not see).

Per module:

1. pool the canonical units of every input (components with ``s`` below ``1e-9`` of the module's largest are
   rounding noise of a rank-deficient input and are dropped);
2. k-means them with a sign-invariant similarity: the kernel ``K_ab = (<u_a,u_b> <v_a,v_b>)^2`` is the Gram
   matrix of the features ``vec(M_a) (x) vec(M_a)`` of the unit matrices ``M_a = u_a v_a^T``, so it is PSD and
   ``M`` and ``-M`` have the same feature; ``features="energy"`` weights each feature by ``s_a``;
3. each cluster becomes one rank: the best rank-1 approximation of its members' summed (signed) update,
   divided by ``n_c ** shared_power`` where ``n_c`` counts the distinct inputs in the cluster (power 1: a
   direction shared by several tasks is averaged, one task's own is kept at its size, TIES' disjoint mean in
   rank space);
4. the spectrum of the k ranks: ``keep``; ``orth`` (TSV-like: the k left and right vectors replaced by their
   polar factors, sizes kept); ``flat`` (orth, and every size set to the mean of the k sizes: isotropic);
   ``flat_pool`` (orth, sizes set to Iso-C's value, the mean singular value of the summed update);
5. times ``gain``.

With k >= the pooled units every unit is its own cluster and, with ``spectrum="keep"``, ``gain=1``, the merge
is the exact sum (one input round-trips exactly). Inputs are summed (weights 1 by default), like TIES and the
2025 methods: step 3 decides what is averaged.

``PROXY_RUNS`` names the configurations screened on the development proxy (devproxy.py).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from loralego.corespace import polar_factor
from loralego.lowrank import thin_svd
from loralego.methods import ModuleJob, ModuleResult, register
from loralego.methods.base import thin_rank
from loralego.methods.lego import RankwiseParams

_DROP = 1e-9


class RlegoParams(RankwiseParams):
    features: Literal["direction", "energy"] = Field(
        "direction", description="k-means features: unit matrices only, or weighted by their singular value"
    )
    shared_power: float = Field(1.0, description="a cluster's summed update is divided by n_inputs ** power")
    sizing: Literal["power", "soft"] = Field(
        "power",
        description="each rank's size: the rank-1 sum divided by n_inputs ** shared_power (power), or the soft "
        "disjoint mean of the inputs' projections on it (soft; see soft_disjoint_mean)",
    )
    spectrum: Literal["keep", "orth", "flat", "flat_pool", "geo"] = Field("keep", description="the k ranks' spectrum")
    gain: float = Field(1.0, description="factor on the merged update")
    balance: bool = Field(False, description="equal Frobenius norms of the inputs per module before everything")

    @field_validator("shared_power", "gain")
    @classmethod
    def _finite(cls, value: float) -> float:
        if value != value or abs(value) == float("inf"):
            raise ValueError("must be a finite number")
        return value


def canonical_units(factors: list[tuple[torch.Tensor, torch.Tensor]], adapter_indices: list[int]):
    """``(U, s, Vh, owner)``: every input's SVD components, pooled (``U``: d_out x n, ``Vh``: n x d_in), float64;
    near-zero components dropped."""
    us, ss, vhs, owners = [], [], [], []
    for (lora_a, lora_b), index in zip(factors, adapter_indices, strict=True):
        u, s, vh = thin_svd(lora_a, lora_b)
        count = min(u.shape[1], s.numel())
        us.append(u[:, :count].double())
        ss.append(s[:count].double())
        vhs.append(vh[:count].double())
        owners.append(torch.full((count,), index, dtype=torch.long))
    u, s, vh, owner = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0), torch.cat(owners)
    live = s > _DROP * float(s.max()) if s.numel() else s > 0
    return u[:, live], s[live], vh[live], owner[live]


def unit_kernel(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, features: str) -> torch.Tensor:
    """The sign-invariant PSD kernel ``(<u_a,u_b><v_a,v_b>)^2`` (times ``s_a s_b`` for energy features)."""
    kernel = ((u.T @ u) * (vh @ vh.T)) ** 2
    if features == "energy":
        kernel = kernel * (s[:, None] * s[None, :])
    return kernel


def unit_labels(kernel: torch.Tensor, k: int, params: RankwiseParams, seed: int) -> torch.Tensor:
    from loralego.cluster import KMeans

    n = kernel.shape[0]
    if k >= n:
        return torch.arange(n)
    return KMeans(k, n_init=params.n_init, max_iter=params.max_iter, seed=seed).fit_gram(kernel).labels_.cpu()


def soft_disjoint_mean(projections: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean, soft: of the inputs' projections ``q_j`` on a rank (their sum is its size), keep those
    agreeing in sign with the sum and take their energy-weighted mean ``sum q_j^2 / sum |q_j|``: equal copies
    give their common value (averaged), one input's own direction keeps its size (the others' near-zero
    projections weigh nothing)."""
    total = projections.sum()
    agree = projections * torch.sign(total) > 0
    kept = projections[agree].abs()
    return (kept**2).sum() / kept.sum() if kept.numel() else total.abs() * 0.0


def cluster_ranks(u, s, vh, owner, labels, k: int, shared_power: float, sizing: str = "power"):
    """Per cluster: the best rank-1 approximation of the members' summed update, its size divided by
    n_inputs ** power, or (``sizing="soft"``) replaced by the soft disjoint mean of the inputs' projections on it.
    Returns ``(U_k, s_k, Vh_k)`` (d_out x k, k, k x d_in)."""
    cols, sizes, rows = [], [], []
    for cluster in range(k):
        idx = (labels == cluster).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        if idx.numel() == 1:
            u1, s1, vh1 = u[:, idx], s[idx], vh[idx]
        else:
            u1, s1, vh1 = thin_svd(vh[idx].float(), (u[:, idx] * s[idx]).float(), 1)
            u1, s1, vh1 = u1[:, :1].double(), s1[:1].double(), vh1[:1].double()
        if sizing == "soft":
            # Member a's projection on the rank: s_a <u_a, u1> <v_a, v1>, summed per input.
            proj = s[idx] * (u[:, idx].T @ u1[:, 0]) * (vh[idx] @ vh1[0])
            per_input = torch.zeros(int(owner.max()) + 1, dtype=proj.dtype).index_add_(0, owner[idx], proj)
            size = soft_disjoint_mean(per_input[torch.unique(owner[idx])]).reshape(1)
        else:
            size = s1 / int(torch.unique(owner[idx]).numel()) ** shared_power
        cols.append(u1)
        sizes.append(size)
        rows.append(vh1)
    return torch.cat(cols, 1), torch.cat(sizes), torch.cat(rows, 0)


def shape_spectrum(u, s, vh, spectrum: str, pool_value: float):
    if spectrum == "keep":
        return u, s, vh
    u, vh = polar_factor(u), polar_factor(vh.T).T
    if spectrum == "flat":
        s = torch.full_like(s, float(s.mean()))
    elif spectrum == "flat_pool":
        s = torch.full_like(s, pool_value)
    elif spectrum == "geo":
        s = (s.clamp_min(0) * pool_value).sqrt()  # halfway (in log) between keeping the sizes and Iso-C's flat one
    return u, s, vh


def signed_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """Balanced float32 factors with lowrank.truncate's sign convention, zero-padded to ``rank``."""
    from loralego.corespace import canonical_factors, pad_rank

    return pad_rank(canonical_factors(u, s, vh), rank)


def _balanced(job: ModuleJob) -> ModuleJob:
    """The job with its inputs rescaled to their mean Frobenius norm (variants.balance_adapters)."""
    from dataclasses import replace

    from variants import balance_adapters

    return replace(job, factors=balance_adapters(job.factors)) if job.params.balance else job


def merge_rlego(job: ModuleJob) -> ModuleResult:
    job = _balanced(job)
    params: RlegoParams = job.params
    u, s, vh, owner = canonical_units(job.factors, job.adapter_indices)
    k = min(job.rank, s.numel())
    labels = unit_labels(unit_kernel(u, s, vh, params.features), k, params, job.seed)
    uk, sk, vhk = cluster_ranks(u, s, vh, owner, labels, k, params.shared_power, params.sizing)
    return _finish(job, uk, sk, vhk, {"labels": labels, "unit_adapter": owner})


def _finish(job: ModuleJob, uk, sk, vhk, details: dict[str, Any]) -> ModuleResult:
    params = job.params
    pool_value = 0.0
    if params.spectrum in ("flat_pool", "geo"):
        from loralego.msu import concat

        pool_value = float(thin_svd(*concat(job.factors))[1].double().mean())
    uk, sk, vhk = shape_spectrum(uk, sk, vhk, params.spectrum, pool_value)
    sk = sk * abs(params.gain)
    if params.gain < 0:
        uk = -uk
    lora_a, lora_b = signed_factors(uk, sk, vhk, job.rank)
    return ModuleResult(lora_a, lora_b, details)


def merge_dsvd(job: ModuleJob) -> ModuleResult:
    """The top-k singular directions of the summed update, each resized to the soft disjoint mean of the inputs'
    projections on it (a shared direction averaged, one input's own kept at its size): TIES' disjoint mean in
    the summed update's singular basis."""
    from loralego.msu import concat

    u, _, vh = thin_svd(*concat(job.factors), job.rank)
    u, vh = u.double(), vh.double()
    k = u.shape[1]
    # q[j, i] = u_i^T B_j A_j v_i
    q = torch.stack([((u.T @ b.double()) * (a.double() @ vh.T).T).sum(1) for a, b in job.factors])
    sizes = torch.stack([soft_disjoint_mean(q[:, i]) for i in range(k)])
    return _finish(job, u, sizes, vh, {"space": "svd"})


register(
    "rlego",
    "experimental: rank-wise merge of canonical units (issue 15)",
    params=RlegoParams,
    output_rank=thin_rank,
    clusters=True,
)(merge_rlego)


class DsvdParams(RlegoParams):
    """dsvd reads sizing-free: always the soft disjoint mean (features, shared_power, sizing unused)."""


register(
    "dsvd",
    "experimental: the summed update's top-k directions, each at the soft disjoint mean of the inputs' projections",
    params=DsvdParams,
    output_rank=thin_rank,
)(merge_dsvd)


class BudgetParams(RlegoParams):
    per_task: int = Field(1, ge=0, le=64, description="each input's own directions in the output rank")
    flat_value: Literal["pool", "kept"] = Field(
        "pool", description="the flat size: Iso-C's (mean singular value of the summed update) or the kept ones' mean"
    )


def merge_iso_budget(job: ModuleJob) -> ModuleResult:
    """Iso-CTS with its split applied to the output rank k instead of the core size: ``per_task`` directions of
    each input's update with the common subspace projected out, the other ``k - T per_task`` from the summed
    update; both sets orthogonalised together (polar factors), the spectrum flat. At k = 16 and 7 inputs,
    Iso-CTS's own split (80 % of the core to the common part) leaves the task-specific directions at the
    bottom of the truncation; here each input is guaranteed its own ranks."""
    from loralego.corespace import core_space, truncate_orthogonal

    job = _balanced(job)
    params: BudgetParams = job.params
    space = core_space(job.factors)
    total = torch.stack(space.cores).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    tasks = len(space.cores)
    k = min(job.rank, space.size)
    per_task = min(params.per_task, k // tasks)
    common = k - per_task * tasks
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    for core in space.cores:
        specific = core - us[0] @ (us[0].T @ core)
        u_j, s_j, vh_j = torch.linalg.svd(specific, full_matrices=False)
        us.append(u_j[:, :per_task])
        ss.append(s_j[:per_task])
        vs.append(vh_j[:per_task].T)
    u_all, v_all, s_all = polar_factor(torch.cat(us, 1)), polar_factor(torch.cat(vs, 1)), torch.cat(ss)
    value = float(s.mean()) if params.flat_value == "pool" else float(s_all.mean())
    flat = torch.full_like(s_all, value * params.gain)
    cut = truncate_orthogonal(space, u_all, flat, v_all, s_all, job.rank)
    return ModuleResult(cut.lora_a, cut.lora_b, {"space": "core", "kept_energy": cut.kept_energy})


register(
    "iso_budget",
    "experimental: Iso-CTS's common/task-specific split applied to the output rank (flat spectrum)",
    params=BudgetParams,
    output_rank=thin_rank,
)(merge_iso_budget)


PROXY_RUNS: dict[str, dict[str, Any]] = {
    "rlego[p1,keep]": {"method": "rlego"},
    "rlego[p1,flat]": {"method": "rlego", "spectrum": "flat"},
    "rlego[p1,orth]": {"method": "rlego", "spectrum": "orth"},
    "rlego[p1,flat_pool]": {"method": "rlego", "spectrum": "flat_pool"},
    "rlego[p0.5,keep]": {"method": "rlego", "shared_power": 0.5},
    "rlego[p1,keep,energy]": {"method": "rlego", "features": "energy"},
    "rlego[soft,keep]": {"method": "rlego", "sizing": "soft"},
    "rlego[soft,flat]": {"method": "rlego", "sizing": "soft", "spectrum": "flat"},
    "dsvd[keep]": {"method": "dsvd"},
    "dsvd[flat]": {"method": "dsvd", "spectrum": "flat"},
    "rlego[energy,flat_pool]": {"method": "rlego", "features": "energy", "spectrum": "flat_pool"},
    "iso_budget[t1]": {"method": "iso_budget", "per_task": 1},
    "iso_budget[t2]": {"method": "iso_budget", "per_task": 2},
    **{f"rlego[energy,flat_pool,g{g}]": {"method": "rlego", "features": "energy", "spectrum": "flat_pool", "gain": g}
       for g in (1.25, 1.5, 2.0)},
    **{f"iso_budget[t1,g{g}]": {"method": "iso_budget", "per_task": 1, "gain": g} for g in (1.5, 2.0)},
    **{f"iso_budget[t2,g{g}]": {"method": "iso_budget", "per_task": 2, "gain": g} for g in (1.5, 2.0)},
    **{f"rlego[energy,flat_pool,balance,g{g}]": {"method": "rlego", "features": "energy", "spectrum": "flat_pool",
                                                 "balance": True, "gain": g} for g in (1.0, 1.5, 2.0)},
    **{f"iso_budget[t0,balance,g{g}]": {"method": "iso_budget", "per_task": 0, "balance": True, "gain": g}
       for g in (1.0, 1.5)},
    **{f"rlego[energy,geo,g{g}]": {"method": "rlego", "features": "energy", "spectrum": "geo", "gain": g}
       for g in (1.0, 1.5)},
    "rlego[energy,flat_pool,g1.75]": {"method": "rlego", "features": "energy", "spectrum": "flat_pool", "gain": 1.75},
    "iso_budget[t1,g1.75]": {"method": "iso_budget", "per_task": 1, "gain": 1.75},
    # Probes (not candidates): where the proxy puts Iso-C's best scale, to size the candidates' gain.
    "probe:iso_c[alpha=1.5]": {"method": "iso_c", "iso_alpha": 1.5},
    "probe:iso_c[alpha=0.7]": {"method": "iso_c", "iso_alpha": 0.7},
    "probe:iso_c[alpha=2.0]": {"method": "iso_c", "iso_alpha": 2.0},
    "probe:iso_cts[alpha=1.5]": {"method": "iso_cts", "iso_alpha": 1.5},
}
