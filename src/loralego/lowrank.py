"""Exact algebra on updates given as thin factors, without forming ``d_out x d_in`` matrices.

For ``dW = B @ A`` with rank N, everything here costs ``O((d_in + d_out) N^2)``.
"""

from __future__ import annotations

import torch

from .msu import Factors


def frobenius_inner(x: Factors, y: Factors) -> float:
    """``<B_x A_x, B_y A_y>_F = sum_ij (A_x A_y^T)_ij (B_x^T B_y)_ij``, in float64."""
    (ax, bx), (ay, by) = x, y
    return float(((ax.double() @ ay.double().T) * (bx.double().T @ by.double())).sum())


def frobenius_norm_sq(x: Factors) -> float:
    """``||B A||_F^2`` from the factors."""
    return max(frobenius_inner(x, x), 0.0)


def _qr_core(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_B, Q_A, R_B R_A^T)`` in float64: ``B @ A = Q_B (R_B R_A^T) Q_A^T``, so the small ``N x N`` core has
    the singular values of the update."""
    q_b, r_b = torch.linalg.qr(lora_b.double())  # d_out x N, N x N
    q_a, r_a = torch.linalg.qr(lora_a.double().T)  # d_in x N, N x N
    return q_b, q_a, r_b @ r_a.T


def thin_svd(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``B @ A`` from its factors: returns ``(U, S, Vh)`` with ``B @ A = U diag(S) Vh``.

    QR of the two thin stacks, then an SVD of the small ``N x N`` core. Computed in float64 so that the
    truncation is exact to working precision; results are returned in float32. ``U`` is ``d_out x N``,
    ``Vh`` is ``N x d_in``, singular values descending.
    """
    q_b, q_a, core = _qr_core(lora_a, lora_b)
    u_core, s, vh_core = torch.linalg.svd(core)
    u = q_b @ u_core
    vh = vh_core @ q_a.T
    return u.float(), s.float(), vh.float()


def truncate(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> Factors:
    """Best rank-``rank`` approximation of ``B @ A`` (Eckart-Young), as balanced factors.

    The singular values are split as ``sqrt(S)`` on each side so both factors carry the same energy.
    Signs are made canonical (largest-magnitude entry of each row of A positive) so the output does not
    depend on LAPACK's sign choice.
    """
    u, s, vh = thin_svd(lora_a, lora_b)
    rank = min(rank, s.numel())
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivot = vh.abs().argmax(dim=1)
    signs = torch.sign(vh.gather(1, pivot[:, None]).squeeze(1))
    signs[signs == 0] = 1.0
    root = s.sqrt()
    new_a = (root * signs)[:, None] * vh
    new_b = u * (root * signs)[None, :]
    return new_a.contiguous(), new_b.contiguous()


def rank_for_energy(lora_a: torch.Tensor, lora_b: torch.Tensor, energy: float) -> int:
    """The smallest k whose best rank-k approximation keeps ``energy`` of ``||B A||_F^2`` (at least 1).

    The singular values come from the ``N x N`` core of the two thin QRs, as in ``thin_svd``.
    """
    squared = torch.linalg.svdvals(_qr_core(lora_a, lora_b)[2]) ** 2
    total = float(squared.sum())
    if total <= 0.0:
        return 1
    kept = torch.cumsum(squared, 0) / total
    # A relative slack of 1e-12 keeps energy = 1.0 from asking for ranks that hold only rounding noise.
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1, squared.numel())
