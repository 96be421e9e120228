"""Truncated SVD of one dense ``d_out x d_in`` matrix, for the methods that are dense by definition (TIES, DARE
and magnitude pruning on full updates). Everything else stays on thin factors (lowrank.py).

Both routes start from the float64 Gram matrix ``G`` of the smaller side (``M M^T`` if ``d_out <= d_in``, else
``M^T M``; ``n x n``, ``n = min(d_out, d_in)``) and project ``M`` exactly onto k orthonormal vectors of that side:

- **eigh route** (exact): ``torch.linalg.eigh(G)``, all eigenpairs, its top k. ``U_k U_k^T M`` is the best rank-k
  approximation of ``M`` (Eckart-Young) once ``U_k`` spans the top-k singular space; no iteration count or
  tolerance to choose. In float64 the squared condition number costs nothing that matters for float32 inputs.
  Its cost is the ``O(n^3)`` eigendecomposition, most of it memory-bound (about a minute at ``n = 4096``).
- **certified route** (:func:`certified_top_space`): Chebyshev-filtered block subspace iteration on ``G`` from a
  fixed-seed start, Rayleigh-Ritz, then an a-posteriori certificate that bounds the distance of the result to
  the exact one; when the bound is not below :data:`CERTIFIED_TOLERANCE`, the eigh route runs on the same
  ``G``. Its cost is ``G``, a few dozen ``n^2 p`` products and one Cholesky factorisation (``n^3 / 3``, BLAS-3).

The guarantee (derivation in docs/method.md, "Certified dense truncation"): with ``Q`` the k orthonormal vectors
returned, ``R = G Q - Q Theta`` (``Theta = Q^T G Q``), ``tau`` a number certified by a Cholesky factorisation to
bound every eigenvalue of ``G`` on the orthogonal complement of ``Q``, and ``delta = lambda_min(Theta) - tau -
||R||_F > 0``:

- ``||sin angle(Q, U_k)||_F <= ||R||_F / delta`` (Davis-Kahan), so ``U_k`` is unique and
- ``||Q Q^T M - U_k U_k^T M||_F <= sqrt(2) ||R||_F / delta * ||U_k U_k^T M||_F``: the certified product ``B @ A``
  is within ``bound`` (relative, Frobenius) of the exact best rank-k approximation,
- the residual energy ``||M - Q Q^T M||_F^2`` exceeds the optimum by at most ``k ||R||_2`` (Weyl) and at most
  ``k ||R||^2 / (g/2 + sqrt(g^2/4 + ||R||^2))`` with ``g = lambda_min(Theta) - tau`` (Li and Li, 2005).

Floating-point rounding of every step that feeds the bound (the Gram product, forming the complement, the
Cholesky test, the residual, the loss of orthonormality of ``Q``) is bounded with the standard model and added
to ``tau``, ``||R||`` and ``lambda_min(Theta)`` before the test (:func:`_rounding`), so the statement holds for
the computed numbers, not only in exact arithmetic. The start block comes from a generator seeded with the fixed
:data:`START_SEED`, never the user's seed: the same matrix gives the same bytes, and the result is within the
bound of the eigh route's whatever the start.

The result goes through ``lowrank.truncate`` (thin, cheap), so the factors are balanced and sign-canonical
exactly like every other truncation in the library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .lowrank import truncate
from .msu import Factors

# The certified route is taken when its bound on the relative Frobenius distance of ``B @ A`` to the exact best
# rank-k approximation is at most this; 1e-7 leaves room for the float32 rounding of the factors (about 6e-8
# relative on each route) inside "equals the eigh route to 1e-6".
CERTIFIED_TOLERANCE = 1e-7
# Seed of the start block of the subspace iteration: fixed, so that the output depends on the matrix only.
START_SEED = 20_240_916
# Below this side length, or when the block would be more than a quarter of it, eigh is cheap: take it directly.
_MIN_SIDE = 128
# Gram matrices with a side of at least this are formed by symmetric blocks (``_blocked_gram``).
_BLOCKED_GRAM_MIN = 1024
_GRAM_BLOCK = 1024
_GRAM_CHUNK = 2048
_OVERSAMPLE = 16
# Products with G the iteration may spend before giving up (then eigh runs): a few seconds at n = 4096.
_MAX_PRODUCTS = 160
# The Cholesky test's trial bound for the complement: this fraction of the way from the (k+1)-th Ritz value to
# the k-th. 1/2 keeps half of the observed gap as the certified one (the bound doubles at most) and leaves the
# test room for a not yet converged (k+1)-th direction.
_TRIAL_FRACTION = 0.5

_UNIT = 2.0**-53  # unit roundoff of float64


@dataclass(frozen=True)
class Certificate:
    """What the certified route proved about its result, all relative to the exact best rank-k approximation.

    ``output_bound``: bound on ``||B A - (B A)_exact||_F / ||(B A)_exact||_F``. ``subspace_bound``: bound on
    ``||sin angle||_F`` between the kept and the exact top-k singular subspaces. ``energy_bound``: bound on
    (achieved minus optimal residual energy) / ``||M||_F^2``. ``iterations``: products with ``G``.
    """

    output_bound: float
    subspace_bound: float
    energy_bound: float
    iterations: int


@dataclass(frozen=True)
class DenseTruncation:
    """A dense matrix's top-k factors (float64, one side orthonormal) and how they were found."""

    factors: Factors
    route: Literal["certified", "eigh"]
    certificate: Certificate | None


def _blocked_gram(columns: torch.Tensor) -> torch.Tensor:
    """``columns^T columns`` (``n x n``) from ``_GRAM_BLOCK``-wide column blocks, the upper triangle of blocks
    only (mirrored), each accumulated over ``_GRAM_CHUNK``-row chunks with ``addmm_``.

    Why: the symmetric half is about 5/8 of the flops of one ``n x L x n`` product at ``n = 4096``, and the
    chunked accumulation makes the rounding bound ``gamma_{chunk + chunks}`` instead of ``gamma_L``
    (:func:`gram_side`), whatever order the BLAS sums a chunk in.
    """
    rows, n = columns.shape
    gram = torch.empty(n, n, dtype=columns.dtype)
    for i in range(0, n, _GRAM_BLOCK):
        for j in range(i, n, _GRAM_BLOCK):
            block = columns[:_GRAM_CHUNK, i : i + _GRAM_BLOCK].T @ columns[:_GRAM_CHUNK, j : j + _GRAM_BLOCK]
            for start in range(_GRAM_CHUNK, rows, _GRAM_CHUNK):
                chunk = columns[start : start + _GRAM_CHUNK]
                block.addmm_(chunk[:, i : i + _GRAM_BLOCK].T, chunk[:, j : j + _GRAM_BLOCK])
            gram[i : i + _GRAM_BLOCK, j : j + _GRAM_BLOCK] = block
            if j != i:
                gram[j : j + _GRAM_BLOCK, i : i + _GRAM_BLOCK] = block.T
    return gram


def gram_side(matrix: torch.Tensor) -> tuple[torch.Tensor, bool, float]:
    """``(G, left, error)``: the float64 Gram matrix of the smaller side, whether it is the left (``M M^T``) one,
    and a bound on ``||fl(G) - G||_2``.

    The bound: each entry is a float64 dot product of ``m`` terms (``m`` the long side, or ``chunk + chunks``
    for :func:`_blocked_gram`), so ``|fl(G) - G| <= gamma_m |M|^T |M|`` entrywise (Higham, "Accuracy and
    Stability of Numerical Algorithms", 3.5), whose 2-norm is at most ``|| |M| ||_F^2 = ||M||_F^2 =
    trace(G)``, itself at most ``trace(fl(G)) (1 + gamma_n) / (1 - gamma_m)``.
    """
    x = matrix.double()
    columns = x.T if matrix.shape[0] <= matrix.shape[1] else x  # long side x short side
    rows, n = columns.shape
    if n >= _BLOCKED_GRAM_MIN:
        gram, terms = _blocked_gram(columns), _GRAM_CHUNK + -(-rows // _GRAM_CHUNK)
    else:
        gram, terms = columns.T @ columns, rows
    trace = float(gram.diagonal().sum()) * (1.0 + _gamma(n)) / (1.0 - _gamma(terms))
    return gram, matrix.shape[0] <= matrix.shape[1], _gamma(terms) * trace


def eigh_top_space(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` eigenvectors of a symmetric matrix (``n x rank``, descending), by full ``eigh``."""
    _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
    return vectors[:, -rank:].flip(1)


def _gamma(count: int) -> float:
    """Higham's ``gamma_m = m u / (1 - m u)``: the relative error bound of an ``m``-term float64 dot product."""
    return count * _UNIT / (1.0 - count * _UNIT)


def _rayleigh_ritz(gram: torch.Tensor, basis: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ritz values (descending), Ritz vectors and their images under ``G`` from ``basis`` and ``image = G basis``."""
    small = basis.T @ image
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    return values, basis @ vectors, image @ vectors


def _filter_degree(values: torch.Tensor, rank: int, cut: float) -> int:
    """The Chebyshev degree for the next filter: as high as keeps the k-th Ritz direction within 1e8 of the
    first after the filter (so the QR that follows keeps it to float64 accuracy), between 1 and 16."""
    t_top, t_kth = 2.0 * float(values[0]) / cut - 1.0, 2.0 * float(values[rank - 1]) / cut - 1.0
    spread = math.acosh(max(t_top, 1.0)) - math.acosh(max(t_kth, 1.0))
    return 16 if spread <= 0.0 else max(1, min(16, int(math.log(1e8) / spread)))


def _chebyshev_filter(gram: torch.Tensor, block: torch.Tensor, degree: int, cut: float, top: float) -> torch.Tensor:
    """``p(G) block`` for the degree-``degree`` Chebyshev polynomial that is at most 1 in magnitude on ``[0, cut]``
    (the unwanted part of the spectrum) and grows fastest above it, scaled to 1 at ``top``: the scaled
    three-term recurrence of Zhou and Saad (J. Comput. Phys. 219, 2006, "Chebyshev_filter_scaled"), for the
    upper end of the spectrum. Per product it damps the unwanted directions like ``exp(-acosh(2 lambda / cut -
    1))`` instead of the power iteration's ``cut / lambda``."""
    half = cut / 2.0  # centre and half-width of [0, cut]
    sigma = half / (top - half)
    tau = 2.0 / sigma
    previous, current = block, (gram @ block - half * block) * (sigma / half)
    for _ in range(1, degree):
        sigma_next = 1.0 / (tau - sigma)
        following = (gram @ current - half * current) * (2.0 * sigma_next / half) - (sigma * sigma_next) * previous
        previous, current, sigma = current, following, sigma_next
    return current


def _subspace_iteration(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, float, int]:
    """Chebyshev-filtered block subspace iteration with Rayleigh-Ritz on ``G`` (``n x n``): ``(Q_k, theta_{k+1},
    products)``.

    Each round filters the Ritz vectors with a Chebyshev polynomial damping ``[0, theta_p]`` (``theta_p`` the
    smallest Ritz value of the block), re-orthonormalises (QR) and runs Rayleigh-Ritz. Stops once the estimated
    certificate (from the Ritz values and residuals, :func:`_certify`'s formula without its rounding terms) is
    ten times below the tolerance, or after ``_MAX_PRODUCTS`` products with ``G``. The certificate, not this
    estimate, decides whether the result is used.
    """
    n = gram.shape[0]
    width = min(n, rank + max(rank, _OVERSAMPLE))
    generator = torch.Generator().manual_seed(START_SEED)
    basis = torch.linalg.qr(torch.randn(n, width, generator=generator, dtype=torch.float64)).Q
    image, products = gram @ basis, 1
    while True:
        values, ritz, ritz_image = _rayleigh_ritz(gram, basis, image)
        residual = float((ritz_image[:, :rank] - ritz[:, :rank] * values[:rank]).norm())
        gap = float(values[rank - 1] - values[rank]) * (1.0 - _TRIAL_FRACTION)
        if gap > residual and math.sqrt(2.0) * residual / (gap - residual) <= CERTIFIED_TOLERANCE / 10:
            break
        cut, top = float(values[-1]), float(values[0])
        if products >= _MAX_PRODUCTS or not top > 0.0:
            break
        if cut > 1e-12 * top:
            degree = min(_filter_degree(values, rank, cut), _MAX_PRODUCTS - products)
            filtered = _chebyshev_filter(gram, ritz, degree, cut, top)
        else:  # the block holds all of the spectrum above rounding: a plain product
            degree, filtered = 1, gram @ ritz
        basis = torch.linalg.qr(filtered).Q
        image, products = gram @ basis, products + degree + 1
    return ritz[:, :rank].contiguous(), float(values[rank]), products


def _rounding(n: int, rank: int, gram_error: float, scale: float, orthogonality: float) -> tuple[float, float]:
    """Bounds on the floating-point error of what :func:`_certify` computes: ``(value_error, residual_error)``.

    ``gram_error >= ||fl(G) - G||_2`` (:func:`gram_side`); ``scale >= ||fl(G)||_F``, which bounds
    ``||fl(G)||_2`` and ``|| |fl(G)| ||_2``; ``orthogonality = ||Q^T Q - I||_F`` of the computed ``Q``.

    ``value_error`` bounds (2-norm) the error in an eigenvalue of ``Theta = Q^T G Q`` or of the complement
    ``P G P`` (``P = I - Q Q^T``); ``residual_error`` the error in ``||R||_F``, ``R = G Q - Q Theta``. Each is a
    sum of: the rounding of ``fl(G) Q`` (``gamma_n |G| |Q|``, Frobenius at most ``gamma_n scale sqrt(k)``), of
    ``Q^T Y`` and ``Q Theta`` (``gamma_n``, ``gamma_k`` times ``scale k``), of the subtractions and of the
    symmetric ``k x k`` eigensolver (backward stable: ``10 k^2 u scale``), all inside
    ``gamma_{n + 2k + 4} (2k + 4) scale``; the use of ``fl(G)`` for ``G`` (``gram_error``, times ``sqrt(k)`` in a
    Frobenius norm of ``n x k``); and the replacement of ``Q`` by the exactly orthonormal ``Q (Q^T Q)^-1/2``
    (at most ``drift = eta / (1 - eta)`` away, so ``6 drift (scale + gram_error)`` in any product above).
    """
    drift = orthogonality / max(1.0 - orthogonality, 1e-3)
    norm = scale + gram_error
    steps = (_gamma(n + 2 * rank + 4) * (2 * rank + 4) + 10.0 * rank * rank * _UNIT) * scale + 6.0 * drift * norm
    return gram_error + steps, math.sqrt(rank) * gram_error + steps


def _complement_is_below(gram: torch.Tensor, basis: torch.Tensor, image: torch.Tensor, small: torch.Tensor,
                         trial: float) -> bool:
    """Whether ``trial I - P G P`` (``P = I - Q Q^T``) is positive definite, proved by a float64 Cholesky
    factorisation of it minus Rump's shift (S. M. Rump, "Verification of positive definiteness", BIT 46, 2006:
    if floating-point Cholesky of ``S - c I`` with ``c >= gamma_{n+1} / (1 - 2 gamma_{n+1}) trace(S)`` runs to
    completion, ``S`` is positive definite; twice that shift here, the subtraction's rounding included)."""
    n = gram.shape[0]
    complement = gram - image @ basis.T - basis @ image.T + basis @ small @ basis.T
    test = -((complement + complement.T) / 2)
    trace = float(test.diagonal().sum()) + n * trial
    shift = 2.0 * _gamma(n + 2) / (1.0 - 2.0 * _gamma(n + 2)) * abs(trace) + 1e-300
    test.diagonal().add_(trial - shift)
    return int(torch.linalg.cholesky_ex(test).info) == 0


def _certify(gram: torch.Tensor, basis: torch.Tensor, next_value: float, gram_error: float,
             iterations: int) -> Certificate | None:
    """The certificate of ``basis`` (``n x k``) as the top-k eigenspace of ``G``, or None when it cannot be
    given below :data:`CERTIFIED_TOLERANCE` (see the module docstring for the statement). ``gram_error``
    bounds ``||fl(G) - G||_2`` for the ``gram`` given."""
    n, rank = basis.shape
    # <= trace(G) = ||M||_F^2: the denominator of the energy bound
    energy = float(gram.diagonal().sum()) * (1.0 - _gamma(n)) - n * gram_error
    scale = float(gram.norm()) * (1.0 + _gamma(n * n))
    image = gram @ basis
    small = basis.T @ image
    small = (small + small.T) / 2
    residual = float((image - basis @ small).norm()) * (1.0 + _gamma(n * rank))
    orthogonality = float((basis.T @ basis - torch.eye(rank, dtype=basis.dtype)).norm()) * (1.0 + _gamma(rank**2))
    value_error, residual_error = _rounding(n, rank, gram_error, scale, orthogonality)
    lowest = float(torch.linalg.eigvalsh(small)[0]) - value_error  # <= lambda_min(Theta) of the exact problem
    trial = next_value + _TRIAL_FRACTION * (lowest - next_value)
    if not (energy > 0.0 and lowest > 0.0 and trial < lowest):
        return None
    if not _complement_is_below(gram, basis, image, small, trial):
        return None
    ceiling = trial + value_error  # every eigenvalue of G on the complement of Q is below this
    residual += residual_error
    separation = lowest - ceiling
    delta = separation - residual
    if delta <= 0.0:
        return None
    subspace = residual / delta
    output = math.sqrt(2.0) * subspace + 3.0 * math.sqrt(rank) * orthogonality
    energy_excess = rank * min(residual, residual**2 / (separation / 2 + math.sqrt(separation**2 / 4 + residual**2)))
    if output > CERTIFIED_TOLERANCE:
        return None
    return Certificate(output, subspace, energy_excess / energy, iterations)


def certified_top_space(gram: torch.Tensor, rank: int, gram_error: float) -> tuple[torch.Tensor, Certificate] | None:
    """Top-``rank`` eigenvectors of the Gram matrix ``G`` (``n x n``, float64, computed with
    ``||fl(G) - G||_2 <= gram_error``) by subspace iteration, with their certificate; None when it fails (or
    when the matrix is too small for the iteration to pay), then the caller takes :func:`eigh_top_space`."""
    n = gram.shape[0]
    width = rank + max(rank, _OVERSAMPLE)
    if n < _MIN_SIDE or 4 * width > n:
        return None
    # A BLAS product need not give an exactly symmetric C for C = X^T X (its summation order may differ between
    # C_ij and C_ji); the average of the two is within the same rounding bound, and the analysis needs symmetry.
    gram = (gram + gram.T) / 2
    basis, next_value, iterations = _subspace_iteration(gram, rank)
    certificate = _certify(gram, basis, next_value, gram_error, iterations)
    return None if certificate is None else (basis, certificate)


def dense_top_factors(matrix: torch.Tensor, rank: int, *, certified: bool = True) -> DenseTruncation:
    """Thin float64 factors ``(A: k x d_in, B: d_out x k)`` whose product is the best rank-k approximation of
    ``matrix``: exactly (eigh route), or within the certificate's bound of it (certified route).

    One side is orthonormal (top-k singular vectors of the smaller side), the other the projection of
    ``matrix`` onto them. ``certified=False`` always takes the eigh route.
    """
    d_out, d_in = matrix.shape
    rank = max(1, min(rank, d_out, d_in))
    gram, left, gram_error = gram_side(matrix)
    found = certified_top_space(gram, rank, gram_error) if certified else None
    if found is None:
        space, route, certificate = eigh_top_space(gram, rank), "eigh", None
    else:
        (space, certificate), route = found, "certified"
    x = matrix.double()
    factors = (space.T @ x, space) if left else (space.T, x @ space)
    return DenseTruncation(factors, route, certificate)


def top_singular_factors(matrix: torch.Tensor, rank: int) -> Factors:
    """Thin factors ``(A: k x d_in, B: d_out x k)`` with ``B @ A`` the exact best rank-k approximation, float64
    (the eigh route)."""
    return dense_top_factors(matrix, rank, certified=False).factors


def truncate_dense_certified(matrix: torch.Tensor, rank: int) -> tuple[Factors, DenseTruncation]:
    """Best rank-k approximation of a dense matrix as balanced float32 factors ``(A, B)``, by the certified
    route with the eigh fallback, and the route's record (its factors are the unbalanced float64 ones)."""
    found = dense_top_factors(matrix, rank)
    lora_a, lora_b = found.factors
    # QR route: these factors can carry directions of zero singular value, whose rounding the Gram route's
    # division by sqrt(lambda) would make depend on the BLAS thread count; the cost here is the dense Gram.
    lora_a, lora_b = drop_unresolved(*truncate(lora_a, lora_b, lora_a.shape[0], gram_route=False))
    return keep_zero_lines(matrix, lora_a, lora_b), found


def keep_zero_lines(matrix: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Factors:
    """The factors with exact (+0.0) zeros where ``matrix`` has an all-zero column (in A) or row (in B).

    Exact: the best rank-k approximation's rows lie in the row space of ``matrix`` and its columns in the
    column space, so those entries are 0; computed, they are rounding noise (about 1e-17) whose value depends on
    the CPU's BLAS kernels. Sparse merges (TIES, DARE, pruning) leave such lines often.
    """
    zero_columns = ~matrix.any(dim=0)
    zero_rows = ~matrix.any(dim=1)
    if bool(zero_columns.any()):
        lora_a = lora_a.masked_fill(zero_columns[None, :], 0.0)
    if bool(zero_rows.any()):
        lora_b = lora_b.masked_fill(zero_rows[:, None], 0.0)
    return lora_a, lora_b


def drop_unresolved(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Factors:
    """Balanced factors with the ranks whose singular value is below float32 resolution of the largest set to 0.

    Why: where the matrix has rank below k, the remaining eigenvectors of its Gram matrix are any orthonormal
    vectors of the null space, chosen by rounding, so their tiny components (about 1e-16 of the top one)
    differ from one CPU's LAPACK kernels to another's. Below ``2^-24 sigma_1`` a component is under the float32
    rounding of the top one, so the output is the same best rank-k approximation to float32 precision, and
    the same bytes everywhere. With balanced factors ``||a_i||^2`` is the i-th singular value.
    """
    values = lora_a.double().pow(2).sum(dim=1)
    if values.numel() == 0:
        return lora_a, lora_b
    unresolved = values <= values.max() * 2.0**-24
    if not bool(unresolved.any()):
        return lora_a, lora_b
    keep = (~unresolved).to(lora_a.dtype)
    return (lora_a * keep[:, None]).contiguous(), (lora_b * keep[None, :]).contiguous()


def truncate_dense(matrix: torch.Tensor, rank: int) -> Factors:
    """Best rank-k approximation of a dense matrix as balanced float32 factors ``(A, B)`` (certified route,
    eigh fallback). ``rank`` is capped at ``min(d_out, d_in)``; the result is canonical as in
    :func:`lowrank.truncate`."""
    return truncate_dense_certified(matrix, rank)[0]
