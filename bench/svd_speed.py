"""Time loralego's ``svd`` merge against PEFT's ``svd`` combination on one Llama-7B-shaped module.

Both get the same n random rank-r adapters (``lora_alpha = 2r``) of one ``d_out x d_in`` linear layer (default
11008 x 4096, Llama-7B's up/gate projection) and compute the best rank-r approximation of their sum:

- loralego: ``plan_merge`` + ``merge_module`` (the library's path for one module): QR of the stacked thin
  factors and an SVD of an ``nr x nr`` core; no ``d_out x d_in`` matrix.
- PEFT: ``add_weighted_adapter(..., combination_type="svd", svd_rank=r)`` on a one-layer model wrapped by
  ``get_peft_model`` with the n adapters loaded; it forms the dense sum and takes ``torch.linalg.svd`` of it
  (``full_matrices=True`` by default). Only that call is timed.

The results are compared cheaply, from the factors: the relative Frobenius difference of the two updates and
each one's relative error against the exact sum (``loralego.diagnostics``).

Usage: python bench/svd_speed.py [--d-out 11008] [--d-in 4096] [--adapters 8] [--rank 8] [--repeats 5]
       [--peft-repeats 1] [--peft-reduced] [--skip-peft] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
from torch import nn

import loralego
from loralego.adapters import Adapter, ModuleInfo
from loralego.diagnostics import check_module, difference_norm
from loralego.lowrank import frobenius_norm_sq
from loralego.msu import concat
from loralego.options import make_options
from loralego.pipeline import merge_module, plan_merge

MODULE = "up_proj"


def random_factors(n: int, rank: int, d_out: int, d_in: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in), torch.randn(d_out, rank, generator=generator))
        for _ in range(n)
    ]


def as_adapter(index: int, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float) -> Adapter:
    rank = lora_a.shape[0]
    info = ModuleInfo(MODULE, rank=rank, alpha=alpha, a_shape=tuple(lora_a.shape), b_shape=tuple(lora_b.shape))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [MODULE]}
    return Adapter(f"a{index}", {MODULE: info}, lambda module: (lora_a, lora_b), torch.float32, config=config)


def time_loralego(adapters: list[Adapter], rank: int, repeats: int) -> tuple[list[float], float, object]:
    plan = plan_merge(adapters, make_options(method="svd", rank=rank, device="cpu"))
    start = time.perf_counter()
    result = merge_module(plan, MODULE)  # first call: includes one-off LAPACK start-up
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = merge_module(plan, MODULE)
        times.append(time.perf_counter() - start)
    return times, first, result


class OneLayer(nn.Module):
    def __init__(self, d_out: int, d_in: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(x)


def time_peft(factors, rank: int, alpha: float, repeats: int, full_matrices: bool):
    from peft import LoraConfig, get_peft_model

    d_out, d_in = factors[0][1].shape[0], factors[0][0].shape[1]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[MODULE], lora_dropout=0.0)
    model = get_peft_model(OneLayer(d_out, d_in), config, adapter_name="in0")
    for j in range(1, len(factors)):
        model.add_adapter(f"in{j}", config)
    layer = model.base_model.model.up_proj
    with torch.no_grad():
        for j, (lora_a, lora_b) in enumerate(factors):
            layer.lora_A[f"in{j}"].weight.copy_(lora_a)
            layer.lora_B[f"in{j}"].weight.copy_(lora_b)
    names = [f"in{j}" for j in range(len(factors))]
    times, merged = [], None
    for i in range(repeats):
        start = time.perf_counter()
        model.add_weighted_adapter(
            names,
            [1.0] * len(names),
            f"merged{i}",
            combination_type="svd",
            svd_rank=rank,
            svd_full_matrices=full_matrices,
        )
        times.append(time.perf_counter() - start)
        scale = layer.scaling[f"merged{i}"]
        merged = (layer.lora_A[f"merged{i}"].weight.detach() * scale, layer.lora_B[f"merged{i}"].weight.detach())
    return times, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-out", type=int, default=11008)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed loralego runs (after one warm-up)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="timed PEFT runs")
    parser.add_argument("--peft-reduced", action="store_true", help="PEFT with svd_full_matrices=False")
    parser.add_argument("--skip-peft", action="store_true", help="time loralego only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), peft {peft.__version__}, loralego {loralego.__version__}"
    )
    print(
        f"one {args.d_out} x {args.d_in} module, {args.adapters} adapters of rank {args.rank} "
        f"(alpha {2 * args.rank}), output rank {args.rank}"
    )
    alpha = 2.0 * args.rank
    factors = random_factors(args.adapters, args.rank, args.d_out, args.d_in)
    adapters = [as_adapter(j, a, b, alpha) for j, (a, b) in enumerate(factors)]

    ours_times, first, result = time_loralego(adapters, args.rank, args.repeats)
    ours = statistics.median(ours_times)
    print(
        f"loralego svd: median {ours:.4f} s over {args.repeats} runs (min {min(ours_times):.4f} s; first {first:.4f} s)"
    )

    if args.skip_peft:
        return
    full = not args.peft_reduced
    peft_times, peft_factors = time_peft(factors, args.rank, alpha, args.peft_repeats, full)
    theirs = statistics.median(peft_times)
    runs = ", ".join(f"{t:.2f}" for t in peft_times)
    print(f"peft svd (svd_full_matrices={full}): median {theirs:.2f} s over {args.peft_repeats} run(s) [{runs}]")
    print(f"ratio peft / loralego: {theirs / ours:.0f}x")

    ours_factors = (result.lora_a, result.lora_b)
    scale = alpha / args.rank
    target = concat([(a * math.sqrt(scale), b * math.sqrt(scale)) for a, b in factors])
    difference = difference_norm(ours_factors, peft_factors) / math.sqrt(frobenius_norm_sq(ours_factors))
    print(f"relative Frobenius difference of the two rank-{args.rank} updates: {difference:.2e}")
    for name, pair in (("loralego", ours_factors), ("peft", peft_factors)):
        check = check_module(MODULE, pair, target)
        print(f"{name:>8}: relative error vs exact sum {check.relative_error:.6f}, energy kept {check.energy_kept:.6f}")


if __name__ == "__main__":
    main()
