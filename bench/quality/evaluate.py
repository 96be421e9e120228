"""Merge the committed task LoRAs with every method and score them on all tasks (SmolLM2-135M, offline).

Resumable: every finished run is appended to ``results/<set>.json`` and skipped next time, so the
evaluation can be run in pieces. Usage (see docs/results.md for the full run):

  python bench/quality/evaluate.py run --set uniform           # all runs of the uniform rank-8 set
  python bench/quality/evaluate.py run --set hetero            # ranks 4/8/16, alpha != r
  python bench/quality/evaluate.py run --set uniform --only lego  # runs whose name starts with lego
  python bench/quality/evaluate.py list --set uniform          # the planned runs

Weights: ``linear`` and ``cat`` average (w = 1/n: weight averaging and the output ensemble), all other
methods sum (w = 1: task arithmetic, TIES and DARE as published, LoRA-LEGO as in the paper).
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

from tasks import IN_DOMAIN, OUT_OF_DOMAIN  # noqa: E402
from variants import route  # noqa: E402  (registers the sweep's experimental methods)

import loralego  # noqa: E402

RESULTS = HERE / "results"
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """One merge to score: a name, the merge options, and whether to score the mixed setting too."""

    name: str
    group: str  # method family shown in tables and plots
    options: dict[str, Any]
    mixed: bool = False
    inputs: tuple[str, ...] | None = None  # default: every in-domain task adapter
    tasks: tuple[str, ...] | None = None  # default: every task
    meta: dict[str, Any] = field(default_factory=dict)


def plan(adapter_set: str) -> list[Run]:
    """The evaluation's runs for one adapter set (the same list on every machine)."""
    n = len(IN_DOMAIN)
    r = 8  # the uniform set's rank, and the mean rank of the hetero set (4, 8, 16 cycling)
    ks = (r, 2 * r, 4 * r, 8 * r)
    average = [1.0 / n] * n
    runs: list[Run] = []
    if adapter_set == "uniform":
        runs.append(Run("linear", "linear", {"method": "linear", "weights": average}, mixed=True))
    runs += [
        Run("cat", "cat", {"method": "cat", "weights": average}, mixed=True),
        Run("task_arithmetic", "task_arithmetic", {"method": "task_arithmetic"}, mixed=True),
        Run(f"svd_k{r}", "svd", {"method": "svd", "rank": r}),
    ]
    for density in (0.1, 0.2, 0.5):
        runs.append(
            Run(
                f"ties_d{density}_k{r}",
                "ties",
                {"method": "ties", "rank": r, "density": density},
                mixed=density == 0.2,
                meta={"density": density},
            )
        )
    for seed in SEEDS:
        runs.append(
            Run(
                f"dare_ties_d0.5_k{r}_s{seed}",
                "dare_ties",
                {"method": "dare_ties", "rank": r, "density": 0.5, "seed": seed},
                meta={"seed": seed},
            )
        )
    # lego+ averages by default (w = 1/n, scaled to fit the average ensemble); lego sums, as in the paper.
    for method in ("lego", "lego+"):
        for k in ks if method == "lego" and adapter_set == "uniform" else ks[:3]:
            for seed in SEEDS:
                runs.append(
                    Run(
                        f"{method}_k{k}_s{seed}",
                        method,
                        {"method": method, "rank": k, "seed": seed},
                        mixed=k == r and seed == 0,  # the rank-wise merges in the mixed setting too
                        meta={"k": k, "seed": seed},
                    )
                )
    # Paper lego at the ensemble's scale (w = 1/n): isolates clustering from output scale.
    runs.append(Run(f"lego_avg_k{r}_s0", "lego_avg", {"method": "lego", "rank": r, "seed": 0, "weights": average},
                    meta={"k": r, "seed": 0}))
    ablations = {
        "lego_noparam": {"param_reweight": False},
        "lego_nooutput": {"output_reweight": False},
        "lego_l2": {"norm": "2"},
        "lego_gauge": {"gauge": "balanced"},
        "lego_directions": {"gauge": "balanced", "cluster_on": "directions"},
        "lego_rank1": {"representative": "rank1"},
        # The output factor's constant: sqrt(r_ref / k) with r_ref below the mean input rank (8 here).
        "lego_rref1": {"r_ref": 1.0},
        "lego_rref2": {"r_ref": 2.0},
    }
    for name, extra in ablations.items():
        for seed in SEEDS:
            runs.append(
                Run(
                    f"{name}_k{r}_s{seed}",
                    name,
                    {"method": "lego", "rank": r, "seed": seed, **extra},
                    meta={"k": r, "seed": seed},
                )
            )
    runs += variant_runs(adapter_set, average)
    if adapter_set == "hetero":
        # Pruning: the rank-16 chat_topic LoRA reduced to k = 4 and 8, scored on its own task.
        for method in ("lego", "svd"):
            for k in (4, 8):
                runs.append(
                    Run(
                        f"prune_{method}_k{k}",
                        f"prune_{method}",
                        {"method": method, "rank": k},
                        inputs=("chat_topic",),
                        tasks=("chat_topic",),
                        meta={"k": k},
                    )
                )
    # Most informative first, so a partial run (the evaluation is resumable) already answers the question.
    return sorted(runs, key=_priority)


# Issue 8: rank-wise variants, each at k = 8 over 3 seeds. "avg" ones merge at w = 1/n and are scaled to fit
# the exact average ensemble (cat at w = 1/n) per module; the others keep the paper's w = 1.
VARIANTS: dict[str, dict[str, Any]] = {
    "v_ls": {"output_scale": "least_squares"},
    "v_mn": {"output_scale": "match_norm"},
    "v_dir_mn": {"gauge": "balanced", "cluster_on": "directions", "output_scale": "match_norm"},
    "v_gauge_ls": {"gauge": "balanced", "output_scale": "least_squares"},
    "v_dir_ls": {"gauge": "balanced", "cluster_on": "directions", "output_scale": "least_squares"},
    "v_dir_rank1_ls": {"gauge": "balanced", "cluster_on": "directions", "representative": "rank1",
                       "output_scale": "least_squares"},
    "v_rank1_ls": {"gauge": "balanced", "representative": "rank1", "output_scale": "least_squares"},
    "v_dir_rank1mean_ls": {"gauge": "balanced", "cluster_on": "directions", "representative": "rank1_mean",
                           "output_scale": "least_squares"},
    "v_dir_ties_ls": {"gauge": "balanced", "cluster_on": "directions", "representative": "ties",
                      "density": 0.5, "output_scale": "least_squares"},
    "v_gauge_ties_ls": {"gauge": "balanced", "representative": "ties", "density": 0.5,
                        "output_scale": "least_squares"},
    "v_ls_balance": {"output_scale": "least_squares", "balance": True},
    "v_ls_l2": {"output_scale": "least_squares", "norm": "2"},
    "v_ls_noparam": {"output_scale": "least_squares", "param_reweight": False},
    # Automatic k: each module's rank from 90% of its ensemble energy (no --rank: not capped at 8).
    "v_dir_ls_e0.9": {"gauge": "balanced", "cluster_on": "directions", "output_scale": "least_squares",
                      "energy": 0.9},
}


# lego+ as first shipped (before the sweep): rank-1 representatives divided by the adapters in the cluster, w = 1.
FIRST_PLUS = {"gauge": "balanced", "cluster_on": "directions", "representative": "rank1_mean"}


def variant_runs(adapter_set: str, average: list[float]) -> list[Run]:
    r = 8
    runs = []
    for name, extra in VARIANTS.items():
        for seed in SEEDS:
            options = {"method": "lego", "seed": seed, "weights": average, **extra}
            if "energy" in extra:
                runs.append(Run(f"{name}_s{seed}", name, options, meta={"seed": seed}))
                continue
            options["rank"] = r
            runs.append(Run(f"{name}_k{r}_s{seed}", name, options, meta={"k": r, "seed": seed}))
    for k in (r, 2 * r, 4 * r):
        for seed in SEEDS:
            options = {"method": "lego", "rank": k, "seed": seed, **FIRST_PLUS}
            runs.append(Run(f"v_rank1mean_w1_k{k}_s{seed}", "v_rank1mean_w1", options, meta={"k": k, "seed": seed}))
    first_plus_avg = {"method": "lego", "rank": r, "seed": 0, "weights": average, **FIRST_PLUS}
    runs.append(Run(f"v_rank1mean_avg_k{r}_s0", "v_rank1mean_avg", first_plus_avg, meta={"k": r, "seed": 0}))
    # Reference at w = 1/n: the best rank-8 approximation of the average ensemble.
    runs.append(Run(f"svd_avg_k{r}", "svd_avg", {"method": "svd", "rank": r, "weights": average}))
    # Is 1/n the right scale for the ensemble itself? cat at other uniform weights.
    for weight in (0.07, 0.2, 0.3):
        runs.append(Run(f"cat_w{weight}", "cat_scale", {"method": "cat", "weights": [weight] * len(average)},
                        meta={"weight": weight}))
    return runs


def _priority(item: Run) -> int:
    """0: one run of every method at k = r; 1: its other seeds and lego at larger k; 2: the rest; 3: ablations;
    4: the issue-8 variants."""
    seed, k = item.meta.get("seed", 0), item.meta.get("k", 8)
    if item.group.startswith("v_") or item.group in ("svd_avg", "cat_scale"):
        return 4
    if item.group.startswith("lego_") or item.group.endswith("_avg"):
        return 3
    if item.group.startswith("prune"):
        return 1
    if item.group in ("lego", "lego+"):
        if k == 8:
            return 0 if seed == 0 else 1
        return 1 if seed == 0 else 2
    if item.group == "ties" and item.meta.get("density") != 0.2:
        return 2
    return 0 if seed == 0 else 2


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


def run(adapter_set: str, only: list[str] | None, batch_size: int, device: str = "cpu") -> None:
    from models import load_smollm2
    from score import AdapterBench
    from tasks import load_tasks

    # One thread by default: on a shared 2-core machine two OpenMP threads were several times slower.
    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "1")))
    results = load_results(adapter_set, device)
    todo = [r for r in plan(adapter_set) if r.name not in results["runs"]]
    todo = [r for r in todo if not only or any(r.name.startswith(prefix) for prefix in only)]
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
        results["base"] = bench.score_base(tasks, batch_size=batch_size)
        results["singles"] = {}
        for name in IN_DOMAIN:
            # Each task LoRA on its own task (the normaliser) and on the out-of-domain tasks.
            path = adapter_paths(adapter_set, (name,))[0]
            own = {t: tasks[t] for t in (name, *OUT_OF_DOMAIN)}
            results["singles"][name] = bench.score_adapter(path, own, batch_size=batch_size)
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
            scores = bench.score_adapter(Path(tmp) / "merged", run_tasks, batch_size=batch_size)
            mixed = None
            if item.mixed:
                mixed = bench.score_adapter(Path(tmp) / "merged", run_tasks, mixed=True, batch_size=batch_size)
            score_seconds = time.perf_counter() - t0
        results["runs"][item.name] = {
            "group": item.group,
            "options": item.options,
            "meta": item.meta,
            "scores": scores,
            "mixed": mixed,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list"])
    parser.add_argument("--set", dest="adapter_set", choices=["uniform", "hetero"], default="uniform")
    parser.add_argument("--only", nargs="*", help="run names starting with any of these")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="scoring device (cuda: results go to <set>-cuda.json)")
    args = parser.parse_args()
    if args.command == "list":
        for item in plan(args.adapter_set):
            print(item.name, json.dumps(item.options))
        return
    run(args.adapter_set, args.only, args.batch_size, args.device)


if __name__ == "__main__":
    main()
