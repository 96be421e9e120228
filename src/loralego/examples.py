"""Few-shot examples for ``tune`` and ``route``: a JSONL file, one ``{"prompt", "completion", "task"?}`` per line.

Validation only (no tokenizer, no model): every line is checked before any model is loaded, and a bad line is
refused with its line number. The held-out split is seeded and, when tasks are given, stratified by task, so
each task keeps examples on both sides where it has at least two.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraLegoError

MAX_EXAMPLES = 100_000
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    task: str | None = None


def _text(value: object, key: str, where: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise LoraLegoError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise LoraLegoError(f"{where}: {key!r} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise LoraLegoError(f"{where}: {key!r} is longer than {MAX_TEXT_CHARS} characters")
    return value


def parse_example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LoraLegoError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise LoraLegoError(f"{where}: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise LoraLegoError(f"{where}: expected a JSON object with \"prompt\" and \"completion\"")
    unknown = sorted(set(record) - {"prompt", "completion", "task"})
    if unknown:
        raise LoraLegoError(f"{where}: unknown key {unknown[0]!r} (expected prompt, completion, task)")
    for key in ("prompt", "completion"):
        if key not in record:
            raise LoraLegoError(f"{where}: missing {key!r}")
    task = record.get("task")
    return Example(
        prompt=_text(record["prompt"], "prompt", where, empty_ok=True),
        completion=_text(record["completion"], "completion", where),
        task=None if task is None else _text(task, "task", where),
    )


def read_examples(path: str | Path) -> list[Example]:
    """All examples of a JSONL file (blank lines skipped); refuses an empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraLegoError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoraLegoError(f"{path}: is a folder, expected a JSONL file") from None
    except OSError as error:
        raise LoraLegoError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise LoraLegoError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(examples) >= MAX_EXAMPLES:
            raise LoraLegoError(f"{path}: more than {MAX_EXAMPLES} examples")
        examples.append(parse_example(line, f"{path}:{number}"))
    if not examples:
        raise LoraLegoError(f"{path}: no examples")
    return examples


def check_tasks(examples: Sequence[Example], names: Sequence[str], *, required: bool, source: str) -> None:
    """Every ``task`` must name one of the adapters; ``required``: every example must have one."""
    known = set(names)
    for index, example in enumerate(examples, start=1):
        if example.task is None:
            if required:
                raise LoraLegoError(f"{source}: example {index} has no \"task\" (routing needs one per example)")
            continue
        if example.task not in known:
            raise LoraLegoError(
                f"{source}: example {index}: task {example.task!r} names no adapter "
                f"(adapters: {', '.join(sorted(known))})"
            )


def split_holdout(examples: Sequence[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: about ``share`` of each task's examples held out (seeded; at least one example
    stays in train per task, and at least one is held out overall when ``share > 0`` and there are two)."""
    if not 0.0 <= share < 1.0:
        raise LoraLegoError(f"--holdout: must be in [0, 1), got {share}")
    groups: dict[str | None, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.task, []).append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(groups, key=lambda k: (k is None, k or "")):
        members = list(groups[key])
        rng.shuffle(members)
        count = min(round(len(members) * share), len(members) - 1)
        held.update(members[:count])
    if share > 0 and not held and len(examples) >= 2:  # tiny sets: still one example to pick the stopping point
        held.add(rng.randrange(len(examples)))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]
