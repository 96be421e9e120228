"""Plot wall time against n from bench/speed.py ``--json`` files (the scaling sweep), one line per run.

python bench/scaling_plot.py OUT.png results1.json results2.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = Path(sys.argv[1]), sys.argv[2:]
    series: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        for key, rows in json.loads(Path(file).read_text()).items():
            n = int(key.split("/")[0])
            for name, row in rows.items():
                if "seconds" in row and isinstance(row["seconds"], float) and not row.get("timed_out"):
                    series.setdefault(name, []).append((n, row["seconds"]))
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in sorted(series.items()):
        points.sort()
        axes.plot([n for n, _ in points], [s for _, s in points], marker="o", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("adapters merged (n)")
    axes.set_ylabel("wall seconds (whole process)")
    axes.set_title("16 layers x 7 modules, 2048 hidden, rank-8 bf16 inputs")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
