"""A fast exact test for NaN / Inf, run on every tensor read and written."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or +-Inf.

    ``torch.isfinite(t).all()`` builds a bool tensor: 0.2-0.5 ms for an 8 x 4096 or 11008 x 8 factor on one
    core, 13 % of a profiled merge of 8 Llama-2-7B-shaped adapters; a float32 sum takes a sixth to a tenth
    of that. Any NaN or Inf makes the sum NaN or Inf, so a finite sum proves every entry finite. A non-finite
    sum of finite entries (overflow near 3e38) falls back to the exact elementwise test.
    """
    if tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())
