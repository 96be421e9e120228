"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from ..adapters.base import natural_key
from .stats import ModuleStats

# Above these sizes a layer x kind grid is unreadable; the metrics are then drawn along the module order.
_MAX_GRID_KINDS = 30
_MAX_GRID_LAYERS = 80
PANELS_PER_FIGURE = 24


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        from ..errors import LoraLegoError

        raise LoraLegoError("the HTML report needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})  # no version stamp: stable bytes
    return buffer.getvalue()


def _grid(stats: Sequence[ModuleStats], value: str) -> tuple[list[str], list[str], np.ndarray]:
    layers = sorted({s.layer for s in stats}, key=natural_key)
    kinds = sorted({s.kind for s in stats}, key=natural_key)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for s in stats:
        grid[layers.index(s.layer), kinds.index(s.kind)] = getattr(s, value)
    return [layer or "(no layer)" for layer in layers], kinds, grid


def metrics_figure(stats: Sequence[ModuleStats]) -> bytes:
    """Relative error and kept energy per layer and module kind (heat maps), or along the module order."""
    layers = {s.layer for s in stats}
    kinds = {s.kind for s in stats}
    panels = (
        ("relative_error", "relative error  ||merged - target|| / ||target||", "magma_r"),
        ("kept_energy", "kept energy  <merged, target> / ||target||^2", "viridis"),
    )
    if len(kinds) <= _MAX_GRID_KINDS and len(layers) <= _MAX_GRID_LAYERS:
        height = 1.6 + 0.28 * len(layers)
        width = max(7.0, 2.5 + 0.55 * len(kinds)) * 2
        figure = _figure(min(width, 22), min(height, 26))
        axes = figure.subplots(1, 2)
        for ax, (value, title, cmap) in zip(axes, panels, strict=True):
            row_labels, col_labels, grid = _grid(stats, value)
            finite = grid[np.isfinite(grid)]
            high = float(finite.max()) if finite.size else 1.0
            low = min(0.0, float(finite.min())) if finite.size else 0.0
            vmax = max(1.0, high) if value == "kept_energy" else max(high, 1e-12)
            image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=low, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(col_labels)), col_labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
            if grid.size <= 200:
                for (i, j), v in np.ndenumerate(grid):
                    if np.isfinite(v):
                        color = "white" if ((v - low) / (vmax - low) < 0.5) == (value == "kept_energy") else "black"
                        ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color=color)
            figure.colorbar(image, ax=ax, shrink=0.8)
        return _png(figure)
    figure = _figure(12, 5)
    axes = figure.subplots(2, 1, sharex=True)
    order = np.arange(len(stats))
    for ax, (value, title, _) in zip(axes, panels, strict=True):
        ax.plot(order, [getattr(s, value) for s in stats], marker=".", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("module (in name order; see the table below)")
    return _png(figure)


def _sorted_clusters(counts: np.ndarray) -> np.ndarray:
    """Clusters ordered by their dominant adapter, then by size: blocks of one adapter read as blocks."""
    order = sorted(range(counts.shape[0]), key=lambda c: (int(np.argmax(counts[c])), -int(counts[c].sum()), c))
    return counts[order]


def cluster_figures(stats: Sequence[ModuleStats], adapter_names: Sequence[str]) -> list[bytes]:
    """One heat map per merged module (adapters x clusters, cell = units of that adapter in that cluster),
    ``PANELS_PER_FIGURE`` modules per image."""
    clustered = [s for s in stats if s.counts is not None]
    images = []
    for start in range(0, len(clustered), PANELS_PER_FIGURE):
        chunk = clustered[start : start + PANELS_PER_FIGURE]
        columns = min(4, len(chunk))
        rows = -(-len(chunk) // columns)
        height_each = 0.9 + 0.22 * len(adapter_names)
        figure = _figure(4.2 * columns, height_each * rows + 0.4)
        axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
        for ax, s in zip(axes, chunk, strict=False):
            counts = _sorted_clusters(s.counts).T  # adapters x clusters
            vmax = max(int(counts.max()), 1)
            ax.imshow(counts, aspect="auto", cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{s.module}  (k={s.counts.shape[0]}, N={s.pool})", fontsize=7)
            ax.set_yticks(range(len(adapter_names)), list(adapter_names), fontsize=6)
            ax.set_xlabel("cluster (= merged rank), sorted by dominant adapter", fontsize=6)
            ax.tick_params(axis="x", labelsize=5)
            if counts.size <= 160:
                for (i, j), v in np.ndenumerate(counts):
                    if v:
                        ax.text(
                            j,
                            i,
                            str(v),
                            ha="center",
                            va="center",
                            fontsize=5,
                            color="white" if v > vmax / 2 else "black",
                        )
        for ax in axes[len(chunk) :]:
            ax.set_axis_off()
        images.append(_png(figure))
    return images


def norms_figure(stats: Sequence[ModuleStats], norm: str) -> bytes:
    """Histograms of unit norms: pooled inputs, plain cluster means (before reweighting), merged units."""
    series = [("input units (folded)", np.concatenate([s.input_norms for s in stats]), "tab:gray")]
    centroids = [s.centroid_norms for s in stats if s.centroid_norms is not None]
    if centroids:
        series.append(("cluster means, before reweighting", np.concatenate(centroids), "tab:orange"))
    series.append(("merged units, after reweighting", np.concatenate([s.output_norms for s in stats]), "tab:blue"))
    positive = np.concatenate([values[values > 0] for _, values, _ in series])
    figure = _figure(9, 3.6)
    ax = figure.subplots()
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        high = high * 1.01 if high > low else low * 2 + 1e-12
        bins = np.geomspace(low, high, 40)
        for label, values, color in series:
            ax.hist(
                values[values > 0],
                bins=bins,
                histtype="step",
                linewidth=1.4,
                label=f"{label} ({values.size})",
                color=color,
            )
        ax.set_xscale("log")
    ax.set_xlabel("unit norm (" + ("max-abs" if norm == "inf" else "L2") + " of [a; b], the --norm of reweighting)")
    ax.set_ylabel("units")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(figure)
