"""A small, seeded CMA-ES for the gradient-free search of merge weights (as LoraHub's few-shot search).

The update rules follow Hansen's tutorial, "The CMA Evolution Strategy: A Tutorial" (arXiv 1604.00772),
with its default population size and learning rates; candidates are clipped to box bounds before they are
evaluated (LoraHub bounds its weights the same way). Pure numpy on a few dimensions (one per adapter), so the
cost is the objective's. Same seed, same candidates, same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    x: tuple[float, ...]
    value: float
    evaluation: int  # 1-based index of the objective call that produced it


def cma_es(
    objective: Callable[[np.ndarray], float],
    x0: np.ndarray,
    *,
    sigma0: float,
    budget: int,
    seed: int,
    bounds: tuple[float, float],
    on_generation: Callable[[Candidate, int], None] | None = None,
) -> Candidate:
    """Minimise ``objective`` with at most ``budget`` calls, starting from (and evaluating) ``x0``.

    ``on_generation(best_so_far, evaluations_used)`` is called after ``x0`` and after every generation.
    Returns the best candidate seen.
    """
    lower, upper = bounds
    mean = np.clip(np.asarray(x0, dtype=np.float64), lower, upper)
    n = mean.size
    rng = np.random.default_rng(seed)
    used = 1
    best = Candidate(tuple(float(v) for v in mean), float(objective(mean.copy())), used)
    if on_generation is not None:
        on_generation(best, used)

    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    raw = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w = raw / raw.sum()
    mueff = 1.0 / float(np.sum(w**2))
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    cs = (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
    sigma = float(sigma0)
    cov = np.eye(n)
    pc = np.zeros(n)
    ps = np.zeros(n)
    generation = 0
    while used < budget:
        eigenvalues, basis = np.linalg.eigh(cov)
        scales = np.sqrt(np.maximum(eigenvalues, 1e-20))
        count = min(lam, budget - used)
        z = rng.standard_normal((lam, n))[:count]
        xs = np.clip(mean + sigma * (z * scales) @ basis.T, lower, upper)
        values = []
        for x in xs:
            used += 1
            values.append(float(objective(x.copy())))
            if values[-1] < best.value:
                best = Candidate(tuple(float(v) for v in x), values[-1], used)
        if count < lam:  # the budget ran out mid-generation: no update from a partial population
            if on_generation is not None:
                on_generation(best, used)
            break
        order = np.argsort(np.asarray(values), kind="stable")
        ys = (xs[order[:mu]] - mean) / sigma  # steps of the (clipped) selected candidates
        step = w @ ys
        mean = mean + sigma * step
        inv_sqrt = basis @ np.diag(1 / scales) @ basis.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ step
        generation += 1
        norm_ps = float(np.linalg.norm(ps))
        hsig = norm_ps / math.sqrt(1 - (1 - cs) ** (2 * generation)) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + (math.sqrt(cc * (2 - cc) * mueff) * step if hsig else 0.0)
        rank_mu = (ys.T * w) @ ys
        cov = (
            (1 - c1 - cmu) * cov
            + c1 * (np.outer(pc, pc) + (0.0 if hsig else cc * (2 - cc)) * cov)
            + cmu * rank_mu
        )
        cov = (cov + cov.T) / 2
        sigma *= math.exp((cs / damps) * (norm_ps / chi_n - 1))
        if on_generation is not None:
            on_generation(best, used)
    return best
