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
# smaller ones go straight to ``torch.topk`` (PEFT's selection, tie-breaking included), cheap at that size.
_SELECT_MIN_ENTRIES = 1 << 16
_SAMPLE_ENTRIES = 1 << 15


def _kth_largest(magnitude: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """``(t, above)``: the exact ``count``-th largest value of a flat non-negative tensor and how many entries
    exceed it. A strided sample brackets ``t`` in ``[low, high]``; counting passes confirm the bracket holds the
    ``count``-th largest (else the bracket is everything) and ``kthvalue`` runs on the few entries inside."""
    total = magnitude.numel()
    step = max(1, total // _SAMPLE_ENTRIES)
    sample = magnitude[::step].sort().values
    position = (1.0 - count / total) * (sample.numel() - 1)  # where t falls in the sorted sample
    spread = 4.0 * (sample.numel() ** 0.5) + 8.0  # margin: a sample quantile's rank error is ~sqrt(m)
    low = sample[max(0, int(position - spread))]
    high = sample[min(sample.numel() - 1, int(position + spread) + 1)]
    above = int((magnitude > high).sum())
    inside = magnitude[(magnitude >= low) & (magnitude <= high)]
    if not above < count <= above + inside.numel():
        inside, above = magnitude, 0  # the bracket missed (a skewed sample): select over everything
    threshold = torch.kthvalue(inside, inside.numel() - (count - above) + 1).values
    return threshold, int((magnitude > threshold).sum())


def _top_count_mask(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """The mask of ``count`` largest entries of a flat non-negative tensor: every entry above the exact
    ``count``-th largest value ``t``, then of the entries equal to ``t`` the first ones by position until
    ``count`` are kept.

    Why not ``torch.topk``: over tens of millions of entries it costs seconds per 7B-sized update, and its
    choice among entries tied at ``t`` is unspecified; ties at ``t`` are common there (a float32 update of 16M
    entries has several entries per representable value near ``t``). The kept set is the same top-``count``
    set up to that choice, which here is defined (lowest positions first) and deterministic.
    """
    threshold, above = _kth_largest(magnitude, count)
    mask = magnitude > threshold
    if above < count:
        tied = (magnitude == threshold).nonzero().squeeze(1)
        mask[tied[: count - above]] = True
    return mask


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the others (TIES "trim").

    ``density >= 1`` keeps everything. Tensors under ``_SELECT_MIN_ENTRIES`` entries select with
    ``torch.topk``, as PEFT (its tie-breaking); larger ones with an exact threshold and ties at it broken by
    position (:func:`_top_count_mask`). Only the choice among equal magnitudes differs between the two.
    """
    if density >= 1.0:
        return tensor
    flat = tensor.reshape(-1)
    count = int(density * flat.numel())
    if count == 0:
        return torch.zeros_like(tensor)
    magnitude = flat.abs()
    if flat.numel() >= _SELECT_MIN_ENTRIES and not bool(torch.isnan(magnitude).any()):
        keep = _top_count_mask(magnitude, count)
    else:
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(magnitude, k=count, largest=True).indices] = True
    return torch.where(keep, flat, 0.0).reshape(tensor.shape)


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
    total = torch.where(agree, stacked, 0.0).sum(dim=0)  # a scalar zero: no stack-sized zeros tensor
    # counted in the float dtype (exact while the count is: 2^24 tasks in float32, 256 in bfloat16): a float
    # reduction over dim 0 is several times faster than torch's integer reduction of a bool tensor
    return total / agree.to(stacked.dtype).sum(dim=0).clamp_min(1)


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
