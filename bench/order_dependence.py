"""How much do seeded merges depend on the order of their inputs? Same adapters, same seed, permuted order.

For each method, the merged update of every module (B @ A at scale 1) is compared between the given order and
permutations of it: the relative Frobenius difference ||dW_perm - dW|| / ||dW||, and each order's relative
error against the exact weighted sum (which does not depend on the order). Prints the figures; nothing is
written. ``python bench/order_dependence.py [--inputs DIR ...] [--perms 3] [--rank 8]``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

import loralego

DEFAULT = sorted(p for p in (Path(__file__).parent / "quality" / "adapters" / "uniform").iterdir() if p.is_dir())


def dense(adapter: loralego.Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for module in adapter.modules:
        lora_a, lora_b = adapter.folded(module)
        out[module] = lora_b @ lora_a
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", nargs="+", type=Path, default=DEFAULT)
    parser.add_argument("--perms", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["lego", "lego+", "dare_linear", "dare_ties"])
    args = parser.parse_args()
    adapters = [loralego.load(p) for p in args.inputs]
    exact = dense(loralego.merge(adapters, method="cat"))
    rng = random.Random(0)
    print(f"{len(adapters)} inputs, {len(exact)} modules, rank {args.rank}, seed 0, {args.perms} permutations")
    header = f"{'method':<12} {'max rel.diff':>12} {'mean rel.diff':>13} {'rel.err given':>13}"
    print(f"{header} {'rel.err perm (range)':>22}")
    for method in args.methods:
        base = dense(loralego.merge(adapters, method=method, rank=args.rank, seed=0))
        diffs, errs = [], []
        err0 = _rel_err(base, exact, method, len(adapters))
        for _ in range(args.perms):
            order = list(range(len(adapters)))
            rng.shuffle(order)
            merged = dense(loralego.merge([adapters[i] for i in order], method=method, rank=args.rank, seed=0))
            diffs += [float((merged[m] - base[m]).norm() / base[m].norm()) for m in base]
            errs.append(_rel_err(merged, exact, method, len(adapters)))
        print(
            f"{method:<12} {max(diffs):>12.4f} {sum(diffs) / len(diffs):>13.4f} {err0:>13.4f} "
            f"{min(errs):>10.4f} - {max(errs):.4f}"
        )
    return 0


def _rel_err(merged: dict, exact: dict, method: str, n: int) -> float:
    scale = 1.0 / n if method == "lego+" else 1.0  # lego+ averages (weights 1/n) by default
    num = sum(float((merged[m] - scale * exact[m]).norm() ** 2) for m in exact)
    den = sum(float((scale * exact[m]).norm() ** 2) for m in exact)
    return (num / den) ** 0.5


if __name__ == "__main__":
    sys.exit(main())
