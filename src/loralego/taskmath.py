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


# Tensors with at least this many entries find the trim threshold from a sample first (``_top_count_mask``);
# smaller ones go straight to ``torch.topk``, whose cost there is negligible.
_SELECT_MIN_ENTRIES = 1 << 16
_SAMPLE_ENTRIES = 1 << 15


def _top_count_mask(magnitude: torch.Tensor, count: int) -> torch.Tensor | None:
    """The mask of the ``count`` largest entries of a flat non-negative tensor, ``magnitude >= t`` for the
    exact ``count``-th largest value ``t``; None when that is not the top-``count`` set (ties at ``t``, NaN),
    where only ``torch.topk``'s own tie-breaking gives the expected set.

    Why: ``topk`` (and ``kthvalue``) over tens of millions of entries cost seconds per 7B-sized update. Here a
    strided sample brackets ``t`` in ``[low, high]``, two counting passes confirm the bracket holds the
    ``count``-th largest, and ``kthvalue`` runs on the few entries inside it. The result is exact: the bracket
    is verified by counting, not trusted from the sample, and a bracket that misses falls back to the whole.
    """
    total = magnitude.numel()
    step = max(1, total // _SAMPLE_ENTRIES)
    sample = magnitude[::step].sort().values
    position = (1.0 - count / total) * (sample.numel() - 1)  # where t falls in the sorted sample
    spread = 4.0 * (sample.numel() ** 0.5) + 8.0  # a generous margin: the sample quantile's error is ~sqrt(m)
    low = sample[max(0, int(position - spread))]
    high = sample[min(sample.numel() - 1, int(position + spread) + 1)]
    above = int((magnitude > high).sum())
    inside = magnitude[(magnitude >= low) & (magnitude <= high)]
    if not above < count <= above + inside.numel():
        inside = magnitude  # the bracket missed (a skewed sample): select over everything
        above = 0
    threshold = torch.kthvalue(inside, inside.numel() - (count - above) + 1).values
    if float(threshold) == 0.0:
        return magnitude > 0  # fewer nonzeros than count: the kept zeros change no value
    mask = magnitude >= threshold
    return mask if int(mask.sum()) == count else None


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the others (TIES "trim").

    ``density >= 1`` keeps everything. Ties in magnitude at the threshold are broken by ``torch.topk``, as in
    PEFT; without ties the kept set is found by an exact threshold (:func:`_top_count_mask`, the same set).
    """
    if density >= 1.0:
        return tensor
    flat = tensor.reshape(-1)
    count = int(density * flat.numel())
    if count == 0:
        return torch.zeros_like(tensor)
    magnitude = flat.abs()
    keep = _top_count_mask(magnitude, count) if flat.numel() >= _SELECT_MIN_ENTRIES else None
    if keep is None:
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(magnitude, k=count, largest=True).indices] = True
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
