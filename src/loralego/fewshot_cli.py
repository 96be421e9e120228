"""The ``tune`` and ``route`` subcommands (optional extra ``loralego[tune]``: transformers, peft).

Kept apart from :mod:`loralego.cli` so the core command imports nothing of them; their heavy imports happen
only when one of them runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Sequence
from typing import Any

from .errors import LoraLegoError, one_line
from .progress import Progress


class StepProgress(Progress):
    """The merge progress bar, counting search evaluations or gradient steps instead of modules."""

    def __init__(self, total: int, unit: str) -> None:
        super().__init__(total)
        self.unit = unit

    def step(self, done: int, total: int, what: str) -> None:
        self.done = done - 1
        self(what)

    def line(self, module: str, seconds: float) -> str:
        filled = 30 * self.done // self.total
        bar = "#" * filled + "." * (30 - filled)
        return f"[{bar}] {self.done}/{self.total} {self.unit}, {seconds:.0f} s: {one_line(module)}"


def add_parsers(commands: Any, adapter_help: str, add_option_flags: Any) -> None:
    tune = commands.add_parser(
        "tune", help="learn merge weights from a few examples, write one merged adapter (loralego[tune])"
    )
    tune.add_argument("adapters", nargs="+", metavar="ADAPTER", help=adapter_help)
    tune.add_argument("--base-model", required=True, metavar="DIR", help="local folder of the base causal LM "
                      "and its tokenizer (never downloaded)")
    tune.add_argument("--examples", required=True, metavar="FILE", help='JSONL, one {"prompt", "completion", '
                      '"task"?} per line')
    tune.add_argument("--out", "-o", required=True, help="output adapter folder (or file, as merge)")
    tune.add_argument("--strategy", choices=["search", "gradient"], default="search",
                      help="search: one weight per adapter by CMA-ES (LoraHub); gradient: per-module or per-layer "
                      "weights by Adam on the completion loss (LoRA Soups) (default: search)")
    tune.add_argument("--granularity", choices=["adapter", "module", "layer"], default=None,
                      help="what gets its own weight (default: adapter for search, module for gradient)")
    tune.add_argument("--holdout", type=float, default=0.2, help="share of the examples held out to pick the "
                      "stopping point (default: 0.2)")
    tune.add_argument("--init-weight", type=float, default=None, help="starting weight of every adapter "
                      "(default: 1/n, the average ensemble)")
    tune.add_argument("--budget", type=int, default=40, help="search: loss evaluations (default: 40)")
    tune.add_argument("--sigma", type=float, default=None, help="search: CMA-ES initial step size (default: half "
                      "the starting weight)")
    tune.add_argument("--steps", type=int, default=50, help="gradient: Adam steps (default: 50)")
    tune.add_argument("--lr", type=float, default=0.01, help="gradient: learning rate (default: 0.01)")
    tune.add_argument("--eval-every", type=int, default=5, help="gradient: held-out check interval (default: 5)")
    tune.add_argument("--l1", type=float, default=0.05, help="L1 penalty on the weights (default: 0.05)")
    tune.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    tune.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes")
    tune.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    # The merge's own flags (--method, --rank, the method's parameters, --seed, --device...); tune's defaults:
    # method cat and dtype float32. --weights is refused: tune learns them.
    add_option_flags(tune)

    route = commands.add_parser("route", help="build a router (a prototype embedding per adapter) from examples")
    route.add_argument("adapters", nargs="+", metavar="ADAPTER", help=adapter_help)
    route.add_argument("--encoder", required=True, metavar="DIR", help="local sentence-encoder folder "
                       "(e.g. all-MiniLM-L6-v2)")
    route.add_argument("--examples", required=True, metavar="FILE", help='JSONL with a "task" naming an adapter '
                       "on every line")
    route.add_argument("--out", "-o", required=True, help="router folder")
    route.add_argument("--holdout", type=float, default=0.2, help="share held out to measure retrieval accuracy")
    route.add_argument("--seed", type=int, default=0)
    route.add_argument("--force", action="store_true", help="overwrite an existing router folder")


def run_tune(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .adapters import load
    from .examples import check_tasks, read_examples
    from .tuning import TuneSettings, tune_to_folder

    examples = read_examples(args.examples)
    adapters = [load(path) for path in args.adapters]
    check_tasks(examples, [a.name for a in adapters], required=False, source=args.examples)
    from .cli import options_from_args

    # tune's own defaults: cat (the learned ensemble, exactly) in float32
    args.method = "cat" if args.method is None else args.method
    args.dtype = "float32" if args.dtype is None else args.dtype
    options = options_from_args(args)
    settings = TuneSettings(
        strategy=args.strategy, granularity=args.granularity, init_weight=args.init_weight, holdout=args.holdout,
        seed=options.seed, budget=args.budget, sigma=args.sigma, steps=args.steps, lr=args.lr,
        eval_every=args.eval_every, l1=args.l1, batch_size=args.batch_size, bf16=args.bf16,
    )
    total = args.budget if args.strategy == "search" else args.steps
    progress = None if args.quiet else StepProgress(total, "evaluations" if args.strategy == "search" else "steps")
    try:
        result = tune_to_folder(
            args.base_model, adapters, examples, args.out, settings, options,
            progress=progress.step if progress else None,
            command=shlex.join(["loralego", *argv]),
        )
    finally:
        if progress is not None:
            progress.close()
    if args.quiet:
        return
    print(f"tuned {len(adapters)} adapters ({result.strategy}, one weight per {result.granularity}) on "
          f"{result.n_train} examples, {result.n_heldout} held out, in {result.seconds:.1f} s")
    if result.granularity == "adapter":
        for name, weight in zip(result.adapters, result.weights[0], strict=True):
            print(f"  {one_line(name):<24} {weight:+.4f}")
    else:
        for j, name in enumerate(result.adapters):
            column = [row[j] for row in result.weights]
            print(f"  {one_line(name):<24} mean {sum(column) / len(column):+.4f}  min {min(column):+.4f}  "
                  f"max {max(column):+.4f}  over {len(column)} {result.granularity}s")
    print("loss before: " + json.dumps(result.loss_before) + "  after: " + json.dumps(result.loss_after)
          + "  written: " + json.dumps(result.written_loss))
    print(f"kept {'evaluation' if result.strategy == 'search' else 'step'} {result.chosen_at}; "
          f"weights in {args.out}/tune.json")


def run_route(args: argparse.Namespace) -> None:
    from .adapters import load
    from .examples import read_examples
    from .routing import build_router

    started = time.perf_counter()
    examples = read_examples(args.examples)
    adapters = [load(path) for path in args.adapters]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise LoraLegoError("adapters share a name (their folder names); a router tells them apart by name")
    router = build_router(args.encoder, examples, names, [str(a.path or p) for a, p in zip(adapters, args.adapters,
                          strict=True)], holdout=args.holdout, seed=args.seed)
    router.save(args.out, force=args.force)
    accuracy = "n/a (nothing held out)" if router.heldout_accuracy is None else f"{router.heldout_accuracy:.3f}"
    print(f"router over {len(names)} adapters from {len(examples)} examples: held-out top-1 accuracy {accuracy}; "
          f"{args.out} in {time.perf_counter() - started:.1f} s")
