"""The core space of one module's LoRA updates (Panariello et al., NeurIPS 2025): exact algebra on small matrices.

For inputs with folded factors ``(A_j, B_j)`` (update ``B_j @ A_j``, ranks ``r_j``, ``N = sum r_j``):

- ``Q_a`` (``d_in x n_a``) is an orthonormal basis of the rows of all A's, ``Q_b`` (``d_out x n_b``) one of the
  columns of all B's (``n_a = min(N, d_in)``, ``n_b = min(N, d_out)``): the singular vectors of the two stacks,
  as the authors use (``get_core_matrices`` in apanariello4/core-space-merging ``task_merger.py``), computed as
  a thin QR of each stack then the SVD of its small triangular factor. Element-wise merges (TIES, DARE) depend
  on the basis; the singular basis does not depend on the order of the inputs (up to signs, which TIES and DARE
  are equivariant to), a plain QR basis would.
- Input j's core is ``C_j = (Q_b^T B_j)(A_j Q_a)``, ``n_b x n_a``. The projection is lossless:
  ``B_j = Q_b Q_b^T B_j`` and ``A_j = A_j Q_a Q_a^T`` because each factor lies in the span of its stack, so
  ``Q_b C_j Q_a^T = B_j A_j`` exactly (to rounding; computed in float64).
- Any merge of the cores maps back exactly as ``Q_b M Q_a^T``; its best rank-k approximation is
  ``Q_b (best rank-k of M) Q_a^T`` (both bases are orthonormal, so the singular values are M's).

Everything here costs ``O((d_in + d_out) N^2 + N^3)``: no ``d_out x d_in`` matrix is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .msu import Factors


@dataclass(frozen=True)
class CoreSpace:
    """Orthonormal bases of one module's inputs and each input's core (all float64).

    Each basis is kept as ``Q @ rotation`` (the stack's QR factor and the singular vectors of its triangular
    factor), so lifting ``k`` core directions to full size costs ``d N k``, not ``d N^2``.
    """

    q_out: torch.Tensor  # d_out x n_b, from the QR of the B stack
    rotation_out: torch.Tensor  # n_b x n_b
    q_in: torch.Tensor  # d_in x n_a, from the QR of the A stack
    rotation_in: torch.Tensor  # n_a x n_a
    cores: list[torch.Tensor]  # C_j, n_b x n_a each

    @property
    def size(self) -> int:
        """The smaller side of the cores (the most any merged core's rank can be)."""
        return min(self.q_out.shape[1], self.q_in.shape[1])

    @property
    def basis_out(self) -> torch.Tensor:
        """``Q_b``, d_out x n_b."""
        return self.q_out @ self.rotation_out

    @property
    def basis_in(self) -> torch.Tensor:
        """``Q_a``, d_in x n_a."""
        return self.q_in @ self.rotation_in

    def lift_out(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Q_b @ vectors`` for core-coordinate columns (``n_b x k``)."""
        return self.q_out @ (self.rotation_out @ vectors)

    def lift_in(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Q_a @ vectors`` for core-coordinate columns (``n_a x k``)."""
        return self.q_in @ (self.rotation_in @ vectors)


@dataclass(frozen=True)
class Truncation:
    """Rank-k factors at scale 1 and the fraction of the merged core's energy they keep."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    kept_energy: float


def core_space(factors: list[Factors]) -> CoreSpace:
    """Bases from QR of the stacked factors, then each input's core.

    With ``B_stack = Q_b' R_b``, ``R_b = U_b S V^T`` and ``Q_b = Q_b' U_b``, input j's ``Q_b^T B_j`` is
    ``U_b^T R_b[:, block j]`` (and likewise on the A side), so the cores cost ``O(N^3)`` after the two QRs.
    """
    a_stack = torch.cat([a for a, _ in factors], dim=0).double()  # N x d_in
    b_stack = torch.cat([b for _, b in factors], dim=1).double()  # d_out x N
    q_in, r_in = torch.linalg.qr(a_stack.T)  # d_in x n_a, n_a x N
    q_out, r_out = torch.linalg.qr(b_stack)  # d_out x n_b, n_b x N
    rotation_in = torch.linalg.svd(r_in, full_matrices=False)[0]  # right singular vectors of the A stack
    rotation_out = torch.linalg.svd(r_out, full_matrices=False)[0]  # left singular vectors of the B stack
    coords_in, coords_out = rotation_in.T @ r_in, rotation_out.T @ r_out  # each factor in core coordinates
    cores, start = [], 0
    for a, _ in factors:
        block = slice(start, start + a.shape[0])
        cores.append(coords_out[:, block] @ coords_in[:, block].T)
        start += a.shape[0]
    return CoreSpace(q_out, rotation_out, q_in, rotation_in, cores)


def to_update(space: CoreSpace, core: torch.Tensor) -> torch.Tensor:
    """The dense update ``Q_b M Q_a^T`` of a core (tests and checks only)."""
    return space.lift_out(core) @ space.basis_in.T


def to_factors(space: CoreSpace, core: torch.Tensor) -> Factors:
    """Exact factors (rank = core size) of a merged core: ``A = Q_a^T``, ``B = Q_b M``, float64."""
    return space.basis_in.T.contiguous(), space.lift_out(core)


def canonical_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Factors:
    """Balanced float32 factors ``A = sqrt(S) Vh``, ``B = U sqrt(S)`` with the sign convention of
    ``lowrank.truncate`` (largest-magnitude entry of each row of A positive), so outputs do not depend on
    LAPACK's sign choice."""
    pivot = vh.abs().argmax(dim=1)
    signs = torch.sign(vh.gather(1, pivot[:, None]).squeeze(1))
    signs[signs == 0] = 1.0
    root = s.clamp_min(0).sqrt() * signs
    return (root[:, None] * vh).float().contiguous(), (u * root[None, :]).float().contiguous()


def pad_rank(factors: Factors, rank: int) -> Factors:
    """Zero components up to ``rank`` when the merged update has fewer (rank-deficient inputs): the planned
    output rank is kept, the update unchanged."""
    lora_a, lora_b = factors
    missing = rank - lora_a.shape[0]
    if missing <= 0:
        return lora_a, lora_b
    return (
        torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])], dim=0),
        torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1),
    )


def energy_fraction(kept: torch.Tensor, total: torch.Tensor) -> float:
    """``sum kept^2 / sum total^2`` (1.0 for a zero matrix)."""
    denominator = float((total.double() ** 2).sum())
    return 1.0 if denominator <= 0.0 else float((kept.double() ** 2).sum()) / denominator


def truncate_core(space: CoreSpace, core: torch.Tensor, rank: int) -> Truncation:
    """Best rank-k approximation (Eckart-Young) of ``Q_b M Q_a^T``, from the SVD of the small core ``M``."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    kept = max(1, min(rank, s.numel()))
    factors = canonical_factors(space.lift_out(u[:, :kept]), s[:kept], space.lift_in(vh[:kept].T).T)
    return Truncation(*pad_rank(factors, rank), energy_fraction(s[:kept], s))


def truncate_orthogonal(
    space: CoreSpace,
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    priority: torch.Tensor,
    rank: int,
) -> Truncation:
    """Rank-k truncation of ``Q_b U diag(s) V^T Q_a^T`` when ``U`` and ``V`` have orthonormal columns.

    Then ``U diag(s) V^T`` is already an SVD, so keeping the k components of largest ``s`` is the best rank-k
    approximation. ``priority`` breaks the ties of flat spectra (Iso-C, Iso-CTS, where every ``s`` is equal and
    any k components are optimal): components are kept by ``(s, priority)`` descending, a deterministic choice
    among equally good truncations.
    """
    # Stable lexicographic order: by priority, then (stably) by s.
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort(s[order], descending=True, stable=True)]
    keep = order[: max(1, min(rank, s.numel()))]
    factors = canonical_factors(space.lift_out(u[:, keep]), s[keep], space.lift_in(v[:, keep]).T)
    return Truncation(*pad_rank(factors, rank), energy_fraction(s[keep], s))


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``U V^T`` of ``matrix = U S V^T`` (the nearest matrix with orthonormal
    columns): the decorrelation step of TSV-Merge and Iso-CTS."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def truncate_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> Truncation:
    """Best rank-k approximation of ``B @ A`` given as thin factors (``A: m x d_in``, ``B: d_out x m``), with the
    kept energy: QR of both sides, SVD of the ``m x m`` core (float64)."""
    q_b, r_b = torch.linalg.qr(lora_b.double())
    q_a, r_a = torch.linalg.qr(lora_a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    kept = max(1, min(rank, s.numel()))
    factors = canonical_factors(q_b @ u[:, :kept], s[:kept], vh[:kept] @ q_a.T)
    return Truncation(*pad_rank(factors, rank), energy_fraction(s[:kept], s))
