"""The algebra of the rank-wise variants (the first lego+, now `lego+_x` in bench/quality/variants.py, and the
sweep's other choices): each choice is pinned against an exact statement."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import assert_updates_close, dense_updates, summed_updates

import loralego
from loralego.lowrank import frobenius_norm_sq, truncate
from loralego.methods.lego import balance_gauge, directions, least_squares_scale
from loralego.msu import from_units

# The variants that lost live with the evaluation (bench/quality/variants.py), which registers lego_x.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))
from variants import (
    adapters_per_cluster,
    balance_adapters,
    rank1_representatives,
    ties_representatives,
)


def _units(n: int = 12, d_in: int = 9, d_out: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, n)[:, None]  # very different sizes, as across adapters
    return torch.randn(n, d_in + d_out, generator=generator) * scales


def _rank1_updates(units: torch.Tensor, d_in: int) -> torch.Tensor:
    """Each unit's own update ``b a^T``: n x d_out x d_in."""
    return torch.einsum("no,ni->noi", units[:, d_in:].double(), units[:, :d_in].double())


def test_gauge_fixing_leaves_every_unit_update_unchanged():
    units = _units()
    fixed = balance_gauge(units, 9)
    torch.testing.assert_close(_rank1_updates(fixed, 9), _rank1_updates(units, 9), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(fixed[:, :9].norm(dim=1), fixed[:, 9:].norm(dim=1), rtol=1e-5, atol=1e-8)
    # Canonical sign: a unit and its negated copy (the same update) become identical.
    torch.testing.assert_close(balance_gauge(-units, 9), fixed)
    # Rescaled copies (c a, b / c) also become identical.
    torch.testing.assert_close(balance_gauge(torch.cat([units[:, :9] * 3.0, units[:, 9:] / 3.0], 1), 9), fixed)


def test_directions_are_unit_length_halves():
    feats = directions(_units(), 9)
    torch.testing.assert_close(feats[:, :9].norm(dim=1), torch.ones(12))
    torch.testing.assert_close(feats[:, 9:].norm(dim=1), torch.ones(12))


def test_rank1_representative_is_optimal_for_its_cluster():
    units = _units()
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    reps = rank1_representatives(units, labels, 3, 9)
    rep_a, rep_b = from_units(reps, 9)
    for cluster in range(3):
        summed = _rank1_updates(units[labels == cluster], 9).sum(0)
        u, s, vh = torch.linalg.svd(summed)
        best = s[0] * torch.outer(u[:, 0], vh[0])
        got = torch.outer(rep_b[:, cluster].double(), rep_a[cluster].double())
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
        # Eckart-Young: no rank-1 matrix does better; a random perturbation does worse.
        err = torch.linalg.matrix_norm(summed - got)
        assert float(err) <= float(torch.linalg.matrix_norm(summed - got * 1.01)) + 1e-12


def test_lego_plus_is_exact_when_every_unit_is_its_own_cluster(mixed_adapters):
    # k >= pool: every unit is its own cluster, so the merge is the ensemble and the least-squares scale is 1.
    adapters = [loralego.load(path) for path in mixed_adapters]
    summed = loralego.merge(adapters, method="lego+_x", rank=28, weights=[1.0] * 3)
    assert_updates_close(dense_updates(summed), summed_updates(adapters), rtol=1e-4, atol=1e-5)
    # Without weights lego+ averages: the target is the mean of the updates.
    averaged = loralego.merge(adapters, method="lego+_x", rank=28)
    assert_updates_close(dense_updates(averaged), summed_updates(adapters, [1 / 3] * 3), rtol=1e-4, atol=1e-5)


def test_rank1_representatives_on_duplicated_adapter_sum_or_average(adapter_factory):
    # Two copies of one adapter, k = r: each cluster holds a unit and its copy. The rank-1 of their summed
    # update is twice the unit (rank1: the exact sum); divided by the 2 adapters in the cluster it is the unit
    # itself (rank1_mean: TIES' disjoint mean in rank space).
    path = adapter_factory(r=4, alpha=8, seed=11)
    adapters = [loralego.load(path, name="a"), loralego.load(path, name="b")]
    options = {"method": "lego_x", "rank": 4, "n_init": 8, "gauge": "balanced", "cluster_on": "directions"}
    summed = loralego.merge(adapters, representative="rank1", **options)
    assert_updates_close(dense_updates(summed), summed_updates(adapters), rtol=1e-4, atol=1e-5)
    averaged = loralego.merge(adapters, representative="rank1_mean", **options)
    assert_updates_close(dense_updates(averaged), dense_updates(adapters[0]), rtol=1e-4, atol=1e-5)


def _factors(rank: int, seed: int, d_in: int = 9, d_out: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)


def _dense(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return factors[1].double() @ factors[0].double()


def test_least_squares_scale_is_the_best_single_factor():
    ensemble, merged = _factors(6, 1), _factors(2, 2)
    gamma = least_squares_scale(merged, ensemble)

    def error(g: float) -> float:
        return float(torch.linalg.matrix_norm(g * _dense(merged) - _dense(ensemble)))

    assert error(gamma) < min(error(gamma * 1.01), error(gamma * 0.99))
    # A truncated SVD is an orthogonal projection of the ensemble: its best factor is exactly 1.
    assert abs(least_squares_scale(truncate(*ensemble, 3), ensemble) - 1.0) < 1e-5


def test_match_norm_scale_gives_the_ensemble_norm(mixed_adapters):
    adapters = [loralego.load(path) for path in mixed_adapters]
    merged = loralego.merge(adapters, method="lego_x", rank=3, output_scale="match_norm")
    target = summed_updates(adapters)
    for module, update in dense_updates(merged).items():
        torch.testing.assert_close(torch.linalg.matrix_norm(update), torch.linalg.matrix_norm(target[module]),
                                   rtol=1e-4, atol=1e-6)


def test_balance_adapters_equalises_norms_and_keeps_each_update_direction():
    factors = [_factors(3, 3), (_factors(2, 4)[0] * 10.0, _factors(2, 4)[1]), _factors(4, 5)]
    balanced = balance_adapters(factors)
    norms = [frobenius_norm_sq(f) ** 0.5 for f in balanced]
    mean = sum(frobenius_norm_sq(f) ** 0.5 for f in factors) / 3
    for norm in norms:
        assert abs(norm - mean) < 1e-4 * mean
    for before, after in zip(factors, balanced, strict=True):
        ratio = _dense(after) / _dense(before)
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), rtol=1e-5, atol=0)


def test_ties_representative_elects_the_majority_sign():
    unit = _units(1)[0]
    members = torch.stack([unit, unit, -0.5 * unit])  # the opposing member is outvoted and left out
    reps = ties_representatives(members, torch.zeros(3, dtype=torch.long), 1, density=1.0, majority_sign="total")
    torch.testing.assert_close(reps[0], unit)


def test_lego_plus_defaults_to_weights_one_over_n(mixed_adapters):
    adapters = [loralego.load(path) for path in mixed_adapters]
    default = loralego.merge(adapters, method="lego+_x", rank=6, seed=4)
    explicit = loralego.merge(adapters, method="lego+_x", rank=6, seed=4, weights=[1 / 3] * 3)
    for module in default.modules:
        for x, y in zip(default.stored(module), explicit.stored(module), strict=True):
            assert torch.equal(x, y)


def test_adapters_per_cluster_counts_distinct_adapters():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    owner = torch.tensor([0, 0, 0, 1, 2, 2])
    assert adapters_per_cluster(labels, owner, 4).tolist() == [1, 3, 1, 1]


def test_variant_options_on_lego_match_lego_plus(mixed_adapters):
    adapters = [loralego.load(path) for path in mixed_adapters]
    plus = loralego.merge(adapters, method="lego+_x", rank=6, seed=4)
    spelled = loralego.merge(
        adapters, method="lego_x", rank=6, seed=4, gauge="balanced", cluster_on="directions",
        output_scale="least_squares", weights=[1 / 3] * 3,
    )
    for module in plus.modules:
        for x, y in zip(plus.stored(module), spelled.stored(module), strict=True):
            assert torch.equal(x, y)
