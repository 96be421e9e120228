"""Per-module rank overrides: ``--rank-override PATTERN=K`` (CLI), ``rank_overrides: {PATTERN: K}`` (recipes
and the API).

A pattern is a regular expression matched against whole parts of a module name: it must start at the
beginning of the name or right after a separator and end at the end of the name or right before one. The
separator is ``.`` (``model.layers.0.mlp.up_proj``), or ``_`` in names without dots (kohya:
``lora_unet_down_blocks_0_attentions_0_proj_in``). So ``mlp`` matches every MLP projection, ``q_proj`` every
query projection, ``self_attn.q_proj`` the same with its parent, ``layers\\.[0-3]\\..*`` the first four layers.

When several patterns match a module, the most specific wins: the match covering the most characters of
the name, then the lexicographically smallest pattern. The outcome does not depend on the order of the
patterns, so a recipe, the CLI and the options recorded in the output's metadata (stored with sorted keys)
all mean the same merge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence


def parse_override(text: str) -> tuple[str, int]:
    """``"PATTERN=K"`` -> ``(PATTERN, K)``; the last ``=`` separates them (a regex may contain ``=``)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"{text!r} is not PATTERN=K")
    try:
        rank = int(value)
    except ValueError:
        raise ValueError(f"{text!r}: K must be an integer") from None
    return pattern, rank


def validate_overrides(value: Mapping[str, int] | Iterable[str] | None) -> dict[str, int]:
    """A ``{pattern: k}`` mapping from a mapping or from ``PATTERN=K`` strings; patterns compiled, k >= 1."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    pairs = list(value.items()) if isinstance(value, Mapping) else [parse_override(str(item)) for item in value]
    result: dict[str, int] = {}
    for pattern, rank in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern {pattern!r} must be a non-empty string")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression ({error})") from None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"pattern {pattern!r}: k must be an integer >= 1, got {rank!r}")
        if pattern in result and result[pattern] != rank:
            raise ValueError(f"pattern {pattern!r} is given twice with different k")
        result[pattern] = rank
    return result


def validate_weight_overrides(value: object) -> list[dict[str, float]] | None:
    """Per-input ``{pattern: weight}`` maps from a list of maps (recipes, Python) or ``I:PATTERN=W`` strings
    (the CLI; I counts inputs from 1). Patterns compiled, weights finite."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("expected a list (one {pattern: weight} map per input) or I:PATTERN=W strings")
    if all(isinstance(item, str) for item in value) and value:
        maps: list[dict[str, float]] = []
        for item in value:
            index, sep, rest = item.partition(":")
            pattern, eq, weight = rest.rpartition("=")
            if not sep or not eq or not index.isdigit() or int(index) < 1 or not pattern:
                raise ValueError(f"{item!r} is not I:PATTERN=W (I: the input's position, from 1)")
            while len(maps) < int(index):
                maps.append({})
            try:
                maps[int(index) - 1][pattern] = float(weight)
            except ValueError:
                raise ValueError(f"{item!r}: W must be a number") from None
        value = maps
    result: list[dict[str, float]] = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError("each input's overrides must map patterns to weights")
        checked: dict[str, float] = {}
        for pattern, weight in item.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"pattern {pattern!r} must be a non-empty string")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression ({error})") from None
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight or abs(
                    weight) == float("inf"):  # fmt: skip
                raise ValueError(f"pattern {pattern!r}: the weight must be a finite number, got {weight!r}")
            checked[pattern] = float(weight)
        result.append(checked)
    return result


def _match_length(pattern: str, module: str) -> int:
    """Length of the longest match of ``pattern`` on whole name parts of ``module``; -1 if none."""
    sep = re.escape("." if "." in module else "_")
    best = -1
    for match in re.finditer(rf"(?:^|(?<={sep}))(?:{pattern})(?={sep}|$)", module):
        best = max(best, match.end() - match.start())
    return best


def override_for(overrides: Mapping[str, float], module: str) -> float | None:
    """The value (a rank k, a weight) of the most specific pattern matching ``module``, or None if none does."""
    best: tuple[int, str] | None = None
    for pattern in overrides:
        length = _match_length(pattern, module)
        if length < 0:
            continue
        key = (-length, pattern)
        if best is None or key < best:
            best = key
    return overrides[best[1]] if best is not None else None


def module_weight(
    weights: Sequence[float], weight_overrides: Sequence[Mapping[str, float]] | None, index: int, module: str
) -> float:
    """Input ``index``'s weight on ``module``: its most specific weight override, else its weight."""
    overrides = weight_overrides or []
    override = override_for(overrides[index], module) if index < len(overrides) else None
    return float(weights[index]) if override is None else float(override)


def unused_patterns(overrides: Mapping[str, float], modules: Iterable[str]) -> list[str]:
    """Patterns that match no module (a typo, or a module the inputs do not adapt)."""
    modules = list(modules)
    return [p for p in overrides if not any(_match_length(p, m) >= 0 for m in modules)]
