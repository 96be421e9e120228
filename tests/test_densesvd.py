"""The certified dense truncation (densesvd): equal to the exact eigh route within its bound, honest fallback,
deterministic; and the exact threshold selection of the TIES trim (taskmath)."""

from __future__ import annotations

import math

import pytest
import torch

from loralego import densesvd, taskmath
from loralego.densesvd import CERTIFIED_TOLERANCE, dense_top_factors, truncate_dense, truncate_dense_certified


def _low_rank_updates(d_out: int, d_in: int, n: int, rank: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """``n`` random rank-``rank`` updates scaled ``alpha / rank`` (alpha != r), as a LoRA's ``B @ A``."""
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(n):
        lora_a = torch.randn(rank, d_in, generator=generator) / d_in**0.5
        lora_b = torch.randn(d_out, rank, generator=generator)
        updates.append((alpha / rank) * lora_b @ lora_a)
    return updates


def _product(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return factors[1].double() @ factors[0].double()


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def _exact_best(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


REALISTIC = [
    pytest.param((512, 384), "ties", 8, id="ties-512x384-k8"),
    pytest.param((384, 512), "ties", 16, id="ties-384x512-k16"),
    pytest.param((512, 384), "magnitude_prune", 8, id="magnitude_prune-512x384-k8"),
    pytest.param((512, 384), "dare_ties", 16, id="dare_ties-512x384-k16"),
]


def _merged(shape: tuple[int, int], method: str, seed: int = 0) -> torch.Tensor:
    """A dense merge of four random rank-8 updates (alpha 16): the decaying spectra the dense methods meet."""
    updates = _low_rank_updates(*shape, n=4, rank=8, alpha=16.0, seed=seed)
    if method == "ties":
        return taskmath.ties(updates, 0.2)
    if method == "magnitude_prune":
        return taskmath.magnitude_prune(updates, 0.3)
    return taskmath.dare_ties(updates, 0.5, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize(("shape", "method", "rank"), REALISTIC)
def test_certified_truncation_matches_eigh(shape, method, rank):
    matrix = _merged(shape, method)
    found = dense_top_factors(matrix, rank)
    exact = dense_top_factors(matrix, rank, certified=False)
    assert found.route == "certified" and exact.route == "eigh"
    assert found.certificate is not None and found.certificate.output_bound <= CERTIFIED_TOLERANCE
    certified, reference = _product(found.factors), _product(exact.factors)
    difference = _relative(certified, reference)
    # the bound is proved against the exact optimum, and the eigh route is that optimum to rounding
    assert difference <= found.certificate.output_bound + 1e-10
    assert _relative(certified, _exact_best(matrix, rank)) <= found.certificate.output_bound + 1e-10
    # the public truncation (balanced float32 factors) equals the eigh route's to 1e-6
    (lora_a, lora_b), _ = truncate_dense_certified(matrix, rank)
    assert _relative(_product((lora_a, lora_b)), reference) <= 1e-6
    # the energy bound: achieved residual energy minus the optimum, relative to ||M||_F^2
    total = float(matrix.double().norm() ** 2)
    excess = (float((matrix.double() - certified).norm() ** 2) - float((matrix.double() - reference).norm() ** 2))
    assert excess / total <= found.certificate.energy_bound + 1e-12
    assert 0.0 <= found.certificate.subspace_bound <= found.certificate.output_bound


def _with_spectrum(values: torch.Tensor, shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], values.numel(), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], values.numel(), generator=generator, dtype=torch.float64)).Q
    return (u * values.double()) @ v.T


def test_flat_spectrum_falls_back_to_the_exact_route():
    """Singular values 1 - 1e-9 i: the gap at k is below what float64 can certify, so eigh must run, and its
    result is the exact optimum (residual energy equal to the sum of the dropped squared singular values)."""
    values = 1.0 - 1e-9 * torch.arange(384, dtype=torch.float64)
    matrix = _with_spectrum(values, (512, 384), seed=3)
    found = dense_top_factors(matrix, 8)
    assert found.route == "eigh" and found.certificate is None
    exact = dense_top_factors(matrix, 8, certified=False)
    assert torch.equal(found.factors[0], exact.factors[0]) and torch.equal(found.factors[1], exact.factors[1])
    residual = float((matrix - _product(found.factors)).norm() ** 2)
    assert math.isclose(residual, float((values[8:] ** 2).sum()), rel_tol=1e-10)


def test_gaussian_matrix_either_route_equals_eigh():
    """A Gaussian matrix's top singular values are separated enough to be certified; whichever route runs,
    the result is the eigh route's to the stated bound."""
    matrix = torch.randn(512, 384, generator=torch.Generator().manual_seed(3))
    found = dense_top_factors(matrix, 8)
    exact = dense_top_factors(matrix, 8, certified=False)
    bound = found.certificate.output_bound if found.certificate else 0.0
    assert _relative(_product(found.factors), _product(exact.factors)) <= bound + 1e-10


def test_repeated_singular_value_at_k_falls_back():
    """sigma_k = sigma_{k+1}: the best rank-k approximation is not unique, nothing can be certified."""
    values = torch.cat([torch.linspace(10.0, 5.0, 7), torch.full((2,), 3.0), torch.linspace(1.0, 0.1, 31)])
    matrix = _with_spectrum(values, (400, 300), seed=4).float()
    assert dense_top_factors(matrix, 8).route == "eigh"
    assert dense_top_factors(matrix, 9).route == "certified"


def test_certified_route_is_deterministic():
    matrix = _merged((512, 384), "ties", seed=5)
    first, second = truncate_dense(matrix, 8), truncate_dense(matrix.clone(), 8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_small_matrices_take_the_eigh_route():
    matrix = _merged((64, 32), "ties")
    assert dense_top_factors(matrix, 8).route == "eigh"


def test_zero_matrix_is_not_certified():
    found = dense_top_factors(torch.zeros(512, 384), 8)
    assert found.route == "eigh"
    assert float(_product(found.factors).abs().max()) == 0.0


def test_certificate_rounding_terms_cover_the_gram_error():
    value_error, residual_error = densesvd._rounding(4096, 16, 1e-9, 1.0, 1e-15)
    assert value_error > 1e-9 and residual_error > 4 * 1e-9  # sqrt(k) times the Gram error in a Frobenius norm
    assert value_error < 1e-8 and residual_error < 1e-8  # and the other rounding terms stay near float64's


def test_an_invariant_subspace_that_misses_the_top_direction_is_refused():
    """A basis of eigenvectors 2..k+1 has a zero residual; only the complement test can see the missing
    largest eigenvalue, and it must refuse."""
    values = torch.cat([torch.tensor([50.0]), torch.linspace(10.0, 1.0, 20), torch.full((279,), 0.1)])
    generator = torch.Generator().manual_seed(9)
    q = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64)).Q
    gram = (q * values.double()) @ q.T
    gram = (gram + gram.T) / 2
    wrong, right = q[:, 1:9].contiguous(), q[:, :8].contiguous()
    assert densesvd._certify(gram, wrong, float(values[9]), 0.0, 1) is None  # a plausible (k+1)-th value
    assert densesvd._certify(gram, right, float(values[8]), 0.0, 1) is not None


def test_rump_cholesky_test_separates():
    """The positive-definiteness test proves ``trial >= lambda_1`` on the complement, and refuses below it."""
    generator = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([9.0, 8.0]), torch.linspace(2.0, 0.0, 198, dtype=torch.float64)])
    gram = (q * values) @ q.T
    basis = q[:, :2].contiguous()
    image = gram @ basis
    small = basis.T @ image
    assert densesvd._complement_is_below(gram, basis, image, small, 2.0 + 1e-9)
    assert not densesvd._complement_is_below(gram, basis, image, small, 2.0 - 1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.01])
def test_threshold_trim_equals_topk(density):
    tensor = torch.randn(300, 500, generator=torch.Generator().manual_seed(7))
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = True
    expected = torch.where(keep, flat, torch.zeros_like(flat)).reshape(tensor.shape)
    assert torch.equal(taskmath.trim_by_magnitude(tensor, density), expected)


def test_threshold_trim_with_ties_and_zeros():
    generator = torch.Generator().manual_seed(8)
    tied = torch.randint(-3, 4, (400, 400), generator=generator).float()  # few values: ties at the threshold
    count = int(0.2 * tied.numel())
    trimmed = taskmath.trim_by_magnitude(tied, 0.2)
    assert int((trimmed != 0).sum()) == count
    assert torch.equal(trimmed[trimmed != 0], tied[trimmed != 0])
    flat_kept = (trimmed.reshape(-1) != 0).nonzero().squeeze(1)
    flat_tied = (tied.reshape(-1).abs() == 3).nonzero().squeeze(1)
    assert torch.equal(flat_kept, flat_tied[:count])  # all |x| = 3 are tied: the first ones by position
    sparse = torch.zeros(400, 400)
    sparse[::7, ::3] = torch.randn(sparse[::7, ::3].shape, generator=generator)
    kept = taskmath.trim_by_magnitude(sparse, 0.5)  # fewer nonzeros than the count: all of them kept
    assert torch.equal(kept, sparse)


def test_small_tensors_keep_topk_selection():
    tensor = torch.randint(-2, 3, (50, 60), generator=torch.Generator().manual_seed(10)).float()
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k=int(0.3 * flat.numel())).indices] = True
    assert torch.equal(taskmath.trim_by_magnitude(tensor, 0.3), torch.where(keep, flat, 0.0).reshape(50, 60))


def test_zero_lines_of_the_matrix_are_exact_zeros_in_the_factors():
    """A sparse merge leaves all-zero rows and columns; the truncation must give +0.0 there, not rounding noise."""
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(40, 6, generator=generator) @ torch.randn(6, 70, generator=generator)
    matrix[[3, 17], :] = 0.0
    matrix[:, [0, 9, 44]] = 0.0
    lora_a, lora_b = truncate_dense(matrix, 4)
    assert torch.equal(lora_a[:, [0, 9, 44]].view(torch.int32), torch.zeros(4, 3, dtype=torch.int32))  # +0.0 bytes
    assert torch.equal(lora_b[[3, 17], :].view(torch.int32), torch.zeros(2, 4, dtype=torch.int32))
    exact_a, exact_b = densesvd.top_singular_factors(matrix, 4)
    assert (lora_b @ lora_a - (exact_b @ exact_a).float()).norm() <= 1e-5 * matrix.norm()


def test_ranks_beyond_the_matrix_rank_are_zero():
    """k above the matrix's rank: the extra eigenvectors are arbitrary null-space vectors; their ranks are 0."""
    generator = torch.Generator().manual_seed(6)
    matrix = torch.randn(30, 2, generator=generator) @ torch.randn(2, 50, generator=generator)
    lora_a, lora_b = truncate_dense(matrix, 5)
    assert torch.count_nonzero(lora_a[2:]) == 0 and torch.count_nonzero(lora_b[:, 2:]) == 0
    assert (lora_b @ lora_a - matrix).norm() <= 1e-5 * matrix.norm()
