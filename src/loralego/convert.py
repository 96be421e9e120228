"""Exact conversions between factor layouts, as small functions over tensors (the readers and writers call them).

- LoCon with a Tucker middle factor: ``up (out x r x 1 x 1) * mid (r x r x kh x kw) * down (r x in x 1 x 1)``
  is the LoRA ``up * down'`` with ``down'[a, i] = sum_b mid[a, b] down[b, i]`` (a ``r x in x kh x kw`` down):
  a 1x1 convolution followed by a kh x kw one is one kh x kw convolution, padding and stride included.
- A fused projection (Flux ``qkv``) split into parts shares its down factor; each part keeps its rows of up.
- Parts fused back: downs stacked, ups block-diagonal; exact at rank ``sum of the parts' ranks``.
- LoHa (``(w1a w1b) * (w2a w2b)``, elementwise) and LoKr (``kron(w1, w2)``) have no low-rank factors of
  their own rank; :func:`truncated_lora` takes the exact SVD of their update and keeps the top k units.
"""

from __future__ import annotations

import torch


def compose_tucker_down(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """``r x in x kh x kw`` down equal to ``mid`` applied after the 1x1 ``down`` (``r x in x 1 x 1``)."""
    return torch.einsum("abhw,bi->aihw", mid.float(), down.float().reshape(down.shape[0], -1))


def fuse_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor] | None], rows: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) whose update stacks the parts' updates row-wise; ``None`` parts (not adapted) are zero
    rows. ``rows``: each part's output rows. Rank = the sum of the present parts' ranks."""
    present = [part for part in parts if part is not None]
    down = torch.cat([a for a, _ in present], dim=0)
    up = down.new_zeros((sum(rows), down.shape[0]), dtype=present[0][1].dtype)
    row = col = 0
    for part, size in zip(parts, rows, strict=True):
        if part is not None:
            rank = part[0].shape[0]
            up[row : row + size, col : col + rank] = part[1]
            col += rank
        row += size
    return down, up


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of up's rows (BFL's shift/scale order vs diffusers' scale/shift)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def loha_update(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """LoHa's ``(w1a @ w1b) * (w2a @ w2b)`` (scale not applied), in float64."""
    return (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())


def lokr_update(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LoKr's ``kron(w1, w2)`` (scale not applied), in float64."""
    return torch.kron(w1.double(), w2.double())


def truncated_lora(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A: k x in, B: out x k, kept energy)``: the best rank-``k`` approximation of a 2-D ``update`` from its
    exact SVD (``k = min(rank, out, in)``), split as ``B = U sqrt(S)``, ``A = sqrt(S) V^T``; the kept energy
    is ``sum of the kept S^2 / sum of all S^2`` (1 for a zero update)."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    total = float((s * s).sum())
    energy = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    return (root[:, None] * vh[:k]).float(), (u[:, :k] * root[None, :]).float(), energy
