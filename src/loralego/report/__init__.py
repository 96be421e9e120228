"""The visual merge report: ``loralego merge --report report.html`` and ``loralego report MERGED INPUTS...``.

``stats`` computes the numbers per module (from thin factors), ``plots`` draws them (matplotlib Agg),
``html`` assembles one self-contained page (PNGs embedded as base64 data URIs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapters import Adapter, load
from ..errors import LoraLegoError
from ..methods import METHODS
from ..options import MergeOptions, make_options
from ..safeio import MAX_METADATA_VALUE_BYTES, check_destination, parse_json, refuse_overlap, write_text
from .html import ReportPage, render
from .plots import cluster_figures, metrics_figure, norms_figure
from .stats import ModuleStats, ReportCollector, module_stats

__all__ = ["ReportCollector", "check_report_path", "report_existing", "write_merge_report"]


def check_report_path(
    path: str | Path, force: bool, inputs: Sequence[str | Path] = (), output: str | Path | None = None
) -> None:
    """Refuse, before any work is done, a report path that is an input or inside one (or the merge's output),
    or an existing file that --force may not replace (the write itself is atomic)."""
    path = Path(path)
    if path.is_dir():
        raise LoraLegoError(f"{path}: report path is a folder, expected an .html file")
    refuse_overlap(path, [*inputs, *([output] if output is not None else [])], "report")
    try:
        check_destination(path, folder=False, force=force, kind="html")
    except LoraLegoError as error:
        raise LoraLegoError(str(error).replace("output file already exists", "report file already exists")) from None


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
) -> float:
    if not stats:
        raise LoraLegoError("the report has no modules to show")
    start = time.perf_counter()
    metrics = metrics_figure(stats)
    clusters = cluster_figures(stats, names)
    norms = norms_figure(stats, norm)
    seconds = time.perf_counter() - start
    page.timings.append(("report rendering", seconds))
    write_text(path, render(page, stats, metrics, clusters, norms, cluster_note), force=force, kind="html")
    return seconds


def write_merge_report(
    path: str | Path,
    collector: ReportCollector,
    *,
    method: str,
    options: MergeOptions,
    command: str,
    output: str | Path,
    merge_seconds: float,
    force: bool = False,
) -> Path:
    """The report of a merge that just ran with ``collector.on_module`` as its callback."""
    path = Path(path)
    weights = list(options.weights) if options.weights is not None else [1.0] * len(collector.adapters)
    page = ReportPage(
        title=f"loralego merge report: {Path(output).name}",
        command=command,
        timings=[("merge (with report statistics)", merge_seconds), ("report statistics", collector.seconds)],
        facts=[
            ("output", str(output)),
            ("method", method),
            ("modules", str(len(collector.modules))),
            ("loralego", __version__),
        ],
        inputs=_input_rows(collector.adapters, weights),
        options_json=json.dumps(options.model_dump(mode="json", exclude={"force"}), indent=2, sort_keys=True),
    )
    names = [a.name for a in collector.adapters]
    _render_to(path, page, collector.modules, names, options.norm, _cluster_note(collector.modules), force)
    return path


def _metadata_json(meta: dict[str, Any], key: str, where: str) -> Any:
    """A JSON value from the merged file's metadata, bounded like any untrusted input; None when absent."""
    raw = meta.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > MAX_METADATA_VALUE_BYTES:
        raise LoraLegoError(f"{where}: metadata {key} is not a JSON string of at most {MAX_METADATA_VALUE_BYTES} bytes")
    return parse_json(raw, f"{where}: metadata {key}")


def _recorded_inputs(value: Any, where: str) -> list[dict[str, Any]]:
    """``loralego.inputs``: a list of ``{name, sha256, weight}`` with the right types, else refused."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise LoraLegoError(f"{where}: metadata loralego.inputs must be a list of objects")
    for entry in value:
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LoraLegoError(f"{where}: metadata loralego.inputs: weight must be a finite number, got {weight!r}")
        for key in ("name", "sha256"):
            if not isinstance(entry.get(key, ""), (str, type(None))):
                raise LoraLegoError(f"{where}: metadata loralego.inputs: {key} must be a string")
    return value


def _recorded(merged: Adapter, inputs: list[Adapter], notes: list[str]) -> tuple[str | None, MergeOptions]:
    """The method and options recorded in the merged file's metadata (validated like any input: a tampered
    record is refused, not trusted; absent, defaults are assumed)."""
    meta = merged.metadata
    where = str(merged.path or merged.name)
    method = meta.get("loralego.method")
    if method is not None and (not isinstance(method, str) or len(method) > 100):
        raise LoraLegoError(f"{where}: metadata loralego.method is not a method name")
    recorded_options = _metadata_json(meta, "loralego.options", where)
    if recorded_options is None:
        options = MergeOptions()
    elif not isinstance(recorded_options, dict):
        raise LoraLegoError(f"{where}: metadata loralego.options must be a JSON object")
    else:
        try:
            options = make_options(None, **{str(key): value for key, value in recorded_options.items()})
        except LoraLegoError as error:
            raise LoraLegoError(f"{where}: metadata loralego.options: {error}") from None
    if method is None:
        notes.append(f"{merged.path}: no loralego merge record in its metadata; input weights of 1 are assumed.")
    recorded = _recorded_inputs(_metadata_json(meta, "loralego.inputs", where), where)
    if recorded and len(recorded) == len(inputs):
        for index, (entry, adapter) in enumerate(zip(recorded, inputs, strict=True)):
            if entry.get("sha256") and adapter.sha256 and entry["sha256"] != adapter.sha256:
                notes.append(
                    f"Input {index} ({adapter.name}) is not the file the merge recorded ({entry.get('name')}, "
                    f"sha256 {entry['sha256'][:16]}...): the figures compare against different inputs."
                )
        if options.weights is None:
            options = make_options(options, weights=[float(entry.get("weight", 1.0)) for entry in recorded])
    elif recorded:
        notes.append(f"The merge recorded {len(recorded)} inputs but {len(inputs)} were given.")
    if options.weights is not None and len(options.weights) != len(inputs):
        options = make_options(options, weights=None)
    return method, options


def _reproduces(stored: tuple[torch.Tensor, torch.Tensor], recomputed: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether recomputed factors equal the stored ones (after the same cast; zero units padded by --target vllm
    beyond the recomputed rank)."""
    k = recomputed[0].shape[0]
    stored_a = stored[0].reshape(stored[0].shape[0], -1)
    stored_b = stored[1].reshape(stored[1].shape[0], -1)
    if stored_a.shape[0] < k or stored_a.shape[1] != recomputed[0].shape[1]:
        return False
    if bool(stored_a[k:].any()) or bool(stored_b[:, k:].any()):
        return False
    for mine, theirs in ((recomputed[0], stored_a[:k]), (recomputed[1], stored_b[:, :k])):
        mine = mine.to(theirs.dtype).float()
        scale = float(theirs.float().abs().max()) or 1.0
        if not torch.allclose(mine, theirs.float(), rtol=1e-3, atol=1e-5 * scale):
            return False
    return True


def report_existing(
    merged_spec: str | Path,
    input_specs: Sequence[str | Path],
    out: str | Path,
    *,
    command: str,
    force: bool = False,
) -> Path:
    """A report for a merge made earlier: the merged adapter against its inputs. Cluster heat maps come from
    re-running the recorded method and options (a rank-wise merge is deterministic for a seed); a module
    whose recomputed factors do not equal the stored ones gets no heat map, with a note."""
    from ..pipeline import merge_module, plan_merge

    out = Path(out)
    start = time.perf_counter()
    merged = load(merged_spec)
    inputs = [load(spec) for spec in input_specs]
    check_report_path(out, force, [a.path for a in (merged, *inputs) if a.path is not None])
    notes: list[str] = []
    method, options = _recorded(merged, inputs, notes)
    weights = list(options.weights) if options.weights is not None else [1.0] * len(inputs)
    plan = None
    if method in METHODS:
        try:
            plan = plan_merge(inputs, make_options(options, method=method, force=True, target=None, format=None))
        except LoraLegoError as error:
            notes.append(f"The recorded merge could not be re-run on these inputs ({error}); no cluster heat maps.")
    missing = [m for m in merged.modules if not any(m in a.modules for a in inputs)]
    if missing:
        notes.append(f"{len(missing)} merged module(s) are in none of the inputs and are left out: {missing[0]}, ...")
    stats: list[ModuleStats] = []
    unreproduced = 0
    rerun_seconds = 0.0
    for module in merged.modules:
        owners = [j for j, a in enumerate(inputs) if module in a.modules]
        if not owners:
            continue
        details: dict = {}
        if plan is not None:
            tick = time.perf_counter()
            result = merge_module(plan, module)
            rerun_seconds += time.perf_counter() - tick
            if _reproduces(merged.stored(module), (result.lora_a.cpu(), result.lora_b.cpu())):
                details = result.details
            else:
                unreproduced += 1
        parts = [inputs[j].folded(module, weights[j]) for j in owners]
        unit_owner = [j for j in owners for _ in range(inputs[j].modules[module].rank)]
        stats.append(
            module_stats(
                module,
                parts,
                unit_owner,
                merged.folded(module),
                details,
                n_adapters=len(inputs),
                method=method or "",
                options=options,
            )
        )
    extra = None
    if plan is not None and unreproduced:
        extra = (
            f"{unreproduced} module(s) were not reproduced by re-running the recorded options (other inputs, "
            "version or hardware?) and have no heat map."
        )
    elif plan is not None and any(s.counts is not None for s in stats):
        extra = (
            "Recomputed by re-running the recorded method and options; "
            "every shown module reproduced the stored factors."
        )
    elif method not in METHODS and method is not None:
        extra = f"The recorded method {method!r} is unknown to this version: no cluster heat maps."
    page = ReportPage(
        title=f"loralego merge report: {Path(str(merged_spec)).name}",
        command=command,
        timings=[("statistics (with re-run of the merge)", time.perf_counter() - start), ("re-run", rerun_seconds)],
        facts=[
            ("merged adapter", str(merged.path or merged_spec)),
            ("method", method or "unknown"),
            ("modules", str(len(stats))),
            ("loralego", __version__),
        ],
        inputs=_input_rows(inputs, weights),
        options_json=json.dumps(options.model_dump(mode="json", exclude={"force"}), indent=2, sort_keys=True),
        notes=notes,
    )
    _render_to(out, page, stats, [a.name for a in inputs], options.norm, _cluster_note(stats, extra), force)
    return out
