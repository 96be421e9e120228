"""Few-shot tuned merges and routing on the uniform task LoRAs (issue 18); resumable, like evaluate.py.

Examples: n per in-domain task (n = 5 or 20), drawn from the task's TRAINING split with a seeded draw (never
the test split), as ``{"prompt", "completion": " " + answer, "task"}``. Runs, per draw seed:

- ``tune_search_cat_n{n}_s{seed}``: ``loralego tune``'s search strategy (CMA-ES, one weight per adapter,
  budget 40) with ``cat``, scored on every task's test split (multi-task) and, for seed 0, on the shuffled
  mixture of all test sets (mixed-task);
- ``tune_gradient_cat_n{n}_s{seed}``: the gradient strategy (one weight per module, 30 Adam steps);
- ``route_n{n}_s{seed}``: a router from the same examples (all-MiniLM-L6-v2 prototypes): its top-1 retrieval
  accuracy on all in-domain test prompts, and (seed 0) the mixed-task scores when every test example is
  served by its top-1 adapter. Serving a row by its own adapter is what PEFT's mixed-adapter batches compute;
  here each routed group is scored with its adapter active, which gives the same predictions.

  python bench/quality/fewshot_eval.py run [--only PREFIX ...]     # results/fewshot-uniform.json
  python bench/quality/fewshot_eval.py table                        # markdown for docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import IN_DOMAIN, OUT_OF_DOMAIN  # noqa: E402

import loralego  # noqa: E402
from loralego.examples import Example  # noqa: E402

RESULTS = HERE / "results" / "fewshot-uniform.json"
ADAPTERS = HERE / "adapters" / "uniform"
SIZES = (5, 20)
SEEDS = (0, 1, 2)


def draw(n: int, seed: int) -> list[Example]:
    """n training examples per in-domain task (seeded per task, independent of the other tasks)."""
    from tasks import get_task

    out = []
    for name in IN_DOMAIN:
        train = get_task(name).train
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
        for example in rng.sample(list(train), min(n, len(train))):  # plural, comparative: 19 in train
            out.append(Example(example.prompt, " " + example.answer, name))
    return out


def plan() -> list[tuple[str, dict[str, Any]]]:
    """Seed 0 of everything first, then the cheap routers of the other seeds, then the other seeds' tuned merges
    (search before gradient), so a partial run already covers every kind and size."""
    runs = [_run(kind, n, 0) for n in SIZES for kind in ("search", "route", "gradient")]
    runs += [_run("route", n, seed) for seed in SEEDS[1:] for n in SIZES]
    runs += [_run(kind, n, seed) for kind in ("search", "gradient") for n in SIZES for seed in SEEDS[1:]]
    return runs


def _run(kind: str, n: int, seed: int) -> tuple[str, dict[str, Any]]:
    name = f"route_n{n}_s{seed}" if kind == "route" else f"tune_{kind}_cat_n{n}_s{seed}"
    return name, {"kind": kind, "n": n, "seed": seed}


def load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}


def save(results: dict[str, Any]) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def routed_mixed(bench: Any, tasks: dict[str, Any], router: Any, batch_size: int) -> dict[str, float]:
    """score_mixed's figures when every test example is served by its top-1 adapter."""
    from score import Scorer, is_correct, mixture

    examples = mixture(tasks, 0)
    best = router.top_k([e.prompt for e in examples], 1)
    routed = [router.names[b[0]] for b in best]
    hits: dict[str, list[bool]] = {name: [] for name in tasks}
    for adapter in sorted(set(routed)):
        subset = [e for e, r in zip(examples, routed, strict=True) if r == adapter]
        with bench.adapter(ADAPTERS / adapter) as model:
            predictions = Scorer(model, bench.tokenizer).predict(subset, tasks, batch_size)
        for example, prediction in zip(subset, predictions, strict=True):
            hits[example.task].append(is_correct(example, prediction))
    scores = {name: sum(h) / len(h) for name, h in hits.items()}
    scores["overall"] = sum(sum(h) for h in hits.values()) / len(examples)
    scores["macro"] = sum(scores[name] for name in tasks) / len(tasks)
    return scores


def run(only: list[str] | None, batch_size: int) -> None:
    from models import MINILM_PACKAGE, load_smollm2, package_dir
    from score import AdapterBench
    from tasks import load_tasks

    from loralego.routing import build_router, retrieval_accuracy
    from loralego.tuning import TuneSettings, tune_weights, tuned_options

    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "1")))
    results = load()
    todo = [(name, spec) for name, spec in plan() if name not in results["runs"]]
    todo = [(name, spec) for name, spec in todo if not only or any(name.startswith(p) for p in only)]
    if not todo:
        print("nothing to do")
        return
    tasks = load_tasks()
    tuner, tokenizer = load_smollm2()  # stays a plain model: tune wraps its linear layers itself
    scorer_base, _ = load_smollm2()  # AdapterBench injects PEFT layers into this one
    bench = AdapterBench(scorer_base, tokenizer)
    adapters = [loralego.load(ADAPTERS / name) for name in IN_DOMAIN]
    encoder = package_dir(MINILM_PACKAGE) / "model"
    for name, spec in todo:
        examples = draw(spec["n"], spec["seed"])
        entry: dict[str, Any] = {"spec": spec, "n_examples": len(examples)}
        if spec["kind"] == "route":
            t0 = time.perf_counter()
            router = build_router(encoder, examples, list(IN_DOMAIN), [str(ADAPTERS / t) for t in IN_DOMAIN],
                                  holdout=0.0, seed=spec["seed"])
            entry["build_seconds"] = round(time.perf_counter() - t0, 2)
            test = [e for t in IN_DOMAIN for e in tasks[t].test]
            embeddings = router._encoder.embed([e.prompt for e in test])
            entry["retrieval_accuracy"] = retrieval_accuracy(router.prototypes, embeddings, [e.task for e in test],
                                                             router.names)
            if spec["seed"] == 0:
                t0 = time.perf_counter()
                entry["mixed"] = routed_mixed(bench, tasks, router, batch_size)
                entry["score_seconds"] = round(time.perf_counter() - t0, 1)
        else:
            settings = (TuneSettings(strategy="search", seed=spec["seed"], budget=40, bf16=True)
                        if spec["kind"] == "search" else
                        TuneSettings(strategy="gradient", seed=spec["seed"], steps=30, lr=0.01, eval_every=5,
                                     l1=0.0, bf16=True))
            t0 = time.perf_counter()
            result, groups = tune_weights(tuner, tokenizer, adapters, examples, settings)
            entry["tune_seconds"] = round(time.perf_counter() - t0, 1)
            learned = tuned_options(adapters, result, groups)
            merged = loralego.merge(adapters, method="cat", dtype="float32", device="cpu", **learned)
            rows = result.weights
            entry.update(
                loss_before=result.loss_before, loss_after=result.loss_after, chosen_at=result.chosen_at,
                history=result.history,
                weights=dict(zip(result.adapters, [sum(r[j] for r in rows) / len(rows) for j in
                                                   range(len(result.adapters))], strict=True)),
            )
            with tempfile.TemporaryDirectory() as tmp:
                merged.save(Path(tmp) / "merged")
                t0 = time.perf_counter()
                entry["scores"] = bench.score_adapter(Path(tmp) / "merged", tasks, batch_size=batch_size)
                if spec["seed"] == 0:
                    entry["mixed"] = bench.score_adapter(Path(tmp) / "merged", tasks, mixed=True,
                                                         batch_size=batch_size)
                entry["score_seconds"] = round(time.perf_counter() - t0, 1)
        results["runs"][name] = entry
        save(results)
        print(f"{name:28s} " + json.dumps({k: v for k, v in entry.items() if k not in ("scores", "mixed")}),
              flush=True)


def _norm(scores: dict[str, float], singles: dict[str, dict[str, float]]) -> tuple[float, float]:
    ratios = [scores[t] / singles[t][t] for t in IN_DOMAIN if singles[t][t] > 0]
    return sum(ratios) / len(ratios), sum(scores[t] for t in OUT_OF_DOMAIN) / len(OUT_OF_DOMAIN)


def table() -> str:
    import statistics

    base = json.loads((HERE / "results" / "uniform.json").read_text())
    singles = base["singles"]
    runs = load()["runs"]

    def stat(values: list[float]) -> str:
        if not values:
            return "not run"
        if len(values) == 1:
            return f"{values[0]:.3f} (1 seed)"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)} seeds)"

    lines = ["| run | examples / task | ID norm | OOD acc | mixed overall (seed 0) | mixed ID norm (seed 0) | "
             "held-out loss before -> after | tune s | score s |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [(f"tune {kind} + cat", n, [f"tune_{kind}_cat_n{n}_s{s}" for s in SEEDS])
            for kind in ("search", "gradient") for n in SIZES]
    rows.append(("tune search + cat, first step 0.2 (first try)", 5, ["first_search_sigma0.2_n5_s0"]))
    for label, n, names in rows:
        found = [runs[name] for name in names if name in runs]
        norms = [_norm(r["scores"], singles) for r in found]
        mixed = [r["mixed"] for r in found if r.get("mixed")]
        mixed_cells = (f"{mixed[0]['overall']:.3f} | {_norm(mixed[0], singles)[0]:.3f}" if mixed
                       else "not run | not run")
        losses = [(r["loss_before"]["heldout"], r["loss_after"]["heldout"]) for r in found]
        loss_cell = (f"{statistics.mean(b for b, _ in losses):.3f} -> {statistics.mean(a for _, a in losses):.3f}"
                     if losses else "-")
        tune_s = f"{statistics.mean(r['tune_seconds'] for r in found):.0f}" if found else "-"
        score_s = f"{statistics.mean(r['score_seconds'] for r in found):.0f}" if found else "-"
        lines.append(f"| {label} | {n} | {stat([a for a, _ in norms])} | {stat([b for _, b in norms])} | "
                     f"{mixed_cells} | {loss_cell} | {tune_s} | {score_s} |")
    for name, label in (("linear", "linear w = 1/7 (best data-free)"), ("cat", "cat w = 1/7 (data-free)")):
        run_ = base["runs"][name]
        id_norm, ood = _norm(run_["scores"], singles)
        mixed_norm = _norm(run_["mixed"], singles)[0]
        lines.append(f"| {label} | 0 | {id_norm:.3f} | {ood:.3f} | {run_['mixed']['overall']:.3f} | "
                     f"{mixed_norm:.3f} | - | 0 | - |")
    lines.append("| task LoRAs, each on its own task (upper bound) | - | 1.000 | - | - | - | - | - | - |")
    lines += ["", "| router | examples / task | top-1 retrieval accuracy (in-domain test prompts) | "
              "mixed overall, top-1 served (seed 0) | mixed ID norm | mixed OOD acc | build s | score s |",
              "|---|---|---|---|---|---|---|---|"]
    for n in SIZES:
        found = [runs[f"route_n{n}_s{s}"] for s in SEEDS if f"route_n{n}_s{s}" in runs]
        mixed = [r for r in found if r.get("mixed")]
        if mixed:
            id_norm, ood = _norm(mixed[0]["mixed"], singles)
            cells = f"{mixed[0]['mixed']['overall']:.3f} | {id_norm:.3f} | {ood:.3f}"
            score_s = f"{mixed[0]['score_seconds']:.0f}"
        else:
            cells, score_s = "not run | - | -", "-"
        build = f"{statistics.mean(r['build_seconds'] for r in found):.1f}" if found else "-"
        lines.append(f"| MiniLM prototypes | {n} | {stat([r['retrieval_accuracy'] for r in found])} | {cells} | "
                     f"{build} | {score_s} |")
    linear = base["runs"]["linear"]["mixed"]
    id_norm, ood = _norm(linear, singles)
    lines.append(f"| (no router) linear w = 1/7, one merged adapter | 0 | - | {linear['overall']:.3f} | "
                 f"{id_norm:.3f} | {ood:.3f} | - | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.command == "table":
        print(table(), end="")
    else:
        run(args.only, args.batch_size)


if __name__ == "__main__":
    main()
