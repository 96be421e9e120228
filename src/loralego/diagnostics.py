"""How far a merged adapter is from the exact weighted sum of its inputs, per module and in total.

Everything is computed from thin factors (``O((d_in + d_out) N^2)`` per module, N the ranks involved); no
``d_out x d_in`` matrix is formed. Per module, with ``T = sum_j w_j s_j B_j A_j`` (the target: the exact
weighted sum of the inputs' updates) and ``M`` the merged update (read through ``Adapter.folded``, so any
adapter, whatever its scale, can play "merged"):

- ``relative_error = ||M - T||_F / ||T||_F``: 0 for an exact merge, 1 for a lost module (M = 0).
- ``energy_kept = <M, T>_F / ||T||_F^2``: the part of the target the merge reproduces, measured along the
  target. 1 for an exact merge, 0 for a lost module; for a best rank-k approximation (svd) it equals
  ``||M||^2 / ||T||^2`` = the share of squared singular values kept = ``1 - relative_error^2``. It can
  exceed 1 (the merge overshoots along T) or be negative (it points against T).
- ``cosine = <M, T> / (||M|| ||T||)`` and the norms ``||T||``, ``||M||``, ``||M - T||``.

Totals treat all modules as one block vector: ``sqrt(sum ||M - T||^2 / sum ||T||^2)`` and
``sum <M, T> / sum ||T||^2``. Modules of the inputs absent from the merged adapter count as M = 0;
modules of the merged adapter that no input has are an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, natural_key
from .errors import LoraLegoError, one_line
from .lowrank import frobenius_inner, frobenius_norm_sq
from .msu import Factors, concat
from .safeio import check_destination, refuse_overlap, write_text


def difference_norm(x: Factors, y: Factors) -> float:
    """``||B_x A_x - B_y A_y||_F`` from the factors, in float64.

    Computed as the Frobenius norm of the small core ``R_B R_A^T`` of QRs of the stacked factors
    ``[B_x, -B_y]`` and ``[A_x; A_y]^T``. The expanded form ``||x||^2 - 2<x,y> + ||y||^2`` cancels: its error
    is about ``sqrt(eps) ||y||`` (1e-8 relative), which would hide how exact an exact merge is; the QR form's
    is about ``eps ||y||``.
    """
    (ax, bx), (ay, by) = x, y
    lora_a = torch.cat([ax.double(), ay.double()], dim=0)
    lora_b = torch.cat([bx.double(), -by.double()], dim=1)
    _, r_b = torch.linalg.qr(lora_b)
    _, r_a = torch.linalg.qr(lora_a.T)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


class _Ratios:
    """Relative error and kept energy from the norms and the inner product (shared by a module and the total)."""

    error_norm: float
    target_norm: float
    inner: float

    @property
    def relative_error(self) -> float | None:
        return _ratio(self.error_norm, self.target_norm, zero=0.0 if self.error_norm == 0 else None)

    @property
    def energy_kept(self) -> float | None:
        return _ratio(self.inner, self.target_norm**2)


@dataclass(frozen=True)
class ModuleCheck(_Ratios):
    """The comparison of one module; ``merged_rank`` is None when the merged adapter lacks the module."""

    module: str
    merged_rank: int | None
    target_rank: int
    target_norm: float
    merged_norm: float
    error_norm: float
    inner: float

    @property
    def missing(self) -> bool:
        return self.merged_rank is None

    @property
    def cosine(self) -> float | None:
        return _ratio(self.inner, self.merged_norm * self.target_norm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "missing": self.missing,
            "merged_rank": self.merged_rank,
            "target_rank": self.target_rank,
            "target_norm": self.target_norm,
            "merged_norm": self.merged_norm,
            "error_norm": self.error_norm,
            "relative_error": self.relative_error,
            "energy_kept": self.energy_kept,
            "cosine": self.cosine,
        }


def _ratio(numerator: float, denominator: float, zero: float | None = None) -> float | None:
    """``numerator / denominator``; ``zero`` (default None: undefined) when the denominator is 0."""
    return numerator / denominator if denominator > 0 else zero


@dataclass(frozen=True)
class VerifyReport(_Ratios):
    """Every module's check and the totals over all of them."""

    modules: list[ModuleCheck]
    weights: list[float]
    weight_overrides: list[dict[str, float]] | None = None

    @property
    def target_norm(self) -> float:
        return math.sqrt(sum(m.target_norm**2 for m in self.modules))

    @property
    def merged_norm(self) -> float:
        return math.sqrt(sum(m.merged_norm**2 for m in self.modules))

    @property
    def error_norm(self) -> float:
        return math.sqrt(sum(m.error_norm**2 for m in self.modules))

    @property
    def inner(self) -> float:
        return sum(m.inner for m in self.modules)

    @property
    def missing(self) -> list[str]:
        return [m.module for m in self.modules if m.missing]

    def worst(self, count: int) -> list[ModuleCheck]:
        """The ``count`` modules of largest relative error (undefined ones last); all when count <= 0."""
        ranked = sorted(self.modules, key=lambda m: -(m.relative_error if m.relative_error is not None else -1.0))
        return ranked if count <= 0 else ranked[:count]

    def to_dict(self) -> dict[str, Any]:
        total = {
            "modules": len(self.modules),
            "missing": self.missing,
            "target_norm": self.target_norm,
            "merged_norm": self.merged_norm,
            "error_norm": self.error_norm,
            "relative_error": self.relative_error,
            "energy_kept": self.energy_kept,
        }
        return {
            "weights": self.weights,
            "weight_overrides": self.weight_overrides,
            "total": total,
            "modules": [m.to_dict() for m in self.modules],
        }


def check_module(module: str, merged: Factors | None, target: Factors) -> ModuleCheck:
    """Compare one module's merged factors (None: lost) with the target's (both folded, scale 1)."""
    target_sq = frobenius_norm_sq(target)
    if merged is None:
        norm = math.sqrt(target_sq)
        return ModuleCheck(module, None, target[0].shape[0], norm, 0.0, norm, 0.0)
    return ModuleCheck(
        module,
        merged_rank=merged[0].shape[0],
        target_rank=target[0].shape[0],
        target_norm=math.sqrt(target_sq),
        merged_norm=math.sqrt(frobenius_norm_sq(merged)),
        error_norm=difference_norm(merged, target),
        inner=frobenius_inner(merged, target),
    )


def compared_modules(merged: Adapter, inputs: Sequence[Adapter]) -> list[str]:
    """The modules to compare (the inputs' union); refuse merged modules no input has or of another shape."""
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in inputs:
        for module, info in adapter.modules.items():
            shapes.setdefault(module, (info.d_out, info.d_in))
    extra = sorted(set(merged.modules) - set(shapes), key=natural_key)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise LoraLegoError(f"{merged.name}: module {extra[0]}{more} is in the merged adapter but in no input")
    for module, info in merged.modules.items():
        if (info.d_out, info.d_in) != shapes[module]:
            d_out, d_in = shapes[module]
            raise LoraLegoError(
                f"{merged.name}: module {module} is {info.d_out}x{info.d_in} but the inputs' is {d_out}x{d_in}"
            )
    return sorted(shapes, key=natural_key)


def recorded_weights(merged: Adapter, inputs: Sequence[Adapter]) -> list[float] | None:
    """The weights ``merged`` was made with, from its provenance, when every input is recorded there (by hash)."""
    try:
        recorded = json.loads(merged.metadata.get("loralego.inputs", "[]"))
        by_hash = {entry["sha256"]: float(entry["weight"]) for entry in recorded}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # a tampered record is not used
        return None
    if not all(math.isfinite(weight) for weight in by_hash.values()):
        return None
    if len(recorded) != len(inputs) or any(a.sha256 not in by_hash for a in inputs):
        return None
    return [by_hash[a.sha256] for a in inputs]


def recorded_weight_overrides(merged: Adapter, inputs: Sequence[Adapter]) -> list[dict[str, float]] | None:
    """The per-input weight overrides ``merged`` was made with, when its provenance names these inputs."""
    from .overrides import validate_weight_overrides

    if recorded_weights(merged, inputs) is None:
        return None
    try:
        overrides = json.loads(merged.metadata.get("loralego.options", "{}")).get("weight_overrides")
        overrides = validate_weight_overrides(overrides)
    except (ValueError, TypeError, AttributeError, RecursionError, LoraLegoError):  # tampered: not used
        return None
    return overrides if overrides is not None and len(overrides) <= len(inputs) else None


def verify(
    merged: Adapter,
    inputs: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    weight_overrides: Sequence[dict[str, float]] | None = None,
) -> VerifyReport:
    """Compare ``merged`` with the exact weighted sum of ``inputs``, module by module (one module in memory).

    Without ``weights``: the ones recorded in the merged adapter's provenance when it names these inputs
    (a method may default to 1/n), with their recorded per-module overrides, else 1 for every input.
    ``weight_overrides``: per input, a module pattern -> weight mapping (``--weight-override``).
    """
    from .overrides import module_weight

    if not inputs:
        raise LoraLegoError("verify: no input adapters to compare with")
    if weights is None:
        weights = recorded_weights(merged, inputs)
        if weight_overrides is None:
            weight_overrides = recorded_weight_overrides(merged, inputs)
    weights = list(weights) if weights is not None else [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise LoraLegoError(f"--weights: got {len(weights)} weights for {len(inputs)} adapters")
    overrides = [dict(o) for o in weight_overrides] if weight_overrides else None
    checks = []
    for module in compared_modules(merged, inputs):
        target = concat(
            [a.folded(module, module_weight(weights, overrides, j, module)) for j, a in enumerate(inputs)
             if module in a.modules]
        )
        result = merged.folded(module) if module in merged.modules else None
        checks.append(check_module(module, result, target))
    return VerifyReport(checks, weights, overrides)


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: VerifyReport, top: int = 10) -> str:
    """The human summary: the worst modules by relative error, then the totals."""
    shown = report.worst(top)
    width = max([len("module")] + [len(one_line(m.module)) for m in shown])
    title = "all modules" if len(shown) == len(report.modules) else f"worst {len(shown)} of {len(report.modules)}"
    lines = [
        f"{title} by relative error:",
        f"  {'module':<{width}}  {'k':>5}  {'sum r':>6}  {'||target||':>10}  {'rel.error':>9}  {'energy':>8}",
    ]
    for m in shown:
        rank = "lost" if m.merged_rank is None else str(m.merged_rank)
        lines.append(
            f"  {one_line(m.module):<{width}}  {rank:>5}  {m.target_rank:>6}  {_fmt(m.target_norm):>10}  "
            f"{_fmt(m.relative_error):>9}  {_fmt(m.energy_kept):>8}"
        )
    lost = f"; {len(report.missing)} module(s) lost" if report.missing else ""
    lines.append(
        f"total over {len(report.modules)} modules: relative error {_fmt(report.relative_error)}, "
        f"energy kept {_fmt(report.energy_kept)} (||target|| {_fmt(report.target_norm)}, "
        f"||merged|| {_fmt(report.merged_norm)}){lost}"
    )
    return "\n".join(lines)


def check_json_path(path: str | Path, inputs: Sequence[str | Path], force: bool = False) -> None:
    """Refuse a JSON path that is, contains or lies inside an input, or an existing file --force may not replace."""
    refuse_overlap(path, inputs, "JSON file")
    check_destination(Path(path), folder=False, force=force, kind="json")


def write_json(
    report: VerifyReport, path: str | Path, merged: Adapter, inputs: Sequence[Adapter], *, force: bool = False
) -> None:
    """Write the report with the adapters' names and paths (atomically, never over an input)."""
    data = {
        "merged": str(merged.path) if merged.path else merged.name,
        "inputs": [str(a.path) if a.path else a.name for a in inputs],
        **report.to_dict(),
    }
    paths = [a.path for a in (merged, *inputs) if a.path is not None]
    write_text(path, json.dumps(data, indent=2) + "\n", force=force, kind="json", inputs=paths)
