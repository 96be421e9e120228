"""Regular expressions from untrusted places (a PEFT config's ``rank_pattern`` / ``alpha_pattern``, a file's
metadata, ``--rank-override``), matched with a bound on time.

Python's ``re`` backtracks without limit: ``(a+)+b`` against a long name of ``a`` runs for ever. Refusing
"dangerous" syntax (nested quantifiers, backreferences) would also refuse harmless patterns and still miss
others (overlapping alternations under a repeat, ``(a|aa)+``), so instead every match runs in the ``regex``
package (a drop-in engine with ``re``'s syntax and semantics in its default VERSION0 mode) with a timeout:
a pattern that takes longer than :data:`MATCH_SECONDS` on one name is refused with a one-line error naming
it. A real pattern matches a module name in microseconds, five orders of magnitude below the bound, so a
merge that succeeds never depends on the machine's speed; patterns and names also have length caps.
"""

from __future__ import annotations

import functools
from typing import Any

import regex

from .errors import LoraLegoError

MATCH_SECONDS = 0.5
MAX_PATTERN_CHARS = 1000
MAX_NAME_CHARS = 4096


class PatternError(ValueError):
    """A pattern that is not valid, too long, or too slow; the message says which (caller adds the file)."""


def _short(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """A compiled pattern; :class:`PatternError` for one that is not a string, too long or invalid."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"pattern {pattern!r} must be a non-empty string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern {_short(pattern)} is longer than {MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(pattern, regex.VERSION0)
    except (regex.error, OverflowError, RecursionError, ValueError) as error:
        raise PatternError(f"pattern {_short(pattern)} is not a valid regular expression ({error})") from None


def _bounded(method: str, pattern: str, compiled: Any, name: str, where: str) -> Any:
    if len(name) > MAX_NAME_CHARS:
        raise LoraLegoError(f"{where}: module name {name[:60]!r}... is longer than {MAX_NAME_CHARS} characters")
    try:
        return getattr(compiled, method)(name, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise LoraLegoError(
            f"{where}: pattern {_short(pattern)} took more than {MATCH_SECONDS} s to match module "
            f"{name[:80]!r} (catastrophic backtracking); simplify the pattern"
        ) from None


def fullmatch(pattern: str, name: str, where: str) -> Any:
    """``re.fullmatch(pattern, name)``, bounded; ``where`` names the file or flag in errors."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError as error:
        raise LoraLegoError(f"{where}: {error}") from None
    return _bounded("fullmatch", pattern, compiled, name, where)


def finditer(pattern: str, name: str, where: str) -> list[Any]:
    """``list(re.finditer(pattern, name))``, bounded as a whole."""
    try:
        compiled = compile_pattern(pattern)
    except PatternError as error:
        raise LoraLegoError(f"{where}: {error}") from None
    if len(name) > MAX_NAME_CHARS:
        raise LoraLegoError(f"{where}: module name {name[:60]!r}... is longer than {MAX_NAME_CHARS} characters")
    try:
        return list(compiled.finditer(name, timeout=MATCH_SECONDS))
    except TimeoutError:
        raise LoraLegoError(
            f"{where}: pattern {_short(pattern)} took more than {MATCH_SECONDS} s to match module "
            f"{name[:80]!r} (catastrophic backtracking); simplify the pattern"
        ) from None
