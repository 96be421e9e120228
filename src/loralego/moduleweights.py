"""Per-module merge weights, given to the unchanged merge pipeline by folding them into an adapter's factors.

The pipeline takes one weight per adapter. A learned weight per (adapter, module) is applied here instead: a
view of the adapter whose module ``m`` reads as its stored factors times ``w_m`` (split as ``sqrt|w_m|`` on each
factor, the sign on A, as the pipeline folds its own weights), merged at pipeline weight 1. The view keeps the
adapter's name, hash and config, so the output records where it came from; the per-module weights themselves
are recorded beside it (``tune.json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from .adapters import Adapter
from .errors import LoraLegoError


def scaled_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors whose product is ``weight`` times the input's, in float32."""
    magnitude = math.sqrt(abs(weight))
    sign = -1.0 if weight < 0 else 1.0
    return lora_a.to(torch.float32) * (sign * magnitude), lora_b.to(torch.float32) * magnitude


def with_module_weights(adapter: Adapter, weights: Mapping[str, float]) -> Adapter:
    """A view of ``adapter`` whose module ``m`` has its update multiplied by ``weights[m]`` (absent: 1)."""
    unknown = sorted(set(weights) - set(adapter.modules))
    if unknown:
        raise LoraLegoError(f"{adapter.name}: per-module weight for {unknown[0]!r}, a module it does not have")
    for module, weight in weights.items():
        if not math.isfinite(weight):
            raise LoraLegoError(f"{adapter.name}: module {module}: weight {weight} is not finite")
    source = adapter.loader
    table = dict(weights)

    def load(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a, lora_b = source(module)
        return scaled_factors(lora_a, lora_b, table.get(module, 1.0))

    return dataclasses.replace(adapter, loader=load)
