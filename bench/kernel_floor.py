"""The compute floor of a merge: its dominant kernels timed alone, on one thread, summed over every module.

For n adapters of rank r (pool N = n r units per module) and each module shape, times:

- ``gram32``: the float32 factor Gram matrices ``A A^T`` and ``B^T B`` (N x N each) that lego's and lego+'s
  k-means start from (every distance after them is N-dimensional);
- ``svd``: the float64 Gram route of the thin SVD (two Gram matrices, two ``eigh``, the N x N core's SVD, the
  k kept columns lifted);
- ``cat``: concatenating the n inputs' factors along the rank axis and casting to bf16 (what cat computes).

Times are the CPU seconds of the one thread that runs them (best of ``--repeats``). Each is summed over the
modules (all layers) and divided by the number of worker threads, which is what the merge could at best do with
them; the merge's own figures come from bench/speed.py.

    python bench/kernel_floor.py --n 100 --rank 8 --workers 2
    python bench/kernel_floor.py --shape small --n 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed

from loralego.lowrank import thin_svd


def best_of(function, repeats: int) -> float:
    """The least CPU time of the calling thread over ``repeats`` calls (one intra-op thread: all the work is on
    this thread; CPU, not wall, so that waiting for a core on a loaded machine is not counted)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        function()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(speed.SHAPE_SETS), default="llama7b")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kernels", nargs="+", default=["gram32", "svd", "cat"])
    opts = parser.parse_args()
    torch.set_num_threads(1)
    layers, shapes = speed.SHAPE_SETS[opts.shape]
    print(
        f"shape {opts.shape}: {layers} layers x {len(shapes)} modules; one thread per kernel, "
        f"totals / {opts.workers} workers; load {os.getloadavg()[0]:.1f}"
    )
    for n in opts.n:
        pool = n * opts.rank
        totals = dict.fromkeys(opts.kernels, 0.0)
        by_shape = {}
        for d_in, d_out in sorted(set(shapes.values())):
            count = layers * sum(1 for shape in shapes.values() if shape == (d_in, d_out))
            generator = torch.Generator().manual_seed(0)
            lora_a = torch.randn(pool, d_in, generator=generator)
            lora_b = torch.randn(d_out, pool, generator=generator)
            kernels = {
                "gram32": lambda a=lora_a, b=lora_b: (a @ a.T, b.T @ b),
                "svd": lambda a=lora_a, b=lora_b: thin_svd(a, b, opts.k),
                "cat": lambda a=lora_a, b=lora_b: (
                    torch.cat(a.split(opts.rank, 0), 0).bfloat16(),
                    torch.cat(b.split(opts.rank, 1), 1).bfloat16(),
                ),
            }
            for name in opts.kernels:
                seconds = best_of(kernels[name], opts.repeats)
                by_shape[(name, d_in, d_out)] = seconds
                totals[name] += count * seconds
        for (name, d_in, d_out), seconds in by_shape.items():
            print(f"  n={n:<4} N={pool:<5} {name:<7} {d_out}x{d_in}: {seconds * 1e3:9.2f} ms per module")
        for name, total in totals.items():
            print(
                f"n={n:<4} {name:<7} all modules {total:8.2f} s on one thread, {total / opts.workers:8.2f} s "
                f"on {opts.workers}"
            )


if __name__ == "__main__":
    main()
