"""Development proxy for issue 15's research: how well a merged adapter fits the tasks' *training* data.

The selection rule (findings.md) lets candidates and their parameters be chosen on this proxy only, never on a
test example. For a merge (options routed like evaluate.py's runs), per in-domain task, on a fixed seeded
sample of ``SAMPLE`` examples of the task's training split:

- ``nll``: the mean over examples of the mean answer-token negative log-likelihood, teacher-forced, tokenised
  exactly as train.py's ``encode`` (prompt, " " + answer, EOS; loss on the answer tokens and EOS);
- ``acc``: classify tasks: the label whose (single) token is likeliest at the answer position, as score.py ranks
  single-token labels (``Scorer.classify`` for multi-token labels); generate tasks: the teacher-forced greedy
  match (every answer word token is the argmax after the true prefix, i.e. greedy decoding starts with the
  answer's tokens); both from the same forward pass as the NLL.

Mean NLL over tasks is the headline (lower is better); mean acc is shown beside it. One base model is loaded
once and adapters are swapped with score.py's ``AdapterBench``; one thread, bf16 autocast as score.py. Only the
results JSON is written (``results/devproxy.json``; finished runs are skipped, so it resumes).

  python bench/quality/devproxy.py run --set uniform --only cat lego+   # named runs (default: all)
  python bench/quality/devproxy.py table                                # both sets, sorted by mean NLL
  python bench/quality/devproxy.py list                                 # the run names and their options
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

import research_methods  # noqa: E402  (registers the research candidates)
from tasks import IN_DOMAIN, Example, Task  # noqa: E402
from variants import route  # noqa: E402  (registers the sweep's experimental methods)

import loralego  # noqa: E402

RESULTS = HERE / "results" / "devproxy.json"
SAMPLE = 48
SAMPLE_SEED = 0
K = 16
SEED = 0

_AVERAGE = [1.0 / len(IN_DOMAIN)] * len(IN_DOMAIN)

# The shipped methods at their evaluate.py defaults (k = 16, seed 0); cat is the exact average ensemble.
BASELINES: dict[str, dict[str, Any]] = {
    "cat": {"method": "cat", "weights": _AVERAGE},
    "svd_avg": {"method": "svd", "weights": _AVERAGE, "rank": K},
    "lego+": {"method": "lego+", "rank": K, "seed": SEED},
    "lego": {"method": "lego", "rank": K, "seed": SEED},
    "ties": {"method": "ties", "density": 0.2, "rank": K},
    "tsv": {"method": "tsv", "rank": K},
    "iso_c": {"method": "iso_c", "rank": K},
    "iso_cts": {"method": "iso_cts", "rank": K},
}


def all_runs() -> dict[str, dict[str, Any]]:
    """Run name -> merge options: the baselines, then the research candidates (research_methods.PROXY_RUNS)."""
    return {**BASELINES, **{name: {**options, "rank": K, "seed": SEED}
                            for name, options in research_methods.PROXY_RUNS.items()}}


def proxy_sample(task: Task, size: int = SAMPLE, seed: int = SAMPLE_SEED) -> list[Example]:
    """A fixed sample of the task's training split (seeded by the task's name, not by Python's hash)."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(task.name.encode()))
    picks = rng.sample(range(len(task.train)), min(size, len(task.train)))
    return [task.train[i] for i in sorted(picks)]


@torch.inference_mode()
def answer_scores(
    model, tokenizer, examples: list[Example], labels: tuple[str, ...] = (), bf16: bool = True
) -> tuple[list[float], list[bool]]:
    """Per example: mean answer-token NLL and a hit. The hit, for single-token ``labels`` (classify tasks): the
    label whose token is likeliest at the answer's first position, as score.py's single-token path ranks them;
    otherwise whether every answer word token is the greedy argmax after the true prefix. One forward pass."""
    from train import collate, encode

    encoded = [encode(tokenizer, ex) for ex in examples]
    inputs = collate(encoded, tokenizer.pad_token_id)
    targets_all = inputs["labels"]
    width = int((targets_all != -100).sum(-1).max())
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with context:
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], logits_to_keep=width + 1,
        ).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = targets_all[:, -width:]
    mask = targets != -100
    token_lp = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = (-(token_lp * mask).sum(-1) / mask.sum(-1)).tolist()
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    if labels and all(len(ids) == 1 for ids in label_ids):
        # Left padding right-aligns the answers: row i's first answer token sits at width - answer length.
        first = width - mask.sum(-1)
        candidates = log_probs[torch.arange(len(examples)), first][:, [ids[0] for ids in label_ids]]
        picked = candidates.argmax(-1).tolist()
        hit = [labels[p] == ex.answer for p, ex in zip(picked, examples, strict=True)]
        return nll, hit
    # The last answer position is EOS: greedy match is about the word's tokens only.
    word = mask.clone()
    word[:, -1] = False
    hit = ((log_probs.argmax(-1) == targets) | ~word).all(-1).tolist()
    return nll, hit


def score_model(model, tokenizer, tasks: dict[str, Task]) -> dict[str, dict[str, float]]:
    from score import Scorer

    out = {}
    for name, task in tasks.items():
        sample = proxy_sample(task)
        nll, hits = answer_scores(model, tokenizer, sample, task.labels)
        if task.kind == "classify" and not _single_token(tokenizer, task.labels):
            with torch.inference_mode():
                predicted = Scorer(model, tokenizer).classify(sample, {name: task.labels})
            hits = [p == ex.answer for p, ex in zip(predicted, sample, strict=True)]
        out[name] = {"nll": round(sum(nll) / len(nll), 5), "acc": round(sum(hits) / len(hits), 4)}
    return out


def _single_token(tokenizer, labels: tuple[str, ...]) -> bool:
    return all(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) == 1 for label in labels)


def summary(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        "mean_nll": round(sum(v["nll"] for v in per_task.values()) / len(per_task), 5),
        "mean_acc": round(sum(v["acc"] for v in per_task.values()) / len(per_task), 4),
    }


def load_results() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sample": SAMPLE, "sets": {}}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def run(adapter_set: str, only: list[str] | None, redo: bool) -> None:
    from models import load_smollm2
    from score import AdapterBench
    from tasks import load_tasks

    torch.set_num_threads(1)
    runs = all_runs()
    unknown = [name for name in only or [] if name not in runs]
    if unknown:
        raise SystemExit(f"unknown run(s): {', '.join(unknown)}; see `devproxy.py list`")
    results = load_results()
    done = results["sets"].setdefault(adapter_set, {})
    todo = [name for name in (only or list(runs)) if redo or name not in done]
    want_refs = "base" not in done
    if not todo and not want_refs:
        print("nothing to do")
        return
    base, tokenizer = load_smollm2()
    tasks = load_tasks(list(IN_DOMAIN))
    bench = AdapterBench(base, tokenizer)
    if want_refs:
        t0 = time.perf_counter()
        per_task = score_model(base, tokenizer, tasks)
        done["base"] = {"per_task": per_task, **summary(per_task), "score_seconds": round(time.perf_counter() - t0, 1)}
        singles = {}
        for name in IN_DOMAIN:
            with bench.adapter(HERE / "adapters" / adapter_set / name) as model:
                singles[name] = score_model(model, tokenizer, {name: tasks[name]})[name]
        done["singles"] = {"per_task": singles, **summary(singles)}
        save_results(results)
        print(f"base mean_nll={done['base']['mean_nll']:.4f}  singles mean_nll={done['singles']['mean_nll']:.4f}",
              flush=True)
    paths = [HERE / "adapters" / adapter_set / name for name in IN_DOMAIN]
    for name in todo:
        options = runs[name]
        inputs = [loralego.load(path) for path in paths]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            merged = loralego.merge(inputs, device="cpu", **route(options))
            merged.save(Path(tmp) / "merged")
            merge_seconds = time.perf_counter() - t0
            ranks = sorted({info.rank for info in merged.modules.values()})
            t0 = time.perf_counter()
            with bench.adapter(Path(tmp) / "merged") as model:
                per_task = score_model(model, tokenizer, tasks)
            score_seconds = time.perf_counter() - t0
        done[name] = {
            "options": options, "per_task": per_task, **summary(per_task), "ranks": ranks,
            "merge_seconds": round(merge_seconds, 2), "score_seconds": round(score_seconds, 1),
        }
        save_results(results)
        print(f"{adapter_set:7s} {name:28s} nll={done[name]['mean_nll']:.4f} acc={done[name]['mean_acc']:.3f} "
              f"ranks={ranks} merge {merge_seconds:.1f}s score {score_seconds:.1f}s", flush=True)


def table() -> None:
    results = load_results()["sets"]
    names = sorted({n for s in results.values() for n in s}, key=lambda n: _mean_nll(results, n))
    print(f"{'run':30s} " + " ".join(f"{s + ' nll':>12s} {s + ' acc':>12s}" for s in ("uniform", "hetero"))
          + f" {'mean nll':>9s}")
    for name in names:
        cells = []
        for adapter_set in ("uniform", "hetero"):
            row = results.get(adapter_set, {}).get(name)
            cells.append(f"{row['mean_nll']:12.4f} {row['mean_acc']:12.3f}" if row else f"{'-':>12s} {'-':>12s}")
        mean = _mean_nll(results, name)
        print(f"{name:30s} " + " ".join(cells) + (f" {mean:9.4f}" if mean < float("inf") else f" {'-':>9s}"))


def _mean_nll(results: dict[str, Any], name: str) -> float:
    rows = [results[s][name]["mean_nll"] for s in ("uniform", "hetero") if name in results.get(s, {})]
    return sum(rows) / 2 if len(rows) == 2 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table", "list"])
    parser.add_argument("--set", dest="adapter_set", choices=["uniform", "hetero"], default="uniform")
    parser.add_argument("--only", nargs="*", help="run names (default: every run not done yet)")
    parser.add_argument("--redo", action="store_true", help="score runs again even if recorded")
    args = parser.parse_args()
    if args.command == "run":
        run(args.adapter_set, args.only, args.redo)
    elif args.command == "table":
        table()
    else:
        for name, options in all_runs().items():
            print(f"{name:30s} {options}")


if __name__ == "__main__":
    main()
