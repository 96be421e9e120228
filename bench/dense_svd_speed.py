"""Time the exact truncated SVD of one dense matrix, as ties / dare_* / magnitude_prune (``--space dense``) do it.

``loralego.densesvd.truncate_dense`` (float64 Gram matrix of the smaller side, ``eigh``, exact projection)
against ``torch.linalg.svd(full_matrices=False)`` in float32 on the same random ``d_out x d_in`` matrix (a
pruned sum of updates is full rank, like this one), and the relative Frobenius difference of the two best
rank-k approximations.

Usage: python bench/dense_svd_speed.py [--d-out 11008] [--d-in 4096] [--rank 8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from loralego.densesvd import truncate_dense
from loralego.diagnostics import difference_norm
from loralego.lowrank import frobenius_norm_sq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-out", type=int, default=11008)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} CPUs visible, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"one {args.d_out} x {args.d_in} float32 matrix, rank {args.rank}")
    matrix = torch.randn(args.d_out, args.d_in, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    ours = truncate_dense(matrix, args.rank)
    ours_s = time.perf_counter() - start
    print(f"truncate_dense (float64 Gram + eigh + projection): {ours_s:.2f} s", flush=True)

    start = time.perf_counter()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    svd_s = time.perf_counter() - start
    print(f"torch.linalg.svd(full_matrices=False), float32:  {svd_s:.2f} s")
    print(f"ratio: {svd_s / ours_s:.1f}x")

    k = args.rank
    reference = (vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous())
    difference = difference_norm(ours, reference) / frobenius_norm_sq(reference) ** 0.5
    print(f"relative Frobenius difference of the rank-{k} approximations: {difference:.2e}")


if __name__ == "__main__":
    main()
