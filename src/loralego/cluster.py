"""k-means on the rows of a matrix, in torch, deterministic for a given seed (scikit-learn-like API)."""

from __future__ import annotations

import torch


def squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for every point and center, ``n x k``; clamped at 0 against cancellation."""
    sq = (points * points).sum(1, keepdim=True) - 2.0 * points @ centers.T + (centers * centers).sum(1)[None]
    return sq.clamp_min_(0.0)


def gram_coordinates(gram: torch.Tensor) -> torch.Tensor:
    """Coordinates of n points given only their Gram matrix ``G = X X^T``: the rows of L with ``L L^T = G``.

    k-means sees the points only through distances, which these ``n x n`` coordinates keep (up to rounding),
    so clustering them is the same clustering at O(n^2) per distance pass instead of O(n d): with LoRA units
    n (the pooled rank) is far below d (d_in + d_out), e.g. 64 units of 15104 numbers for 8 rank-8 Llama
    adapters. Cholesky in float64 (as accurate as :func:`squared_distances` on a float32 Gram); a singular G
    (duplicated units) uses ``eigh``.
    """
    gram = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        factor = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()
    return factor


def gram_distances(gram: torch.Tensor) -> torch.Tensor:
    """All squared distances ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij`` from the Gram matrix; the diagonal is 0."""
    diagonal = gram.diagonal()
    return (diagonal[:, None] + diagonal[None, :] - 2.0 * gram).clamp_min_(0.0)


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
    closest = to_point(chosen[0]).double()  # the float32 distances, exactly; multinomial draws from float64
    for _ in range(1, n_clusters):
        weights = closest
        if float(weights.sum()) <= 0.0:
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0.0
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, to_point(index).double())
    return torch.tensor(chosen)


def kmeans_plus_plus_restarts(
    pairwise: torch.Tensor, n_clusters: int, restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """The seeds of ``restarts`` successive :func:`kmeans_plus_plus` calls from the ``n x n`` squared distances,
    computed for all restarts at once: ``restarts x n_clusters`` point indices, the same ones.

    The same random numbers, drawn up front: ``torch.multinomial(w, 1)`` on the CPU draws one Exp(1) sample per
    point and returns ``argmax(w / q)`` (the exponential form of the Gumbel-max trick), so the numbers it takes
    from the generator do not depend on ``w``, and one ``exponential_`` call of ``(k - 1) x n`` takes the same
    numbers as ``k - 1`` calls of ``n``. Each restart therefore draws its ``randint`` and then its ``(k - 1) x n``
    exponentials, as the one-by-one seeding did, and the ``k - 1`` steps run as ``restarts``-row tensor ops.
    ``tests/test_cluster.py`` checks the indices and the generator's final state against
    :func:`kmeans_plus_plus`, so a torch that draws differently fails there, not silently.
    """
    pairwise = pairwise.double().cpu()
    n = pairwise.shape[0]
    firsts, exponentials = [], []
    for _ in range(restarts):
        firsts.append(int(torch.randint(n, (1,), generator=generator)))
        if n_clusters > 1:
            draw = torch.empty(n_clusters - 1, n, dtype=torch.float64)
            exponentials.append(draw.exponential_(1, generator=generator))
    draws = torch.stack(exponentials) if exponentials else None  # restarts x (k - 1) x n
    chosen = torch.empty(restarts, n_clusters, dtype=torch.long)
    chosen[:, 0] = torch.tensor(firsts)
    closest = pairwise[chosen[:, 0]]  # restarts x n
    rows = torch.arange(restarts)
    for step in range(1, n_clusters):
        weights = closest
        spent = weights.sum(1) <= 0.0  # every point on a center (duplicates): uniform among the unchosen
        if bool(spent.any()):
            weights = weights.clone()
            for r in torch.nonzero(spent).flatten().tolist():
                weights[r] = 1.0
                weights[r, chosen[r, :step]] = 0.0
        assert draws is not None
        index = (weights / draws[:, step - 1]).argmax(1)
        chosen[rows, step] = index
        closest = torch.minimum(closest, pairwise[index])
    return chosen


def cluster_means(points: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members and the member counts (a count of 0 leaves a zero row).

    A one-hot matmul rather than ``index_add_``: as fast on these sizes, and ``index_add_`` on CPU was
    seen to stall under thread oversubscription.
    """
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).T.to(points.dtype)
    counts = torch.bincount(labels, minlength=n_clusters)
    return (one_hot @ points) / counts.clamp_min(1)[:, None].to(points.dtype), counts


def _batched_means(points: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """:func:`cluster_means` of each row of ``labels`` (``R x n``): ``R x k x d`` (an empty cluster: zeros)."""
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).to(points.dtype)
    counts = one_hot.sum(1).clamp_min(1)
    return (one_hot.transpose(1, 2) @ points) / counts[:, :, None]


_PAIRWISE_MAX = 4096  # points; the n x n distances then take at most 128 MiB


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
        # Fewer points than dimensions (always so for pooled LoRA units): cluster exact low-dimensional
        # coordinates, then take the centers in the original space.
        if points.shape[0] < points.shape[1]:
            self._fit_gram(points @ points.T)
            self._centers: torch.Tensor | None = None
        else:
            # Seeding needs the distances to each chosen point: all of them at once (n x n) when that is small.
            pairwise = squared_distances(points, points).double() if points.shape[0] <= _PAIRWISE_MAX else None
            self._centers = self._fit_coords(points, pairwise)
        # Centers of clustered coordinates are not centers of the points: computed from the points on first
        # use (the lego merge takes its own means and never asks).
        self._points: torch.Tensor | None = points
        return self

    def fit_gram(self, gram: torch.Tensor) -> KMeans:
        """Cluster n points given only their ``n x n`` Gram matrix (``labels_``, ``inertia_``, ``n_iter_``; no
        ``cluster_centers_``): the same clustering as :meth:`fit` on the points, up to rounding, at a cost that
        does not depend on the points' dimension. A caller holding the points as thin factors forms the Gram
        matrix from them without ever concatenating the points (``methods/lego.py``)."""
        if gram.shape[0] < self.n_clusters:
            raise ValueError(f"{gram.shape[0]} points cannot form {self.n_clusters} clusters")
        self._fit_gram(gram)
        self._centers, self._points = None, None
        return self

    def _fit_gram(self, gram: torch.Tensor) -> None:
        coords = gram_coordinates(gram).to(gram.dtype)
        self._fit_coords(coords, gram_distances(gram).double())

    def _fit_coords(self, coords: torch.Tensor, pairwise: torch.Tensor | None) -> torch.Tensor:
        """Seed and run Lloyd on ``coords``; sets the fitted attributes and returns the best centers (of coords)."""
        generator = torch.Generator().manual_seed(self.seed)
        # Lloyd draws no random numbers: seeding every restart first draws the same numbers as alternating.
        if pairwise is not None:
            seeds = kmeans_plus_plus_restarts(pairwise, self.n_clusters, self.n_init, generator).to(coords.device)
            starts = coords[seeds]
        else:
            seeds = [kmeans_plus_plus(coords, self.n_clusters, generator) for _ in range(self.n_init)]
            starts = torch.stack([coords[s.to(coords.device)] for s in seeds])
        best: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
        for labels, centers, inertia, n_iter in self._lloyd_restarts(coords, starts):
            # Strict '<' keeps the earliest restart on ties: the result depends on the seed only.
            if best is None or inertia < best[0]:
                best = (inertia, labels, centers, n_iter)
        assert best is not None
        self.inertia_, self.labels_, centers, self.n_iter_ = best
        return centers

    @property
    def cluster_centers_(self) -> torch.Tensor:
        if self._centers is None:
            if self._points is None:
                raise ValueError("fit_gram clusters without the points: no cluster centers to report")
            self._centers = cluster_means(self._points, self.labels_, self.n_clusters)[0]
        return self._centers

    def _lloyd_restarts(
        self, points: torch.Tensor, centers: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, float, int]]:
        """Lloyd's iterations from each of the ``R x k x d`` starting centers, all restarts in the same tensor ops
        (R times fewer torch calls: on pools of tens of units the calls, not the arithmetic, cost the time).

        Each restart stops at the first iteration that leaves its labels unchanged; one that has stopped is at
        a fixed point (its centers are the means of its labels, which are again its labels), so iterating it on
        with the others changes nothing. Returns ``(labels, centers, inertia, n_iter)`` per restart.
        """
        restarts = centers.shape[0]
        point_sq = (points * points).sum(1)[None, :, None]
        labels: torch.Tensor | None = None
        n_iter: list[int | None] = [None] * restarts
        for iteration in range(1, self.max_iter + 1):
            cross = points @ centers.transpose(1, 2)
            distances = (point_sq - 2.0 * cross + (centers * centers).sum(2)[:, None, :]).clamp_min_(0.0)
            new_labels = distances.argmin(2)
            counts = torch.nn.functional.one_hot(new_labels, self.n_clusters).sum(1)
            for r in torch.nonzero((counts == 0).any(1)).flatten().tolist():
                new_labels[r] = self._fill_empty(new_labels[r], distances[r])
            if labels is not None:
                unchanged = (new_labels == labels).all(1).tolist()
                for r in range(restarts):
                    if unchanged[r] and n_iter[r] is None:
                        n_iter[r] = iteration
                if all(n is not None for n in n_iter):
                    break
            labels = new_labels
            centers = _batched_means(points, labels, self.n_clusters)
        assert labels is not None
        centers = _batched_means(points, labels, self.n_clusters)
        results = []
        for r in range(restarts):
            inertia = float(((points - centers[r][labels[r]]) ** 2).sum())
            results.append((labels[r], centers[r], inertia, n_iter[r] or self.max_iter))
        return results

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
