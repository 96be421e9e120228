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

from ..adapters.base import Adapter
from ..cluster import cluster_means
from ..diagnostics import check_module
from ..methods.base import ModuleResult
from ..msu import Factors, concat, to_units
from ..options import MergeOptions


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
    values = units.abs().amax(dim=1) if norm == "inf" else units.norm(dim=1)
    return values.double().cpu().numpy()


def _number(value: float | None) -> float:
    """Undefined ratios (a zero target) become NaN: blank in the heat maps, 'nan' in the table."""
    return math.nan if value is None else float(value)


def _nonzero(norms: np.ndarray) -> np.ndarray:
    """Drop all-zero units: the padding of ``--target vllm``, which is not part of the merge."""
    return norms[norms > 0]


def _mean_variant(method: str, options: MergeOptions) -> tuple[bool, str] | None:
    """``(use means, gauge)`` of a rank-wise method, or None: plain centroid norms exist only for means."""
    if method not in ("lego", "lego+"):
        return None
    try:
        from ..methods.lego import PAPER, PLUS, LegoVariant
    except ImportError:  # the paper-faithful lego only
        return (True, "none") if method == "lego" else None
    variant = LegoVariant.resolve(options, PAPER if method == "lego" else PLUS)
    return (variant.representative == "mean", variant.gauge)


def plain_centroids(units: torch.Tensor, labels: torch.Tensor, k: int, d_in: int, gauge: str) -> torch.Tensor:
    """The cluster means a mean-representative merge takes before reweighting them."""
    if gauge == "balanced":
        from ..methods.lego import balance_gauge

        units = balance_gauge(units, d_in)
    if k >= units.shape[0] and torch.equal(labels.cpu(), torch.arange(units.shape[0])):
        return units
    return cluster_means(units, labels.to(units.device), k)[0]


def module_stats(
    module: str,
    target_parts: list[Factors],
    unit_owner: list[int],
    merged: Factors,
    details: dict[str, Any],
    *,
    n_adapters: int,
    method: str,
    options: MergeOptions,
) -> ModuleStats:
    """Everything the report shows about one module, from the folded input factors and the merged ones."""
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
        input_norms=unit_norms(units, options.norm),
        output_norms=_nonzero(unit_norms(to_units(*merged), options.norm)),
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
        variant = _mean_variant(method, options)
        if variant is not None and variant[0]:
            stats.centroid_norms = unit_norms(
                plain_centroids(units, labels, k, target[0].shape[1], variant[1]), options.norm
            )
    return stats


@dataclass
class ReportCollector:
    """Collects :class:`ModuleStats` during a merge: pass :meth:`on_module` as ``merge_to_folder``'s callback.

    It reads each module's input factors once more (folded with the same weights), so the merge itself is
    unchanged; ``seconds`` is the time spent here.
    """

    adapters: list[Adapter]
    options: MergeOptions
    method: str = ""
    modules: list[ModuleStats] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.method = self.method or self.options.method
        self.weights = list(self.options.weights) if self.options.weights is not None else [1.0] * len(self.adapters)

    def on_module(self, module: str, result: ModuleResult) -> None:
        start = time.perf_counter()
        owners = [j for j, adapter in enumerate(self.adapters) if module in adapter.modules]
        parts = [self.adapters[j].folded(module, self.weights[j]) for j in owners]
        unit_owner = [j for j in owners for _ in range(self.adapters[j].modules[module].rank)]
        self.modules.append(
            module_stats(
                module,
                parts,
                unit_owner,
                (result.lora_a, result.lora_b),
                result.details,
                n_adapters=len(self.adapters),
                method=self.method,
                options=self.options,
            )
        )
        self.seconds += time.perf_counter() - start
