"""One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no script, nothing fetched."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from .stats import ModuleStats

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
code, pre { font: 12px/1.4 ui-monospace, monospace; background: #f5f5f5; }
pre { padding: 8px; overflow-x: auto; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f0f0f0; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0; border: 1px solid #eee; }
.note { color: #555; font-size: 13px; } .warn { color: #a40; }
"""


@dataclass
class ReportPage:
    """What the page shows besides the figures."""

    title: str
    command: str
    timings: list[tuple[str, float]]
    facts: list[tuple[str, str]]
    inputs: list[dict[str, str]]
    options_json: str
    notes: list[str] = field(default_factory=list)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(str(v))}</td>' if i in numeric else f"<td>{html.escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(
    page: ReportPage,
    stats: Sequence[ModuleStats],
    metrics_png: bytes,
    cluster_pngs: Sequence[bytes],
    norms_png: bytes,
    cluster_note: str | None,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(page.title)}</h1>",
        f"<pre>{html.escape(page.command)}</pre>",
        _table(["", ""], page.facts + [(name, f"{seconds:.2f} s") for name, seconds in page.timings]),
    ]
    for note in page.notes:
        parts.append(f'<p class="note warn">{html.escape(note)}</p>')
    parts.append("<h2>Inputs</h2>")
    if page.inputs:
        keys = list(page.inputs[0])
        parts.append(_table(keys, [[row.get(k, "") for k in keys] for row in page.inputs]))
    parts.append(f"<details><summary>options</summary><pre>{html.escape(page.options_json)}</pre></details>")

    parts.append("<h2>Error and kept energy per layer and module</h2>")
    parts.append(
        '<p class="note">Target: the exact weighted sum of the inputs\' updates. Relative error '
        "||M − T||<sub>F</sub> / ||T||<sub>F</sub> (0 = exact); kept energy &lt;M, T&gt;<sub>F</sub> / "
        "||T||<sub>F</sub><sup>2</sup>, the part of the target the merge reproduces along it (1 = all of it; "
        "for a best rank-k approximation it is the share of squared singular values kept). M: merged update, "
        "T: target. As <code>loralego verify</code> computes them, from the thin factors.</p>"
    )
    parts.append(_img(metrics_png, "relative error and kept energy per layer and module"))

    parts.append("<h2>Which inputs' units fell into each cluster</h2>")
    if cluster_note:
        parts.append(f'<p class="note">{html.escape(cluster_note)}</p>')
    for index, png in enumerate(cluster_pngs):
        parts.append(_img(png, f"cluster membership heat maps, part {index + 1}"))

    parts.append("<h2>Unit norms before and after reweighting</h2>")
    parts.append(_img(norms_png, "histograms of unit norms before and after reweighting"))

    rows = [
        (
            s.module,
            s.pool,
            s.rank,
            f"{s.target_norm:.4g}",
            f"{s.relative_error:.4f}",
            f"{s.kept_energy:.4f}",
        )
        for s in stats
    ]
    parts.append("<h2>Per module</h2>")
    parts.append(
        "<details open><summary>table</summary>"
        + _table(
            ["module", "pool N", "merged rank", "||target||", "relative error", "kept energy"], rows, {1, 2, 3, 4, 5}
        )
        + "</details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
