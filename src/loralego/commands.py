"""One code path for ``loralego merge`` and ``loralego run recipe.yaml``: the same inputs and options give
the same output bytes whichever way they were given (tested)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .adapters import load
from .adapters.peft import CONFIG_NAME
from .errors import one_line
from .options import MergeOptions
from .pipeline import MergePlan, merge_to_folder
from .progress import Progress, peak_rss_mb


def execute_merge(
    inputs: Sequence[str],
    out: str | Path,
    options: MergeOptions,
    *,
    command: str,
    report: str | Path | None = None,
    recipe_text: str | None = None,
    quiet: bool = False,
) -> MergePlan:
    """Load, merge, write (and report); print what was done unless ``quiet``."""
    from .recipe import RECIPE_FILE

    if report is not None:
        from .report import check_report_path
    started = time.perf_counter()
    adapters = [load(path) for path in inputs]
    if report is not None:  # the report may not land on an input (or its weights) nor on the output
        check_report_path(report, options.force, [a.path for a in adapters if a.path is not None], out)
    collector = None
    if report is not None:
        from .report import ReportCollector

        collector = ReportCollector(adapters, options)
    progress = None if quiet else Progress(len({module for adapter in adapters for module in adapter.modules}))
    callbacks = [c for c in (collector.on_module if collector is not None else None, progress) if c is not None]
    start = time.perf_counter()
    try:
        plan = merge_to_folder(
            adapters,
            out,
            options,
            command=command,
            on_module=(lambda module, result: [c(module, result) for c in callbacks]) if callbacks else None,
            extra_files={RECIPE_FILE: recipe_text} if recipe_text is not None else None,
        )
    finally:  # end the progress line before any error or summary is printed
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start
    for warning in plan.warnings:
        print(f"loralego: warning: {one_line(warning)}", file=sys.stderr)
    if collector is not None and report is not None:
        from .report import write_merge_report

        write_merge_report(
            report,
            collector,
            method=plan.method.name,
            options=plan.options,
            command=command,
            output=out,
            merge_seconds=seconds,
            force=plan.options.force,
        )
    if not quiet:
        rank = plan.rank if plan.rank is not None else "exact"
        print(
            f"merged {len(adapters)} adapters with {plan.method.name} (rank {rank}) into {one_line(str(out))}: "
            f"{len(plan.modules)} modules in {time.perf_counter() - started:.2f} s (reading included), "
            f"peak memory {peak_rss_mb():.0f} MB"
        )
        if report is not None:
            print(f"report: {one_line(str(report))}")
    if plan.options.target == "vllm" and not quiet:
        served = json.loads((Path(out) / CONFIG_NAME).read_text(encoding="utf-8"))["r"]
        padded = "" if plan.rank in (None, served) else f" (rank {plan.rank} padded with zero units to {served})"
        print(f"vLLM: serve with --enable-lora --max-lora-rank {served}{padded}")
    return plan
