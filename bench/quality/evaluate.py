"""Merge the committed task LoRAs with every method and score them on all tasks (SmolLM2-135M, offline).

Resumable: every finished run is appended to ``results/<set>.json`` and skipped next time, so the
evaluation can be run in pieces. Usage (see docs/results.md for the full run):

  python bench/quality/evaluate.py run --set uniform           # all runs of the uniform rank-8 set
  python bench/quality/evaluate.py run --set hetero            # ranks 4/8/16, alpha != r
  python bench/quality/evaluate.py run --set uniform --only lego  # runs whose name starts with lego
  python bench/quality/evaluate.py list --set uniform          # the planned runs

  python bench/quality/evaluate.py run --set uniform --max-tier 1  # the headline runs only (see plan())

Weights: ``linear``, ``cat`` and ``svd_avg`` average (w = 1/n: weight averaging, the output ensemble and its
best rank-k approximation); every other method takes its own default (``lego+`` averages; TIES, DARE, task
arithmetic, LoRA-LEGO and the 2025 methods sum, as published).

Each run stores every test example's outcome (``outcomes``: one 0/1 string per task, in tasks.py's order), so
report.py can give paired bootstrap intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import IN_DOMAIN  # noqa: E402
from variants import route  # noqa: E402  (registers the sweep's experimental methods)

import loralego  # noqa: E402

RESULTS = HERE / "results"
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """One merge to score: a name, the method family, the merge options."""

    name: str
    group: str  # method family shown in tables and plots
    options: dict[str, Any]
    inputs: tuple[str, ...] | None = None  # default: every in-domain task adapter
    tasks: tuple[str, ...] | None = None  # default: every task
    meta: dict[str, Any] = field(default_factory=dict)


# Output rank of the headline tables: 16, twice the inputs' rank (the uniform set's 8, the hetero set's mean).
K = 16
# The rank curve: the top methods at other output ranks.
RANK_CURVE = (4, 8, 32)
STOCHASTIC = ("dare_ties", "lego", "lego+", "lego+v1", "knots_dare", "core_dare_ties")

# Every method at its published (or, for lego+, its shipped) settings and default weights:
# run prefix -> (merge options without rank and seed, the scale parameter, its grid around the default).
METHODS: dict[str, tuple[dict[str, Any], str | None, tuple[float, ...]]] = {
    "ties": ({"method": "ties", "density": 0.2}, "density", (0.1, 0.5)),
    "dare_ties": ({"method": "dare_ties", "density": 0.5}, None, ()),
    "svd": ({"method": "svd"}, None, ()),
    "lego": ({"method": "lego"}, None, ()),
    "lego+": ({"method": "lego+"}, None, ()),
    # lego+ as shipped before issue 15 (the experimental lego+_x at its defaults: the same bytes).
    "lego+v1": ({"method": "lego+_x"}, None, ()),
    "tsv": ({"method": "tsv"}, "tsv_alpha", (0.5, 1.5)),
    "iso_c": ({"method": "iso_c"}, "iso_alpha", (0.5, 1.5)),
    "iso_cts": ({"method": "iso_cts"}, "iso_alpha", (0.5, 1.5)),
    "knots_ties": ({"method": "knots_ties"}, "knots_ties_alpha", (0.3, 1.0)),
    "knots_dare": ({"method": "knots_dare"}, "knots_dare_alpha", (0.2, 0.8)),
    "core_ties": ({"method": "ties", "space": "core", "density": 0.1}, None, ()),
    "core_dare_ties": ({"method": "dare_ties", "space": "core", "density": 0.7}, None, ()),
}
TOP_FOR_RANK_CURVE = ("lego+", "iso_cts", "iso_c", "tsv", "svd_avg", "ties")


def _ranked(
    group: str, options: dict[str, Any], k: int, seed: int | None, tier: int, label: str = "", **meta: Any
) -> Run:
    name = f"{group}{label}_k{k}" + (f"_s{seed}" if seed is not None else "")
    options = {**options, "rank": k, **({"seed": seed} if seed is not None else {})}
    return Run(name, group, options, meta={"k": k, "seed": seed or 0, "tier": tier, **meta})


def plan(adapter_set: str) -> list[Run]:
    """The evaluation's runs for one adapter set (the same list on every machine), most informative first.

    Tier 0: every method once at k = 16 (seed 0); 1: the other seeds of the stochastic ones; 2: k = 8;
    3: each tuned scale's grid around its default; 4: the rank curve of the top methods; 5: the rest.
    """
    n = len(IN_DOMAIN)
    average = [1.0 / n] * n
    runs: list[Run] = []
    # Exact references: the average ensemble (cat at 1/n), weight averaging, the exact sum (task arithmetic).
    if adapter_set == "uniform":
        runs.append(Run("linear", "linear", {"method": "linear", "weights": average}, meta={"tier": 0}))
    runs.append(Run("cat", "cat", {"method": "cat", "weights": average}, meta={"tier": 0}))
    runs.append(Run("task_arithmetic", "task_arithmetic", {"method": "task_arithmetic"}, meta={"tier": 0}))
    runs.append(_ranked("svd_avg", {"method": "svd", "weights": average}, K, None, 0))
    for prefix, (options, scale, grid) in {**METHODS, **candidate_methods()}.items():
        stochastic = prefix in STOCHASTIC or prefix in candidate_stochastic()
        seeds: tuple[int | None, ...] = SEEDS if stochastic else (None,)
        for seed in seeds:
            runs.append(_ranked(prefix, options, K, seed, 0 if seed in (None, 0) else 1))
            runs.append(_ranked(prefix, options, 8, seed, 2 if seed in (None, 0) else 5))
        for value in grid:
            runs.append(_ranked(prefix, {**options, scale: value}, K, seeds[0], 3, f"[{scale}={value}]",
                                scale=scale, value=value))
    for prefix in TOP_FOR_RANK_CURVE:
        options = {"method": "svd", "weights": average} if prefix == "svd_avg" else METHODS[prefix][0]
        seed = 0 if prefix in STOCHASTIC else None
        for k in RANK_CURVE:
            if k != 8:
                runs.append(_ranked(prefix, options, k, seed, 4))
    unique = {run.name: run for run in runs}
    return sorted(unique.values(), key=lambda run: (run.meta["tier"], _method_order(run)))


# Within a tier, the comparisons that decide the most come first (a partial run already answers them):
# lego+ and the research candidates against the 2025 leaders, then the classics.
PRIORITY = ("cat", "lego+", "lego+v1", "iso_cts", "iso_c", "tsv", "lego", "ties", "svd_avg", "linear", "svd",
            "knots_ties", "core_ties", "dare_ties", "knots_dare", "core_dare_ties", "task_arithmetic")


def _method_order(run: Run) -> int:
    order = [*PRIORITY[:2], *candidate_methods(), *PRIORITY[2:]]
    return order.index(run.group) if run.group in order else len(order)


def candidate_methods() -> dict[str, tuple[dict[str, Any], str | None, tuple[float, ...]]]:
    """Issue 15's research candidates (bench/quality/research.py), evaluated like the shipped methods."""
    from research import CANDIDATES

    return CANDIDATES


def candidate_stochastic() -> tuple[str, ...]:
    """The research candidates whose result depends on the seed (k-means): run over every seed."""
    from research import STOCHASTIC_CANDIDATES

    return STOCHASTIC_CANDIDATES


def adapter_paths(adapter_set: str, tasks: tuple[str, ...] | None = None) -> list[Path]:
    names = tasks or tuple(IN_DOMAIN)
    return [HERE / "adapters" / adapter_set / name for name in names]


def results_path(adapter_set: str, device: str = "cpu") -> Path:
    """CPU results are the headline; runs on another device go to their own file, never mixed in."""
    return RESULTS / (f"{adapter_set}.json" if device == "cpu" else f"{adapter_set}-{device}.json")


def load_results(adapter_set: str, device: str = "cpu") -> dict[str, Any]:
    path = results_path(adapter_set, device)
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save_results(adapter_set: str, results: dict[str, Any], device: str = "cpu") -> None:
    RESULTS.mkdir(exist_ok=True)
    path = results_path(adapter_set, device)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(
    adapter_set: str, only: list[str] | None, batch_size: int, device: str = "cpu", max_tier: int | None = None
) -> None:
    from models import load_smollm2
    from score import AdapterBench, encode_outcomes
    from tasks import load_tasks

    # One thread by default: on a shared 2-core machine two OpenMP threads were several times slower.
    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "1")))
    results = load_results(adapter_set, device)
    todo = [r for r in plan(adapter_set) if r.name not in results["runs"]]
    todo = [r for r in todo if not only or any(r.name.startswith(prefix) for prefix in only)]
    todo = [r for r in todo if max_tier is None or r.meta["tier"] <= max_tier]
    todo_base = "base" not in results or "singles" not in results
    if not todo and not todo_base:
        print("nothing to do")
        return
    start = time.perf_counter()
    base, tokenizer = load_smollm2()
    base.to(device)
    if device != "cpu":
        results["device"] = torch.cuda.get_device_name() if device == "cuda" else device
    tasks = load_tasks()
    bench = AdapterBench(base, tokenizer)
    print(f"loaded model and tasks in {time.perf_counter() - start:.1f}s", flush=True)
    results["test_sizes"] = {name: len(task.test) for name, task in tasks.items()}
    if todo_base:
        start = time.perf_counter()
        hits = bench.score_base(tasks, outcomes=True, batch_size=batch_size)
        results["base"] = accuracies(hits)
        results["base_outcomes"] = {t: encode_outcomes(h) for t, h in hits.items()}
        results["singles"], results["singles_outcomes"] = {}, {}
        for name in IN_DOMAIN:
            # Each task LoRA on its own task: the upper bound and the normaliser of "ID norm".
            path = adapter_paths(adapter_set, (name,))[0]
            hits = bench.score_adapter(path, {name: tasks[name]}, outcomes=True, batch_size=batch_size)
            results["singles"][name] = accuracies(hits)
            results["singles_outcomes"][name] = encode_outcomes(hits[name])
        results["singles_seconds"] = round(time.perf_counter() - start, 1)
        save_results(adapter_set, results, device)
        print(f"base and single-task LoRAs scored in {results['singles_seconds']}s", flush=True)
    for item in todo:
        inputs = [loralego.load(path) for path in adapter_paths(adapter_set, item.inputs)]
        run_tasks = {name: tasks[name] for name in (item.tasks or tuple(tasks))}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            # Merges always on the CPU: same bytes whatever device scores them.
            merged = loralego.merge(inputs, device="cpu", **route(item.options))
            merged.save(Path(tmp) / "merged")
            merge_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            hits = bench.score_adapter(Path(tmp) / "merged", run_tasks, outcomes=True, batch_size=batch_size)
            score_seconds = time.perf_counter() - t0
        scores = accuracies(hits)
        results["runs"][item.name] = {
            "group": item.group,
            "options": item.options,
            "meta": item.meta,
            "scores": scores,
            "outcomes": {t: encode_outcomes(h) for t, h in hits.items()},
            "merge_seconds": round(merge_seconds, 2),
            "mean_rank": round(sum(info.rank for info in merged.modules.values()) / len(merged.modules), 2),
            "score_seconds": round(score_seconds, 1),
        }
        save_results(adapter_set, results, device)
        print(
            f"{item.name:28s} merge {merge_seconds:5.1f}s score {score_seconds:5.1f}s  "
            + " ".join(f"{k}={v:.2f}" for k, v in scores.items()),
            flush=True,
        )


def accuracies(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {task: round(sum(h) / len(h), 4) for task, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list"])
    parser.add_argument("--set", dest="adapter_set", choices=["uniform", "hetero"], default="uniform")
    parser.add_argument("--only", nargs="*", help="run names starting with any of these")
    parser.add_argument("--max-tier", type=int, default=None, help="only runs of this tier or lower")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="scoring device (cuda: results go to <set>-cuda.json)")
    args = parser.parse_args()
    if args.command == "list":
        for item in plan(args.adapter_set):
            print(item.name, json.dumps(item.options))
        return
    run(args.adapter_set, args.only, args.batch_size, args.device, args.max_tier)


if __name__ == "__main__":
    main()
