"""The registry of merge methods: one module per method, each registering itself here.

A method outside the package (an experiment) registers the same way, with ``register``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import LoraLegoError
from .base import MergeMethod, MethodParams, ModuleJob, ModuleResult, NoParams, OutputRank, RankRequest, thin_rank

METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    summary: str,
    *,
    params: type[MethodParams] = NoParams,
    exact_by_default: bool = False,
    equal_ranks: bool = False,
    average_by_default: bool = False,
    takes_rank: bool = True,
    output_rank: OutputRank = thin_rank,
    clusters: bool = False,
) -> Callable[[Callable[[ModuleJob], ModuleResult]], Callable[[ModuleJob], ModuleResult]]:
    def wrap(function: Callable[[ModuleJob], ModuleResult]) -> Callable[[ModuleJob], ModuleResult]:
        METHODS[name] = MergeMethod(
            name,
            function,
            summary,
            params=params,
            exact_by_default=exact_by_default,
            equal_ranks=equal_ranks,
            average_by_default=average_by_default,
            takes_rank=takes_rank,
            output_rank=output_rank,
            clusters=clusters,
        )
        return function

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise LoraLegoError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Importing the method modules registers them.
from . import cat, elementwise, lego, linear, svd, task_arithmetic  # noqa: E402, F401

__all__ = [
    "METHODS",
    "MergeMethod",
    "MethodParams",
    "ModuleJob",
    "ModuleResult",
    "RankRequest",
    "get_method",
    "register",
]
