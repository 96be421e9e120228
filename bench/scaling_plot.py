"""Plot and tabulate time against n from bench/speed.py ``--json`` files (the scaling sweep), one line per run.

    python bench/scaling_plot.py OUT.png results1.json results2.json ... [--metric cpu_seconds|seconds]

Later files override earlier ones for the same (n, run), except that an n keeps its first floor and a run killed
by the timeout never replaces a completed one. Runs killed by ``--timeout`` are left out of the plot and
shown as ``> T`` in the tables. The first table (markdown, printed) gives CPU and wall seconds, the CPU ratio to
the same n's floor, the peak RSS and the load average at the end of the run; the second, one row per n.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(files: list[Path]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for file in files:
        for key, runs in json.loads(file.read_text()).items():
            n = int(key.split("/")[0])
            for name, row in runs.items():
                if not (isinstance(row, dict) and isinstance(row.get("seconds"), float)):
                    continue
                known = rows.setdefault(n, {}).get(name)
                # The first floor of an n stays (the ratios are to the first sweep's); a run killed by --timeout
                # never replaces a completed one.
                if known is not None and (name == "floor" or (row.get("timed_out") and not known.get("timed_out"))):
                    continue
                rows[n][name] = row
    return dict(sorted(rows.items()))


def table(rows: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| n | run | cpu s | cpu / floor cpu | wall s | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, runs in rows.items():
        floor = runs.get("floor", {}).get("cpu_seconds")
        for name, row in runs.items():
            killed = "> " if row.get("timed_out") else ""
            ratio = f"{killed}{row['cpu_seconds'] / floor:.2f}" if floor else ""
            load_avg = "/".join(f"{x:.1f}" for x in row.get("load", []))
            lines.append(
                f"| {n} | {name} | {killed}{row['cpu_seconds']:.2f} | {ratio} | {killed}{row['seconds']:.2f} | "
                f"{row['rss_mb']:.0f} | {load_avg} |"
            )
    return "\n".join(lines)


def pivot(rows: dict[int, dict[str, Any]]) -> str:
    """One row per n, one column per run: CPU seconds and, in brackets, the ratio to the floor's CPU seconds."""
    names = list(dict.fromkeys(name for runs in rows.values() for name in runs))
    lines = ["| n | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n, runs in rows.items():
        floor = runs.get("floor", {}).get("cpu_seconds")
        cells = []
        for name in names:
            row = runs.get(name)
            if row is None:
                cells.append("not run")
                continue
            killed = "> " if row.get("timed_out") else ""
            ratio = f" ({killed}{row['cpu_seconds'] / floor:.1f}x)" if floor and name != "floor" else ""
            cells.append(f"{killed}{row['cpu_seconds']:.2f}{ratio}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--metric", choices=["cpu_seconds", "seconds"], default="cpu_seconds")
    parser.add_argument("--title", default="16 layers x 7 modules, 2048 hidden, rank-8 bf16 inputs, --rank 16")
    opts = parser.parse_args()
    rows = load(opts.files)
    print(table(rows))
    print()
    print(pivot(rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for n, runs in rows.items():
        for name, row in runs.items():
            if not row.get("timed_out"):
                series.setdefault(name, []).append((n, row[opts.metric]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    tab10 = plt.get_cmap("tab10").colors
    colors = [c for j, c in enumerate(tab10) if j != 7] + list(plt.get_cmap("Dark2").colors)  # no grey: floors
    markers = "osD^vP*Xh<>"
    for i, (name, points) in enumerate(sorted(series.items())):
        style = "--" if name.startswith("floor") else "-"
        color = "black" if name == "floor" else "grey" if name.startswith("floor") else colors[i % len(colors)]
        axes.plot(
            [n for n, _ in points],
            [s for _, s in points],
            style,
            marker=markers[i % len(markers)],
            color=color,
            label=name,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("adapters merged (n)")
    label = "CPU seconds" if opts.metric == "cpu_seconds" else "wall seconds"
    axes.set_ylabel(f"{label} (whole process)")
    axes.set_title(opts.title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(opts.out, dpi=110)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
