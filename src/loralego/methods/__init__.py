"""The registry of merge methods: one module per method, each registering itself here."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import LoraLegoError
from .base import MergeMethod, ModuleJob, ModuleResult

METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    summary: str,
    *,
    exact_by_default: bool = False,
    equal_ranks: bool = False,
    average_by_default: bool = False,
    takes_rank: bool = True,
) -> Callable[[Callable[[ModuleJob], ModuleResult]], Callable[[ModuleJob], ModuleResult]]:
    def wrap(function: Callable[[ModuleJob], ModuleResult]) -> Callable[[ModuleJob], ModuleResult]:
        METHODS[name] = MergeMethod(
            name, function, summary, exact_by_default, equal_ranks, average_by_default, takes_rank
        )
        return function

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise LoraLegoError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Importing the method modules registers them.
from . import (  # noqa: E402, F401
    cat,
    dare_linear,
    dare_ties,
    knots,
    lego,
    linear,
    magnitude_prune,
    spectral,
    svd,
    task_arithmetic,
    ties,
)

__all__ = ["METHODS", "MergeMethod", "ModuleJob", "ModuleResult", "get_method", "register"]
