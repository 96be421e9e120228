"""The numbers of a merge report, per module, from thin factors (no ``d_out x d_in`` matrix is formed).

- relative error and kept energy of the merged update against the target (the exact weighted sum of the
  inputs' updates), as ``loralego verify`` defines them (:mod:`loralego.diagnostics`):
  ``||M - T||_F / ||T||_F`` and ``<M, T>_F / ||T||_F^2``;
- for rank-wise merges (lego): which inputs' units fell into each cluster (counts, clusters x adapters);
- unit norms (the norm of parameter reweighting, ``--norm``): the pooled input units, the plain cluster means
  before reweighting (when the method uses means), and the merged units after reweighting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..diagnostics import ModuleCheck, VerifyReport, check_module
from ..methods.base import ModuleResult
from ..msu import Factors, concat, to_units
from ..msu import unit_norms as _unit_norms
from ..plan import MergePlan


@dataclass
class ModuleStats:
    module: str
    layer: str
    kind: str
    pool: int
    rank: int
    target_norm: float
    relative_error: float
    kept_energy: float
    input_norms: np.ndarray
    output_norms: np.ndarray
    check: ModuleCheck  # the same figures as ``loralego verify``
    centroid_norms: np.ndarray | None = None
    counts: np.ndarray | None = None  # clusters x adapters (global adapter indices)


def layer_and_kind(module: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``("model.layers.3", "self_attn.q_proj")``; the layer is the
    name up to its first numeric part (``lora_unet_down_blocks_0``), the kind the rest."""
    sep = "." if "." in module else "_"
    parts = module.split(sep)
    for index, part in enumerate(parts):
        if part.isdigit():
            return sep.join(parts[: index + 1]), sep.join(parts[index + 1 :]) or parts[index]
    return "", module


def unit_norms(units: torch.Tensor, norm: str) -> np.ndarray:
    return _unit_norms(units, norm).double().cpu().numpy()


def _number(value: float | None) -> float:
    """Undefined ratios (a zero target) become NaN: blank in the heat maps, 'nan' in the table."""
    return math.nan if value is None else float(value)


def _nonzero(norms: np.ndarray) -> np.ndarray:
    """Drop all-zero units: the padding of ``--target vllm``, which is not part of the merge."""
    return norms[norms > 0]


def module_stats(
    module: str,
    target_parts: list[Factors],
    unit_owner: list[int],
    merged: Factors,
    details: dict[str, Any],
    *,
    n_adapters: int,
    norm: str,
) -> ModuleStats:
    """Everything the report shows about one module, from the folded input factors, the merged ones (as
    written) and what the method returned in ``details`` (cluster labels, plain centroid norms)."""
    target = concat(target_parts)
    merged = (merged[0].float().cpu(), merged[1].float().cpu())
    units = to_units(*target)
    layer, kind = layer_and_kind(module)
    check = check_module(module, merged, target)
    stats = ModuleStats(
        module=module,
        layer=layer,
        kind=kind,
        pool=int(target[0].shape[0]),
        rank=int(merged[0].shape[0]),
        target_norm=check.target_norm,
        relative_error=_number(check.relative_error),
        kept_energy=_number(check.energy_kept),
        input_norms=unit_norms(units, norm),
        output_norms=_nonzero(unit_norms(to_units(*merged), norm)),
        check=check,
    )
    labels = details.get("labels")
    if labels is not None and len(labels) == units.shape[0]:
        labels = torch.as_tensor(labels).long().cpu()
        owner = torch.as_tensor(details.get("unit_adapter", unit_owner)).long().cpu()
        k = int(labels.max()) + 1 if labels.numel() else 0
        k = max(k, stats.rank)
        counts = np.zeros((k, n_adapters), dtype=np.int64)
        np.add.at(counts, (labels.numpy(), owner.numpy()), 1)
        stats.counts = counts
    if details.get("centroid_norms") is not None:
        stats.centroid_norms = np.asarray(details["centroid_norms"], dtype=np.float64)
    return stats


def report_norm(plan: MergePlan) -> str:
    """The norm unit sizes are shown in: the method's parameter reweighting norm where it has one."""
    return str(getattr(plan.params, "norm", "inf"))


@dataclass
class ReportCollector:
    """Collects :class:`ModuleStats` during a merge: pass :meth:`on_module` as the pipeline's callback.

    It reads each module's input factors once more (folded with the plan's weights), so the merge itself is
    unchanged; ``seconds`` is the time spent here.
    """

    plan: MergePlan
    modules: list[ModuleStats] = field(default_factory=list)
    seconds: float = 0.0

    def on_module(self, module: str, result: ModuleResult, stored: tuple[torch.Tensor, torch.Tensor]) -> None:
        start = time.perf_counter()
        plan = self.plan
        spec = plan.modules[module]
        owners = spec.adapter_indices
        parts = [plan.adapters[j].folded(module, w) for j, w in zip(owners, spec.weights, strict=True)]
        unit_owner = [j for j in owners for _ in range(plan.adapters[j].modules[module].rank)]
        merged = (stored[0].reshape(stored[0].shape[0], -1), stored[1].reshape(stored[1].shape[0], -1))
        self.modules.append(
            module_stats(
                module,
                parts,
                unit_owner,
                merged,
                result.details,
                n_adapters=len(plan.adapters),
                norm=report_norm(plan),
            )
        )
        self.seconds += time.perf_counter() - start

    def figures(self) -> VerifyReport:
        """The merge's figures as ``loralego verify`` computes them from the written file."""
        overrides = self.plan.options.weight_overrides
        return VerifyReport([stats.check for stats in self.modules], list(self.plan.weights), overrides)
