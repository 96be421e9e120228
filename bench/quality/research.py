"""Issue 15's research candidates: rank-wise merges measured against the shipped methods (evaluate.py plans them
like the rows of ``evaluate.METHODS``: k = 16 and 8, 3 seeds). Each entry: run prefix -> (merge options without
rank and seed, the scale parameter or None, its grid). Candidates are registered methods or ``variants.route``
options; the one chosen by the rule in docs/results.md ships as ``lego+``.
"""

from __future__ import annotations

from typing import Any

CANDIDATES: dict[str, tuple[dict[str, Any], str | None, tuple[float, ...]]] = {}
