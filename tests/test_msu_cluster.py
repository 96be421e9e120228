"""Pure-tensor algebra: MSU identities, scale folding, thin SVD, k-means."""

from __future__ import annotations

import torch

from loralego.cluster import KMeans, squared_distances
from loralego.lowrank import frobenius_inner, thin_svd, truncate
from loralego.msu import concat, dense_update, fold_scale, from_units, to_units


def _random_lora(rank: int, d_in: int = 7, d_out: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)


def test_permutation_leaves_update_unchanged():
    lora_a, lora_b = _random_lora(6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dense_update(lora_a[perm], lora_b[:, perm]), dense_update(lora_a, lora_b))


def test_concatenation_equals_sum_of_updates_with_mixed_ranks():
    loras = [_random_lora(r, seed=r) for r in (4, 8, 16)]
    cat_a, cat_b = concat(loras)
    assert cat_a.shape == (28, 7) and cat_b.shape == (5, 28)
    expected = sum(dense_update(a, b) for a, b in loras)
    torch.testing.assert_close(dense_update(cat_a, cat_b), expected, rtol=1e-5, atol=1e-5)


def test_units_round_trip():
    lora_a, lora_b = _random_lora(3)
    units = to_units(lora_a, lora_b)
    assert units.shape == (3, 12)
    back_a, back_b = from_units(units, 7)
    assert torch.equal(back_a, lora_a) and torch.equal(back_b, lora_b)


def test_fold_scale_keeps_update_and_balances_sign():
    lora_a, lora_b = _random_lora(4)
    scale, weight = 3.0 / 4.0, -0.5
    folded_a, folded_b = fold_scale(lora_a, lora_b, scale, weight)
    torch.testing.assert_close(dense_update(folded_a, folded_b), weight * scale * dense_update(lora_a, lora_b))
    # Both factors are scaled by the same magnitude: the split is even.
    torch.testing.assert_close(folded_b.norm() / lora_b.norm(), folded_a.norm() / lora_a.norm())


def test_thin_svd_matches_dense_svd():
    lora_a, lora_b = concat([_random_lora(r, d_in=40, d_out=30, seed=r) for r in (4, 8)])
    u, s, vh = thin_svd(lora_a, lora_b)
    dense = dense_update(lora_a, lora_b).double()
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(dense)[:12], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((u * s) @ vh, dense.float(), rtol=1e-4, atol=1e-5)
    for k in (1, 5, 12):
        new_a, new_b = truncate(lora_a, lora_b, k)
        dense_u, dense_s, dense_vh = torch.linalg.svd(dense)
        best = (dense_u[:, :k] * dense_s[:k]) @ dense_vh[:k]
        torch.testing.assert_close(dense_update(new_a, new_b).double(), best, rtol=1e-4, atol=1e-5)


def test_frobenius_inner_matches_dense():
    x, y = _random_lora(4, seed=1), _random_lora(6, seed=2)
    (ax, bx), (ay, by) = x, y
    expected = float((dense_update(ax.double(), bx.double()) * dense_update(ay.double(), by.double())).sum())
    assert abs(frobenius_inner(x, y) - expected) < 1e-9 * max(1.0, abs(expected))


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=generator) for c in centers])
    first = KMeans(3, n_init=3, seed=7).fit(points)
    second = KMeans(3, n_init=3, seed=7).fit(points)
    assert torch.equal(first.labels_, second.labels_) and torch.equal(first.cluster_centers_, second.cluster_centers_)
    # Each blob is one cluster.
    for blob in range(3):
        assert first.labels_[blob * 20 : (blob + 1) * 20].unique().numel() == 1
    assert first.labels_.unique().numel() == 3
    # Centroids are exactly the means of their members; inertia is the sum of squared distances.
    for c in range(3):
        torch.testing.assert_close(first.cluster_centers_[c], points[first.labels_ == c].mean(0))
    inertia = float(squared_distances(points, first.cluster_centers_).gather(1, first.labels_[:, None]).sum())
    assert abs(inertia - first.inertia_) < 1e-3


def test_kmeans_never_leaves_a_cluster_empty_with_duplicates():
    points = torch.cat([torch.zeros(5, 3), torch.ones(2, 3)])
    model = KMeans(4, n_init=2, seed=0).fit(points)
    assert torch.bincount(model.labels_, minlength=4).min() >= 1


def test_kmeans_restarts_do_not_increase_inertia():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(3))
    one = KMeans(8, n_init=1, seed=0).fit(points).inertia_
    many = KMeans(8, n_init=6, seed=0).fit(points).inertia_
    assert many <= one + 1e-6


def test_batched_seeding_draws_what_one_by_one_seeding_draws():
    """kmeans_plus_plus_restarts relies on torch.multinomial's draws not depending on the weights: same seeds and
    the same generator state afterwards as successive kmeans_plus_plus calls (duplicates and k = 1 included)."""
    from loralego.cluster import gram_distances, kmeans_plus_plus, kmeans_plus_plus_restarts

    for trial, (n, k, restarts) in enumerate([(64, 16, 4), (10, 1, 3), (7, 7, 2), (200, 9, 1), (12, 5, 4)]):
        points = torch.randn(n, 5, generator=torch.Generator().manual_seed(trial))
        if trial == 4:
            points[3:] = points[0]  # 3 distinct points for 5 clusters: the uniform fallback is taken
        pairwise = gram_distances(points.double() @ points.double().T)
        one, batch = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        expected = torch.stack([kmeans_plus_plus(points, k, one, pairwise) for _ in range(restarts)])
        assert torch.equal(kmeans_plus_plus_restarts(pairwise, k, restarts, batch), expected)
        assert torch.equal(one.get_state(), batch.get_state())
