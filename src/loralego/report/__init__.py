"""The visual merge report: ``loralego merge --report report.html`` and ``loralego report MERGED INPUTS...``.

``stats`` computes the numbers per module (from thin factors), ``plots`` draws them (matplotlib Agg),
``html`` assembles one self-contained page (PNGs embedded as base64 data URIs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapters import Adapter, load
from ..adapters.singlefile import write_text_atomically
from ..diagnostics import (
    ModuleCheck,
    VerifyReport,
    check_module,
    compared_modules,
    recorded_weight_overrides,
    recorded_weights,
)
from ..errors import LoraLegoError
from ..methods import METHODS
from ..msu import concat
from ..overrides import module_weight
from ..pipeline import recorded_options
from ..plan import MergePlan
from .html import ReportPage, render
from .plots import cluster_figures, metrics_figure, norms_figure
from .stats import ModuleStats, ReportCollector, module_stats, report_norm

__all__ = ["ReportCollector", "check_report_path", "report_existing", "write_merge_report"]


def figures_path(path: str | Path) -> Path:
    """Where the report's figures go as JSON: ``report.html`` -> ``report.json``."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


def check_report_path(path: str | Path, force: bool) -> None:
    """Refuse an existing report (or its JSON) before any work is done (the writes themselves are atomic)."""
    for file in (Path(path), figures_path(path)):
        if file.is_dir():
            raise LoraLegoError(f"{file}: report path is a folder, expected a file")
        if file.exists() and not force:
            raise LoraLegoError(f"{file}: report file already exists (use --force to replace it)")


def _input_rows(adapters: Sequence[Adapter], weights: Sequence[float]) -> list[dict[str, str]]:
    return [
        {
            "#": str(j),
            "adapter": a.name,
            "format": a.format,
            "modules": str(len(a.modules)),
            "ranks": ", ".join(str(r) for r in sorted({i.rank for i in a.modules.values()})),
            "weight": f"{w:g}",
            "sha256": (a.sha256 or "")[:16],
            "path": str(a.path or ""),
        }
        for j, (a, w) in enumerate(zip(adapters, weights, strict=True))
    ]


def _cluster_note(stats: Sequence[ModuleStats], extra: str | None = None) -> str | None:
    shown = sum(s.counts is not None for s in stats)
    if not shown:
        return extra or "This method does not cluster units: no cluster heat maps."
    note = (
        f"{shown} merged module(s). Rows: input adapters; columns: clusters (each one rank of the merged LoRA); "
        "cell: how many of that adapter's rank-1 units fell into that cluster."
    )
    return f"{note} {extra}" if extra else note


def _render_to(
    path: Path,
    page: ReportPage,
    stats: Sequence[ModuleStats],
    names: Sequence[str],
    norm: str,
    cluster_note: str | None,
    force: bool,
    figures: dict[str, Any],
) -> float:
    """Write the HTML page and, beside it, its figures as JSON (the fields of ``verify --json``)."""
    if not stats:
        raise LoraLegoError("the report has no modules to show")
    start = time.perf_counter()
    metrics = metrics_figure(stats)
    clusters = cluster_figures(stats, names)
    norms = norms_figure(stats, norm)
    seconds = time.perf_counter() - start
    page.timings.append(("report rendering", seconds))
    write_text_atomically(figures_path(path), json.dumps(figures, indent=2) + "\n", force=force)
    write_text_atomically(path, render(page, stats, metrics, clusters, norms, cluster_note), force=force)
    return seconds


def _figures(report: VerifyReport, merged: str, inputs: Sequence[Adapter]) -> dict[str, Any]:
    """The JSON ``loralego verify --json`` writes for the same merge."""
    return {"merged": merged, "inputs": [str(a.path) if a.path else a.name for a in inputs], **report.to_dict()}


def write_merge_report(
    path: str | Path,
    collector: ReportCollector,
    *,
    command: str,
    output: str | Path,
    merge_seconds: float,
) -> Path:
    """The report of a merge that just ran with ``collector.on_module`` as its callback."""
    path = Path(path)
    plan: MergePlan = collector.plan
    page = ReportPage(
        title=f"loralego merge report: {Path(output).name}",
        command=command,
        timings=[("merge (with report statistics)", merge_seconds), ("report statistics", collector.seconds)],
        facts=[
            ("output", str(output)),
            ("method", plan.method.name),
            ("modules", str(len(collector.modules))),
            ("loralego", __version__),
        ],
        inputs=_input_rows(plan.adapters, plan.weights),
        options_json=json.dumps(recorded_options(plan), indent=2, sort_keys=True),
    )
    names = [a.name for a in plan.adapters]
    figures = _figures(collector.figures(), str(output), plan.adapters)
    note = _cluster_note(collector.modules)
    _render_to(path, page, collector.modules, names, report_norm(plan), note, plan.options.force, figures)
    return path


def report_existing(
    merged_spec: str | Path,
    input_specs: Sequence[str | Path],
    out: str | Path,
    *,
    command: str,
    force: bool = False,
) -> Path:
    """A report for a merge made earlier: the merged adapter against its inputs, at the weights the merge
    recorded for them (else 1). Only the files are read: nothing is re-run, so there are no cluster heat maps
    (``loralego merge --report`` has them, from the merge itself)."""
    out = Path(out)
    check_report_path(out, force)
    start = time.perf_counter()
    merged = load(merged_spec)
    inputs = [load(spec) for spec in input_specs]
    notes: list[str] = []
    weights = recorded_weights(merged, inputs)
    if weights is None:
        notes.append(
            f"{merged.path or merged.name}: its merge record does not name these inputs (by hash); "
            "input weights of 1 are assumed."
        )
        weights = [1.0] * len(inputs)
    overrides = recorded_weight_overrides(merged, inputs)
    recorded = merged.metadata.get("loralego.options")
    norm = "inf"
    try:
        parameters = json.loads(recorded).get("parameters", {}) if recorded else {}
        if parameters.get("norm") in ("inf", "2"):
            norm = parameters["norm"]
    except (ValueError, AttributeError):
        notes.append("The merge options recorded in the metadata could not be read.")
    stats: list[ModuleStats] = []
    checks: list[ModuleCheck] = []
    for module in compared_modules(merged, inputs):
        owners = [j for j, a in enumerate(inputs) if module in a.modules]
        parts = [inputs[j].folded(module, module_weight(weights, overrides, j, module)) for j in owners]
        if module not in merged.modules:  # counted as lost in the figures, as verify does
            notes.append(f"Module {module} of the inputs is missing from the merged adapter.")
            checks.append(check_module(module, None, concat(parts)))
            continue
        unit_owner = [j for j in owners for _ in range(inputs[j].modules[module].rank)]
        stats.append(
            module_stats(module, parts, unit_owner, merged.folded(module), {}, n_adapters=len(inputs), norm=norm)
        )
        checks.append(stats[-1].check)
    method = merged.metadata.get("loralego.method") or "unknown"
    page = ReportPage(
        title=f"loralego merge report: {Path(str(merged_spec)).name}",
        command=command,
        timings=[("statistics", time.perf_counter() - start)],
        facts=[
            ("merged adapter", str(merged.path or merged_spec)),
            ("method", method),
            ("modules", str(len(stats))),
            ("loralego", __version__),
        ],
        inputs=_input_rows(inputs, weights),
        options_json=recorded or "{}",
        notes=notes,
    )
    extra = None
    if method in METHODS and METHODS[method].clusters:
        extra = "A report of an earlier merge reads only the files: `loralego merge --report` shows the clusters."
    figures = _figures(VerifyReport(checks, weights, overrides), str(merged.path or merged_spec), inputs)
    _render_to(out, page, stats, [a.name for a in inputs], norm, _cluster_note(stats, extra), force, figures)
    return out
