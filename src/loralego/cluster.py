"""k-means on the rows of a matrix, in torch, deterministic for a given seed (scikit-learn-like API)."""

from __future__ import annotations

import torch


def squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for every point and center, ``n x k``; clamped at 0 against cancellation."""
    sq = (points * points).sum(1, keepdim=True) - 2.0 * points @ centers.T + (centers * centers).sum(1)[None]
    return sq.clamp_min_(0.0)


def span_coordinates(points: torch.Tensor) -> torch.Tensor:
    """Coordinates of the n rows in an n-dimensional space that holds them: ``n x n``, same pairwise distances.

    k-means sees the points only through distances, so clustering these coordinates is the same clustering
    (up to rounding) at O(n^2) per distance pass instead of O(n d): with LoRA units n (the pooled rank) is
    far below d (d_in + d_out, thousands), e.g. 64 units of 15104 numbers for 8 rank-8 Llama adapters.
    The coordinates are the rows of L in the Gram matrix ``G = X X^T = L L^T`` (Cholesky, in float64 from a
    float32 Gram: as accurate as :func:`squared_distances`); a singular G (duplicated units) uses ``eigh``.
    """
    gram = (points @ points.T).double()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        factor = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()
    return factor.to(points.dtype)


def kmeans_plus_plus(
    points: torch.Tensor, n_clusters: int, generator: torch.Generator, pairwise: torch.Tensor | None = None
) -> torch.Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability ~ D(x)^2.

    Returns the indices of the chosen points. When every remaining point coincides with a center
    (D = 0 everywhere), the next center is drawn uniformly among the points not chosen yet. ``pairwise``:
    the ``n x n`` squared distances, when already computed (the restarts of one fit share them).
    """

    def to_point(index: int) -> torch.Tensor:
        if pairwise is not None:
            return pairwise[index]
        return squared_distances(points, points[index][None]).squeeze(1)

    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = to_point(chosen[0])
    for _ in range(1, n_clusters):
        weights = closest.double()
        if float(weights.sum()) <= 0.0:
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0.0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, to_point(index))
    return torch.tensor(chosen)


def cluster_means(points: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members and the member counts (a count of 0 leaves a zero row).

    A one-hot matmul rather than ``index_add_``: as fast on these sizes, and ``index_add_`` on CPU was
    seen to stall under thread oversubscription.
    """
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).T.to(points.dtype)
    counts = torch.bincount(labels, minlength=n_clusters)
    return (one_hot @ points) / counts.clamp_min(1)[:, None].to(points.dtype), counts


_PAIRWISE_MAX = 4096  # points; the n x n float32 distances then take at most 64 MiB


class KMeans:
    """Lloyd's k-means with k-means++ initialisation and restarts.

    After ``fit``: ``labels_`` (n,), ``cluster_centers_`` (k x d, each exactly the mean of its members),
    ``inertia_`` (sum of squared distances to the assigned center) and ``n_iter_``. An empty cluster is
    re-seeded with the point farthest from its center, so every cluster ends non-empty when n >= k.
    """

    def __init__(self, n_clusters: int, *, n_init: int = 4, max_iter: int = 100, seed: int = 0) -> None:
        if n_clusters < 1:
            raise ValueError("n_clusters must be >= 1")
        self.n_clusters = n_clusters
        self.n_init = max(1, n_init)
        self.max_iter = max(1, max_iter)
        self.seed = seed

    def fit(self, points: torch.Tensor) -> KMeans:
        if points.shape[0] < self.n_clusters:
            raise ValueError(f"{points.shape[0]} points cannot form {self.n_clusters} clusters")
        generator = torch.Generator().manual_seed(self.seed)
        # Fewer points than dimensions (always so for pooled LoRA units): cluster exact low-dimensional
        # coordinates, then take the centers in the original space.
        coords = span_coordinates(points) if points.shape[0] < points.shape[1] else points
        # Seeding needs the distances to each chosen point: compute them all once (n x n) when that is small.
        pairwise = squared_distances(coords, coords) if coords.shape[0] <= _PAIRWISE_MAX else None
        best: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
        for _ in range(self.n_init):
            seeds = kmeans_plus_plus(coords, self.n_clusters, generator, pairwise)
            labels, centers, inertia, n_iter = self._lloyd(coords, coords[seeds.to(coords.device)].clone())
            # Strict '<' keeps the earliest restart on ties: the result depends on the seed only.
            if best is None or inertia < best[0]:
                best = (inertia, labels, centers, n_iter)
        assert best is not None
        self.inertia_, self.labels_, centers, self.n_iter_ = best
        # Centers of clustered coordinates are not centers of the points: computed from the points on first
        # use (the lego merge takes its own means and never asks).
        self._centers: torch.Tensor | None = centers if coords is points else None
        self._points = points
        return self

    @property
    def cluster_centers_(self) -> torch.Tensor:
        if self._centers is None:
            self._centers = cluster_means(self._points, self.labels_, self.n_clusters)[0]
        return self._centers

    def _lloyd(self, points: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        labels: torch.Tensor | None = None
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007 - n_iter is reported
            distances = squared_distances(points, centers)
            new_labels = distances.argmin(1)
            new_labels = self._fill_empty(new_labels, distances)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            centers, _ = cluster_means(points, labels, self.n_clusters)
        assert labels is not None
        centers, _ = cluster_means(points, labels, self.n_clusters)
        inertia = float(((points - centers[labels]) ** 2).sum())
        return labels, centers, inertia, n_iter

    def _fill_empty(self, labels: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """Give each empty cluster the point farthest from its own center (taken from a cluster of >= 2)."""
        counts = torch.bincount(labels, minlength=self.n_clusters)
        if bool((counts > 0).all()):
            return labels
        labels = labels.clone()
        own = distances.gather(1, labels[:, None]).squeeze(1).clone()
        for cluster in torch.nonzero(counts == 0).flatten().tolist():
            movable = counts[labels] > 1
            candidates = torch.where(movable, own, torch.full_like(own, -1.0))
            index = int(candidates.argmax())
            counts[labels[index]] -= 1
            counts[cluster] += 1
            labels[index] = cluster
            own[index] = -1.0
        return labels
