"""Exact algebra of issue 15's experimental rank-wise merges (bench/quality/research_methods.py; no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

import research_methods as rm

from loralego.methods.base import ModuleJob


def _factors(seed: int, ranks: list[int], d_in: int = 40, d_out: int = 30):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)) for r in ranks]


def _job(factors, rank: int, params_type=rm.RlegoParams, **params) -> ModuleJob:
    ranks = [a.shape[0] for a, _ in factors]
    return ModuleJob("m", factors, list(range(len(factors))), ranks, rank, True, 0, params_type(**params))


def _update(result) -> torch.Tensor:
    return result.lora_b.double() @ result.lora_a.double()


def _dense(factors) -> torch.Tensor:
    return sum(b.double() @ a.double() for a, b in factors)


def test_single_input_round_trips():
    factors = _factors(0, [6])
    result = rm.merge_rlego(_job(factors, 6))
    assert torch.allclose(_update(result), _dense(factors), atol=1e-4)
    assert result.lora_a.shape == (6, 40)


def test_exact_sum_when_every_unit_is_its_own_cluster():
    factors = _factors(1, [4, 8, 2])  # mixed ranks
    result = rm.merge_rlego(_job(factors, 14))
    assert torch.allclose(_update(result), _dense(factors), atol=1e-4)


def test_output_rank_is_exactly_k_and_shared_clusters_are_averaged():
    base = _factors(2, [3])[0]
    # Two inputs with the same update: every cluster holds both inputs' copy, so the disjoint mean
    # (power 1) returns the update itself, the sum (power 0) twice it.
    factors = [base, (base[0].clone(), base[1].clone())]
    mean = rm.merge_rlego(_job(factors, 3))
    total = rm.merge_rlego(_job(factors, 3, shared_power=0.0))
    assert mean.lora_a.shape[0] == 3
    assert torch.allclose(_update(mean), _dense([base]), atol=1e-4)
    assert torch.allclose(_update(total), 2 * _dense([base]), atol=1e-4)


def test_sign_flipped_copies_cancel_in_one_cluster():
    a, b = _factors(3, [2])[0]
    factors = [(a, b), (a.clone(), -b)]
    # k = 2: the kernel cannot tell M from -M, so each direction's cluster holds +M and -M: they sum to 0.
    result = rm.merge_rlego(_job(factors, 2))
    assert _update(result).abs().max() < 1e-4


def test_flat_spectrum_is_orthogonal_and_isotropic():
    factors = _factors(4, [4, 4, 4])
    result = rm.merge_rlego(_job(factors, 5, spectrum="flat"))
    singular = torch.linalg.svdvals(_update(result))[:5]
    assert torch.allclose(singular, singular.mean().expand(5), rtol=1e-4)


def test_same_seed_same_bytes():
    factors = _factors(5, [4, 8, 4])
    first, second = rm.merge_rlego(_job(factors, 6)), rm.merge_rlego(_job(factors, 6))
    assert torch.equal(first.lora_a, second.lora_a) and torch.equal(first.lora_b, second.lora_b)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gain_must_be_finite(value):
    with pytest.raises(ValueError):
        rm.RlegoParams(gain=value)


def test_soft_disjoint_mean():
    assert float(rm.soft_disjoint_mean(torch.tensor([2.0, 2.0, 2.0]))) == pytest.approx(2.0)
    assert float(rm.soft_disjoint_mean(torch.tensor([3.0, 0.0]))) == pytest.approx(3.0)
    # The disagreeing sign is left out: the mean of the agreeing ones.
    assert float(rm.soft_disjoint_mean(torch.tensor([2.0, 2.0, -1.0]))) == pytest.approx(2.0)


def test_soft_sizing_and_dsvd_round_trip_one_input_and_average_copies():
    base = _factors(6, [4])[0]
    for method in (rm.merge_rlego, rm.merge_dsvd):
        one = method(_job([base], 4, sizing="soft"))
        assert torch.allclose(_update(one), _dense([base]), atol=1e-4)
        copies = method(_job([base, (base[0].clone(), base[1].clone())], 4, sizing="soft"))
        assert torch.allclose(_update(copies), _dense([base]), atol=1e-4)


def test_dsvd_keeps_orthogonal_inputs_at_full_size():
    # Inputs on disjoint coordinates: every top direction belongs to one input; the merge is their exact sum.
    a1, a2 = torch.zeros(2, 40), torch.zeros(2, 40)
    a1[0, 0], a1[1, 1], a2[0, 2], a2[1, 3] = 3.0, 2.0, 1.5, 1.0
    b1, b2 = torch.zeros(30, 2), torch.zeros(30, 2)
    b1[0, 0], b1[1, 1], b2[2, 0], b2[3, 1] = 1.0, 1.0, 1.0, 1.0
    result = rm.merge_dsvd(_job([(a1, b1), (a2, b2)], 4))
    assert torch.allclose(_update(result), _dense([(a1, b1), (a2, b2)]), atol=1e-5)


def test_iso_budget_is_flat_orthogonal_and_exactly_k():
    factors = _factors(7, [4, 8, 4])
    result = rm.merge_iso_budget(_job(factors, 7, rm.BudgetParams, per_task=2))
    assert result.lora_a.shape[0] == 7
    singular = torch.linalg.svdvals(_update(result))[:7]
    assert torch.allclose(singular, singular.mean().expand(7), rtol=1e-4)
    # Iso-C's flat value: the mean singular value of the summed update.
    expected = torch.linalg.svdvals(_dense(factors))[:16].mean()
    assert float(singular.mean()) == pytest.approx(float(expected), rel=1e-4)
