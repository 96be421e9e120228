"""Issue 15's research candidates: rank-wise merges measured against the shipped methods (evaluate.py plans them
like the rows of ``evaluate.METHODS``: k = 16 and 8, 3 seeds). Each entry: run prefix -> (merge options without
rank and seed, the scale parameter or None, its grid). Candidates are registered methods or ``variants.route``
options; the one chosen by the rule in docs/results.md ships as ``lego+``.

Both candidates are ``rlego`` (bench/quality/research_methods.py; importing this module registers it): each
input's canonical units (its own SVD components), k-means with the sign-invariant, energy-weighted kernel
``s_a s_b (<u_a,u_b><v_a,v_b>)^2``, one rank per cluster (the top singular pair of the members' summed update),
the k directions orthogonalised (polar factors) and given one size, ``gain`` x Iso-C's (the mean singular value
of the summed update). They were chosen on the development proxy only (devproxy.py, training splits;
research_log.md): with per-module input balancing at gain 2.0, and without it at gain 1.75.
"""

from __future__ import annotations

from typing import Any

import research_methods  # noqa: F401  (registers rlego, the candidates' method)

_CANON = {"method": "rlego", "features": "energy", "spectrum": "flat_pool"}

CANDIDATES: dict[str, tuple[dict[str, Any], str | None, tuple[float, ...]]] = {
    "canon_bal": ({**_CANON, "balance": True, "gain": 2.0}, "gain", (1.0,)),
}
# Screened in but not scored, for time (the suite scores about 10 runs an hour on the shared box): of the two,
# canon_bal had the better proxy accuracy and loss on both sets (research_log.md), decided before any test score.
NOT_SCORED = {
    "canon_plain": ({**_CANON, "gain": 1.75}, "gain", (1.0,)),
}

# k-means seeds them: evaluate.py runs these over every seed.
STOCHASTIC_CANDIDATES: tuple[str, ...] = ("canon_bal", "canon_plain")
