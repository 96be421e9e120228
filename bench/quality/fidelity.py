"""How far each merge is from the exact average ensemble, in weight space (no model, no scoring).

  python bench/quality/fidelity.py     # writes results/fidelity.json; report.py turns it into a table

For every module: the squared relative error ||M - E||^2 / ||E||^2 and the norm ratio ||M|| / ||E||, where E is
the exact average of the task updates (cat at w = 1/n) and M the merged update; both from thin factors, no
dense matrix (``loralego.diagnostics.verify``). Means over modules, seed 0, k = 16, every method of
evaluate.METHODS at its default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate import METHODS, RESULTS, K, adapter_paths  # noqa: E402
from variants import route  # noqa: E402

import loralego  # noqa: E402
from loralego.diagnostics import verify  # noqa: E402


def merges(n: int) -> dict[str, dict]:
    average = [1.0 / n] * n
    runs = {
        "linear": {"method": "linear", "weights": average},
        f"svd_avg_k{K}": {"method": "svd", "rank": K, "weights": average},
    }
    runs.update({f"{prefix}_k{K}": {**options, "rank": K, "seed": 0} for prefix, (options, _, _) in METHODS.items()})
    return runs


def fidelity(merged: loralego.Adapter, inputs: list[loralego.Adapter]) -> dict[str, float]:
    """Means over modules of the squared relative error and the norm ratio against the average ensemble."""
    n = len(inputs)
    checks = verify(merged, inputs, [1.0 / n] * n).modules
    errors = [check.relative_error**2 for check in checks]
    ratios = [check.merged_norm / check.target_norm for check in checks]
    return {"rel_error_sq": sum(errors) / len(errors), "norm_ratio": sum(ratios) / len(ratios)}


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for adapter_set in ("uniform", "hetero"):
        inputs = [loralego.load(path) for path in adapter_paths(adapter_set)]
        out[adapter_set] = {}
        for name, options in merges(len(inputs)).items():
            if options["method"] == "linear" and adapter_set == "hetero":
                continue  # equal ranks only
            merged = loralego.merge(inputs, device="cpu", **route(options))
            out[adapter_set][name] = fidelity(merged, inputs)
            row = out[adapter_set][name]
            print(f"{adapter_set:8s} {name:24s} rel.err^2 {row['rel_error_sq']:.3f}  norm {row['norm_ratio']:.3f}")
    (RESULTS / "fidelity.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
