"""Minimal Semantic Units (MSUs): disassembling LoRA factors into rank-1 units and assembling them back.

Conventions (PEFT): ``A`` is ``r x d_in`` (row i is a_i), ``B`` is ``d_out x r`` (column i is b_i), and the
update of a folded LoRA is ``B @ A``. Unit i is the vector ``[a_i ; b_i]`` of length ``d_in + d_out``.
"""

from __future__ import annotations

import math

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


def fold_scale(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, weight: float = 1.0) -> Factors:
    """Fold a LoRA's scale and the user's weight into its factors, split evenly between A and B.

    Afterwards the update is plain ``B @ A`` (scale 1). The even split keeps units of differently scaled
    adapters comparable for clustering; the sign of a negative weight (or of a negative ``lora_alpha``, which
    PEFT accepts) goes on A.
    """
    factor = weight * scale
    magnitude = math.sqrt(abs(factor))
    sign = -1.0 if factor < 0 else 1.0
    return lora_a * (sign * magnitude), lora_b * magnitude


def to_units(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Disassemble folded factors into their units: an ``r x (d_in + d_out)`` matrix, one unit per row."""
    return torch.cat([lora_a, lora_b.T], dim=1)


def from_units(units: torch.Tensor, d_in: int) -> Factors:
    """Assemble units (one per row) back into factors ``(A, B)``; inverse of :func:`to_units`."""
    return units[:, :d_in].contiguous(), units[:, d_in:].T.contiguous()


def concat(factors: list[Factors]) -> Factors:
    """Concatenate LoRAs along the rank axis: the update of the result is exactly the sum of theirs."""
    return torch.cat([a for a, _ in factors], dim=0), torch.cat([b for _, b in factors], dim=1)


def dense_update(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The dense ``d_out x d_in`` update. For tests and methods that are dense by definition only."""
    return lora_b @ lora_a


def unit_norms(units: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm of each unit (row): max-abs for ``inf``, Euclidean for ``2``."""
    return units.abs().amax(dim=1) if norm == "inf" else units.norm(dim=1)
