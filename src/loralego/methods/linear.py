"""``linear``: PEFT's factor-wise weighted average, ``A = sum A_j``, ``B = sum B_j`` (folded factors).

Its update ``(sum B_j)(sum A_j)`` carries cross terms ``B_i A_j`` that belong to no input: this is the
baseline the rank-wise methods are compared with, not an exact merge. Scale and weight are folded as
``sqrt(w s)`` on each factor (sign of w on A), exactly as PEFT 0.21's ``linear`` does, so the two agree for
any scales (tests/test_baselines.py). Older PEFT releases put ``sqrt(w) s`` on A and ``sqrt(w)`` on B, so
their cross terms used the other adapter's scale; they agree with this one only when all share ``alpha / r``.
"""

from __future__ import annotations

import torch

from . import register
from .base import ModuleJob, ModuleResult, RankRequest


def input_rank(params: object, request: RankRequest) -> int:
    return request.source_ranks[0]


@register(
    "linear",
    "factor-wise weighted sum of A and B (as PEFT); equal ranks only",
    equal_ranks=True,
    takes_rank=False,
    output_rank=input_rank,
)
def merge_linear(job: ModuleJob) -> ModuleResult:
    lora_a = torch.stack([a for a, _ in job.factors]).sum(0)
    lora_b = torch.stack([b for _, b in job.factors]).sum(0)
    return ModuleResult(lora_a, lora_b)
