"""k-means on the rows of a matrix, in torch, deterministic for a given seed (scikit-learn-like API)."""

from __future__ import annotations

import torch


def squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for every point and center, ``n x k``; clamped at 0 against cancellation."""
    sq = (points * points).sum(1, keepdim=True) - 2.0 * points @ centers.T + (centers * centers).sum(1)[None]
    return sq.clamp_min_(0.0)


def kmeans_plus_plus(points: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability ~ D(x)^2.

    Returns the indices of the chosen points. When every remaining point coincides with a center
    (D = 0 everywhere), the next center is drawn uniformly among the points not chosen yet.
    """
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = squared_distances(points, points[chosen[0]][None]).squeeze(1)
    for _ in range(1, n_clusters):
        weights = closest.double()
        if float(weights.sum()) <= 0.0:
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0.0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, squared_distances(points, points[index][None]).squeeze(1))
    return torch.tensor(chosen)


def cluster_means(points: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members and the member counts (a count of 0 leaves a zero row).

    A one-hot matmul rather than ``index_add_``: as fast on these sizes, and ``index_add_`` on CPU was
    seen to stall under thread oversubscription.
    """
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).T.to(points.dtype)
    counts = torch.bincount(labels, minlength=n_clusters)
    return (one_hot @ points) / counts.clamp_min(1)[:, None].to(points.dtype), counts


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
        best: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
        for _ in range(self.n_init):
            seeds = kmeans_plus_plus(points, self.n_clusters, generator)
            labels, centers, inertia, n_iter = self._lloyd(points, points[seeds.to(points.device)].clone())
            # Strict '<' keeps the earliest restart on ties: the result depends on the seed only.
            if best is None or inertia < best[0]:
                best = (inertia, labels, centers, n_iter)
        assert best is not None
        self.inertia_, self.labels_, self.cluster_centers_, self.n_iter_ = best
        return self

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
