"""Dense reference computations for tests (the library itself never forms these)."""

from __future__ import annotations

import torch

import loralego


def dense_updates(adapter: loralego.Adapter, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``{module: weight * scale * B @ A}`` in float64, straight from the stored tensors."""
    out = {}
    for module in adapter.modules:
        lora_a, lora_b = adapter.stored(module)
        rank = adapter.modules[module].rank
        out[module] = (
            weight * adapter.scale(module) * (lora_b.double().reshape(-1, rank) @ lora_a.double().reshape(rank, -1))
        )
    return out


def summed_updates(adapters: list[loralego.Adapter], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    weights = weights or [1.0] * len(adapters)
    total: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for module, update in dense_updates(adapter, weight).items():
            total[module] = total[module] + update if module in total else update
    return total


def assert_updates_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sorted(actual) == sorted(expected)
    for module in expected:
        torch.testing.assert_close(actual[module], expected[module], rtol=rtol, atol=atol, msg=module)
