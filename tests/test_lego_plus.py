"""lego+ (canonical units, sign-invariant k-means, isotropic ranks): each step pinned against exact algebra."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_updates

import loralego
from loralego.errors import LoraLegoError
from loralego.methods.base import ModuleJob
from loralego.methods.lego import (
    PLUS_ALPHA,
    LegoPlusParams,
    balance_inputs,
    canonical_kernel,
    canonical_merge,
    canonical_units,
    cluster_directions,
    isotropic_value,
)


def _factors(seed: int, ranks: list[int], d_in: int = 40, d_out: int = 30):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)) for r in ranks]


def _job(factors, rank: int, seed: int = 0, **params) -> ModuleJob:
    ranks = [a.shape[0] for a, _ in factors]
    return ModuleJob("m", factors, list(range(len(factors))), ranks, rank, True, seed, LegoPlusParams(**params))


def _update(result) -> torch.Tensor:
    return result.lora_b.double() @ result.lora_a.double()


def _iso_c(update: torch.Tensor, rank: int, alpha: float, size: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(update)
    return alpha * float(s[:size].mean()) * u[:, :rank] @ vh[:rank]


def test_canonical_units_are_each_inputs_svd():
    factors = _factors(0, [3, 5])
    units = canonical_units(factors, [0, 1])
    assert units.owner.tolist() == [0] * 3 + [1] * 5
    for j, (a, b) in enumerate(factors):
        mine = units.owner == j
        rebuilt = units.u[:, mine] @ torch.diag(units.s[mine]) @ units.vh[mine]
        torch.testing.assert_close(rebuilt, b.double() @ a.double(), rtol=1e-5, atol=1e-5)
        eye = torch.eye(int(mine.sum()), dtype=torch.float64)
        torch.testing.assert_close(units.u[:, mine].T @ units.u[:, mine], eye, atol=1e-5, rtol=0)


def test_kernel_is_sign_invariant_and_psd():
    factors = _factors(1, [4, 4])
    units = canonical_units(factors, [0, 1])
    flipped = canonical_units([factors[0], (factors[1][0], -factors[1][1])], [0, 1])
    torch.testing.assert_close(canonical_kernel(units), canonical_kernel(flipped))
    assert float(torch.linalg.eigvalsh(canonical_kernel(units)).min()) > -1e-8


def test_cluster_direction_is_the_top_pair_of_the_summed_members():
    units = canonical_units(_factors(2, [3, 3]), [0, 1])
    labels = torch.tensor([0, 1, 1, 0, 1, 1])
    u_k, vh_k = cluster_directions(units, labels, 2)
    for cluster in range(2):
        members = labels == cluster
        summed = units.u[:, members] @ torch.diag(units.s[members]) @ units.vh[members]
        u, _, vh = torch.linalg.svd(summed)
        got = torch.outer(u_k[:, cluster], vh_k[cluster])
        torch.testing.assert_close(got, torch.outer(u[:, 0], vh[0]), rtol=1e-4, atol=1e-5)


def test_one_input_is_iso_c_of_it():
    # One input, k = r: its own singular vectors at lego_alpha x the mean singular value (Iso-C on one input).
    factors = _factors(3, [6])
    update = factors[0][1].double() @ factors[0][0].double()
    for alpha in (1.0, 0.5):
        result = canonical_merge(_job(factors, 6, lego_alpha=alpha))
        torch.testing.assert_close(_update(result), _iso_c(update, 6, alpha, 6), rtol=1e-4, atol=1e-5)


def test_every_unit_its_own_cluster_is_tsv_directions_with_a_flat_spectrum():
    from loralego.corespace import core_space
    from loralego.methods.spectral import tsv_components

    factors = _factors(4, [2, 3, 4])
    result = canonical_merge(_job(factors, 9, lego_alpha=1.0, lego_balance=False))
    space = core_space(factors)
    u, _, v = tsv_components(space, [2, 3, 4])
    expected = isotropic_value(factors) * space.lift_out(u) @ space.lift_in(v).T
    torch.testing.assert_close(_update(result), expected, rtol=1e-4, atol=1e-5)
    # The polar factors do not depend on the inputs' order: with k >= N the merge is permutation invariant.
    swapped = canonical_merge(_job([factors[2], factors[0], factors[1]], 9, lego_alpha=1.0, lego_balance=False))
    torch.testing.assert_close(_update(swapped), _update(result), rtol=1e-4, atol=1e-5)


def test_output_is_exactly_rank_k_orthogonal_and_flat():
    factors = _factors(5, [4, 8, 4])
    result = canonical_merge(_job(factors, 7))
    assert result.lora_a.shape == (7, 40) and result.lora_b.shape == (30, 7)
    singular = torch.linalg.svdvals(_update(result))
    # Balanced by default: Iso-C's value of the balanced inputs.
    torch.testing.assert_close(singular[:7], torch.full((7,), PLUS_ALPHA * isotropic_value(balance_inputs(factors)),
                                                         dtype=torch.float64), rtol=1e-4, atol=0)
    assert float(singular[7:].max()) < 1e-4


def test_sign_flipped_copies_share_a_cluster_and_cancel():
    a, b = _factors(6, [2])[0]
    flipped = canonical_merge(_job([(a, b), (a.clone(), -b)], 2))
    # Each cluster holds +M and -M (the kernel cannot tell them apart): unit i of one input pairs with unit i
    # of the other (same singular value), whatever the sign.
    labels = flipped.details["labels"].tolist()
    assert labels[0] == labels[2] and labels[1] == labels[3] and labels[0] != labels[1]


def test_same_seed_same_bytes_and_rank_deficient_input_padded():
    factors = _factors(7, [4, 8, 4])
    first, second = canonical_merge(_job(factors, 6, seed=3)), canonical_merge(_job(factors, 6, seed=3))
    assert torch.equal(first.lora_a, second.lora_a) and torch.equal(first.lora_b, second.lora_b)
    a, b = _factors(8, [1])[0]
    deficient = [(torch.cat([a, a]), torch.cat([b, b], 1))]  # rank 2 factors, rank-1 update
    result = canonical_merge(_job(deficient, 2))
    assert result.lora_a.shape == (2, 40)
    assert float(result.lora_a[1].abs().max()) == 0.0


def test_mixed_ranks_alpha_and_rslora_through_the_api(mixed_adapters):
    adapters = [loralego.load(path) for path in mixed_adapters]
    merged = loralego.merge(adapters, method="lego+", rank=6, seed=1)
    folded = {m: [ad.folded(m) for ad in adapters if m in ad.modules] for m in merged.modules}
    for module, update in dense_updates(merged).items():
        # Every module: rank 6 (or its pool), flat at lego_alpha x Iso-C's value of the folded inputs.
        inputs = folded[module]
        pool = sum(a.shape[0] for a, _ in inputs)
        k = min(6, pool)
        singular = torch.linalg.svdvals(update.double())
        expected = PLUS_ALPHA * isotropic_value(balance_inputs(inputs))
        torch.testing.assert_close(singular[:k], torch.full((k,), expected, dtype=torch.float64), rtol=1e-3, atol=0)
    # Weights are applied before the merge (folded): weights 2 doubles every update.
    doubled = loralego.merge(adapters, method="lego+", rank=6, seed=1, weights=[2.0] * 3)
    for module, update in dense_updates(doubled).items():
        torch.testing.assert_close(update, 2 * dense_updates(merged)[module], rtol=1e-3, atol=1e-5)


def test_balancing_equalises_norms_and_is_the_merge_of_the_balanced_inputs():
    factors = _factors(9, [2, 4, 3])
    factors[1] = (factors[1][0] * 10, factors[1][1])
    balanced = balance_inputs(factors)
    norms = [float((b.double() @ a.double()).norm()) for a, b in balanced]
    originals = [float((b.double() @ a.double()).norm()) for a, b in factors]
    assert max(norms) == pytest.approx(min(norms), rel=1e-5)
    assert norms[0] == pytest.approx(sum(originals) / 3, rel=1e-5)
    default = canonical_merge(_job(factors, 4, seed=2))
    spelled = canonical_merge(_job(balanced, 4, seed=2, lego_balance=False))
    torch.testing.assert_close(_update(default), _update(spelled), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_lego_alpha_must_be_positive_and_finite(mixed_adapters, value):
    adapters = [loralego.load(path) for path in mixed_adapters]
    with pytest.raises(LoraLegoError):
        loralego.merge(adapters, method="lego+", rank=4, lego_alpha=value)
