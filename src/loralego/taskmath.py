"""Element-wise task-vector arithmetic of TIES, DARE and magnitude pruning, for tensors of any shape.

The same functions serve both spaces of the methods in ``methods/``: dense ``d_out x d_in`` updates
(one module at a time) and the A or B factors separately (PEFT's factor-wise variants).

Every combination takes the *weighted* task tensors: each input's scale and user weight are already inside
(the pipeline folds them into the factors). So the sign election of TIES sees the contributions that are
actually summed; a task with a negative weight votes with its negated values. PEFT instead elects signs on
the unweighted tensors and applies the weights afterwards; both agree whenever all inputs share one
positive weight x scale (see tests/test_baselines.py for the formulas side by side).

Pruning is invariant to a positive factor (the same entries survive), so trimming weighted or unweighted
tensors keeps the same entries. Random pruning draws one Bernoulli mask per tensor, in the order given,
from the generator passed in: the same generator state gives the same masks as PEFT's
``peft.utils.merge_utils`` after ``torch.manual_seed`` with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the others (TIES "trim").

    ``density >= 1`` keeps everything. Ties in magnitude are broken by ``torch.topk``, as in PEFT.
    """
    if density >= 1.0:
        return tensor
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    count = int(density * flat.numel())
    if count > 0:
        keep[torch.topk(flat.abs(), k=count, largest=True).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tensor.shape)


def random_prune(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True
) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE "drop"), then divide by ``density``
    so the expectation is the input (DARE "rescale"). ``density >= 1`` keeps everything and draws nothing."""
    if density >= 1.0:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def elect_sign(stacked: torch.Tensor, method: MajoritySign = "total") -> torch.Tensor:
    """The elected sign (+1 or -1) of every entry over the tasks stacked on dim 0.

    ``total``: the sign of the sum of the values (mass decides). ``frequency``: the sign held by more tasks.
    Zero totals elect +1.
    """
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown majority sign method {method!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean, per entry, of the tasks whose value has the elected sign (pruned zeros never agree);
    entries no task agrees on are 0."""
    agree = stacked.sign() == sign
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1).to(stacked.dtype)


def _stack(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors), dim=0)


def magnitude_prune(tensors: Iterable[torch.Tensor], density: float) -> torch.Tensor:
    """Sum of the magnitude-trimmed tasks."""
    return _stack(trim_by_magnitude(t, density) for t in tensors).sum(dim=0)


def ties(tensors: Iterable[torch.Tensor], density: float, majority_sign: MajoritySign = "total") -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim by magnitude, elect a sign per entry, disjoint mean."""
    trimmed = _stack(trim_by_magnitude(t, density) for t in tensors)
    return disjoint_merge(trimmed, elect_sign(trimmed, majority_sign))


def dare_linear(tensors: Iterable[torch.Tensor], density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE (Yu et al. 2024) then a plain sum: random drop with rescale, summed."""
    return _stack(random_prune(t, density, generator) for t in tensors).sum(dim=0)


def dare_ties(
    tensors: Iterable[torch.Tensor],
    density: float,
    generator: torch.Generator | None,
    majority_sign: MajoritySign = "total",
) -> torch.Tensor:
    """DARE's random drop with rescale, then TIES' sign election and disjoint mean."""
    pruned = _stack(random_prune(t, density, generator) for t in tensors)
    return disjoint_merge(pruned, elect_sign(pruned, majority_sign))
