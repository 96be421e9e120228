"""Dense TIES (``--space dense``) of one Llama-7B-sized module, before and after issue 14's fast path.

Eight random rank-8 updates (``lora_alpha = 16``, factors as bench/speed.py draws them), one module shape.

- before: TIES with ``torch.topk`` for the trim (the threshold selection switched off), then the exact eigh
  route of ``densesvd`` (float64 Gram, ``eigh``, projection), as every release before this one did it. The eigh
  route's cost does not depend on k, so it runs once per shape and gives the top 8 and 16 from the same
  eigenvectors (each k's time is that one measurement).
- after: TIES with the exact threshold selection, then the certified route (subspace iteration, certificate,
  eigh fallback if it fails), per k.

Printed: the seconds of each step, the route and certificate, and the relative Frobenius difference of the
two rank-k products (balanced float32 factors, as written). The TIES matrices of both are compared bytewise.

Usage: python bench/dense_ties_speed.py [--shapes 4096x4096 11008x4096] [--ranks 8 16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from loralego import taskmath
from loralego.densesvd import eigh_top_space, truncate_dense_certified
from loralego.lowrank import truncate


def _updates(d_out: int, d_in: int, n: int = 8, rank: int = 8, alpha: float = 16.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lora_a = torch.randn(rank, d_in, generator=generator) / d_in**0.5
        lora_b = torch.randn(d_out, rank, generator=generator)
        out.append((alpha / rank) * lora_b @ lora_a)
    return out


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _ties_topk(updates: list[torch.Tensor]) -> torch.Tensor:
    """TIES exactly as before: the trim by ``torch.topk`` over all entries."""
    saved = taskmath._SELECT_MIN_ENTRIES
    taskmath._SELECT_MIN_ENTRIES = 1 << 62  # never take the threshold selection
    try:
        return taskmath.ties(updates, 0.2)
    finally:
        taskmath._SELECT_MIN_ENTRIES = saved


def _eigh_route(matrix: torch.Tensor, ranks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The eigh route exactly as before (one float64 Gram product, ``eigh``, projection), balanced float32
    factors for every k from one eigendecomposition."""
    x = matrix.double()
    left = matrix.shape[0] <= matrix.shape[1]
    top = eigh_top_space(x @ x.T if left else x.T @ x, max(ranks))
    out = {}
    for k in ranks:
        space = top[:, :k]
        lora_a, lora_b = (space.T @ x, space) if left else (space.T, x @ space)
        out[k] = truncate(lora_a, lora_b, k, gram_route=False)
    return out


def _relative(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> float:
    px, py = x[1].double() @ x[0].double(), y[1].double() @ y[0].double()
    return float((px - py).norm() / py.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} CPUs visible, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    for shape in args.shapes:
        d_out, d_in = (int(side) for side in shape.split("x"))
        updates = _updates(d_out, d_in)
        print(f"\n{d_out} x {d_in}: 8 rank-8 updates (alpha 16), TIES density 0.2", flush=True)
        before_ties, ties_old_s = _timed(_ties_topk, updates)
        print(f"  before: ties (topk trim) {ties_old_s:.2f} s", flush=True)
        before, eigh_s = _timed(_eigh_route, before_ties, args.ranks)
        print(f"  before: ties (topk trim) {ties_old_s:.2f} s, eigh route {eigh_s:.2f} s "
              f"(all k), total {ties_old_s + eigh_s:.2f} s", flush=True)
        after_ties, ties_new_s = _timed(taskmath.ties, updates, 0.2)
        print(f"  after:  ties (threshold trim) {ties_new_s:.2f} s, TIES matrix bytewise equal to before: "
              f"{torch.equal(after_ties, before_ties)}", flush=True)
        del before_ties
        for k in args.ranks:
            (factors, found), svd_s = _timed(truncate_dense_certified, after_ties, k)
            certificate = found.certificate
            proof = (f"bound {certificate.output_bound:.1e}, energy bound {certificate.energy_bound:.1e}, "
                     f"{certificate.iterations} products" if certificate else "no certificate")
            after_s = ties_new_s + svd_s
            print(f"  k={k:2d}: after route {found.route} ({proof}) {svd_s:.2f} s, total {after_s:.2f} s; "
                  f"before/after {(ties_old_s + eigh_s) / after_s:.1f}x; "
                  f"relative difference of B@A {_relative(factors, before[k]):.2e}", flush=True)
        print(f"  uptime: {os.popen('uptime').read().strip()}", flush=True)


if __name__ == "__main__":
    main()
