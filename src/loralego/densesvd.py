"""Exact truncated SVD of one dense ``d_out x d_in`` matrix, for the methods that are dense by definition
(TIES, DARE and magnitude pruning on full updates). Everything else stays on thin factors (lowrank.py).

Choice: an eigendecomposition of the smaller Gram matrix in float64 (``M M^T`` if ``d_out <= d_in``, else
``M^T M``), its top-k eigenvectors, then the exact projection of ``M`` onto them. Why:

- It is exact: ``U_k U_k^T M`` is the best rank-k approximation of ``M`` (Eckart-Young) once ``U_k`` spans
  the top-k left singular space, and ``torch.linalg.eigh`` computes all eigenpairs (no iteration count
  or tolerance to choose). In float64 the squaring of the condition number costs nothing that matters for
  float32 inputs: singular values down to ~1e-7 of the largest keep float32 accuracy.
- It is faster than ``torch.linalg.svd(full_matrices=False)``: one Gram product and the eigendecomposition
  of a ``min(d_out, d_in)``-square symmetric matrix instead of a bidiagonalisation of the rectangular one;
  1.3-1.4x for an 11008 x 4096 matrix on this project's 2-core machine, while computing in float64
  (docs/performance.md, bench/dense_svd_speed.py).
- The result goes through ``lowrank.truncate`` (thin, cheap), so the factors are balanced and
  sign-canonical exactly like every other truncation in the library.
"""

from __future__ import annotations

import torch

from .lowrank import truncate
from .msu import Factors


def top_singular_factors(matrix: torch.Tensor, rank: int) -> Factors:
    """Thin factors ``(A: k x d_in, B: d_out x k)`` with ``B @ A`` the best rank-k approximation, float64.

    One side is orthonormal (the top-k singular vectors of the smaller side), the other the projection of
    ``matrix`` onto them.
    """
    d_out, d_in = matrix.shape
    rank = max(1, min(rank, d_out, d_in))
    x = matrix.double()
    if d_out <= d_in:
        _, vectors = torch.linalg.eigh(x @ x.T)  # eigenvalues ascending
        left = vectors[:, -rank:].flip(1)
        return left.T @ x, left
    _, vectors = torch.linalg.eigh(x.T @ x)
    right = vectors[:, -rank:].flip(1)
    return right.T, x @ right


def truncate_dense(matrix: torch.Tensor, rank: int) -> Factors:
    """Best rank-k approximation of a dense matrix as balanced float32 factors ``(A, B)``.

    ``rank`` is capped at ``min(d_out, d_in)``; the result is canonical as in :func:`lowrank.truncate`.
    """
    lora_a, lora_b = top_singular_factors(matrix, rank)
    # QR route: these factors can carry directions of zero singular value, whose rounding the Gram route's
    # division by sqrt(lambda) would make depend on the BLAS thread count; the cost here is the dense Gram.
    return truncate(lora_a, lora_b, lora_a.shape[0], gram_route=False)
