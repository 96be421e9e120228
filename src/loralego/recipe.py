"""Recipes: ``loralego run recipe.yaml``, a merge written down once and re-run exactly.

A recipe is a YAML mapping with ``inputs`` (paths, folders, files or cached Hugging Face ids; each either a
string or ``{path: ..., weight: ...}``), ``output``, an optional ``report`` (an HTML file), and any merge
option or parameter of the chosen method under the same name as in Python (the CLI flag without ``--``, with
``_`` for ``-``), either at the top level or under ``parameters:``, e.g.::

    inputs:
      - path: adapters/task_a
        weight: 0.7
      - adapters/task_b
    output: out/merged
    method: lego
    rank: 8
    rank_overrides: {mlp: 16, self_attn.q_proj: 4}
    parameters: {n_init: 8}

It is validated by the same options model as the CLI and the Python API (one-line errors naming the key).
Relative paths are relative to the recipe's folder, so a recipe means the same merge wherever it is run
from (a relative input that does not exist there is passed on as written, e.g. a model id). The recipe's
text is copied into the output: ``recipe.yaml`` inside a PEFT folder, ``<stem>.recipe.yaml`` beside a
single-file output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LoraLegoError
from .options import MergeOptions, make_options

RECIPE_FILE = "recipe.yaml"
_RECIPE_KEYS = ("inputs", "output", "report")


class RecipeInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    weight: float | None = None
    weight_overrides: dict[str, float] | None = None  # this input's weight on modules matching a pattern


class RecipeModel(BaseModel):
    """The recipe file's own keys; every other key is a merge option or the method's parameter, validated as
    the CLI's and the Python API's are (``make_options``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[RecipeInput] = Field(min_length=1)
    output: str = Field(min_length=1)
    report: str | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _strings_are_paths(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with its paths resolved."""

    path: Path
    text: str
    inputs: list[str]
    output: Path
    report: Path | None
    options: MergeOptions


def _resolve(base: Path, value: str, *, must_exist: bool) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    if must_exist and not candidate.exists():
        return value  # not a local path: perhaps a model id, resolved (or refused) when loaded
    return str(candidate)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "recipe"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


def _options(
    path: Path, options: dict[str, Any], weights: list[float | None], overrides: list[dict[str, float] | None]
) -> MergeOptions:
    """The merge options of a recipe: its option keys (flat or under ``parameters:``), per-input weights and
    per-input weight overrides."""
    if any(item is not None for item in overrides):
        if options.get("weight_overrides") is not None:
            raise LoraLegoError(f"{path}: weight_overrides: give them per input or as 'weight_overrides:', not both")
        options = {**options, "weight_overrides": [item or {} for item in overrides]}
    if any(weight is not None for weight in weights):
        if options.get("weights") is not None:
            raise LoraLegoError(f"{path}: weights: give weights per input or as 'weights:', not both")
        options = {**options, "weights": [1.0 if weight is None else weight for weight in weights]}
    try:
        return make_options(None, **{str(key): value for key, value in options.items()})
    except LoraLegoError as error:
        raise LoraLegoError(f"{path}: {str(error).removeprefix('option ')}") from None


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe ``text`` (read from ``path``) and resolve its paths."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise LoraLegoError(f"{path}: not valid YAML{where} ({problem})") from None
    if not isinstance(data, dict):
        raise LoraLegoError(f"{path}: a recipe is a YAML mapping with inputs, output and merge options")
    own = {key: data[key] for key in _RECIPE_KEYS if key in data}
    options = {key: value for key, value in data.items() if key not in _RECIPE_KEYS}
    try:
        model = RecipeModel.model_validate(own)
    except ValidationError as error:
        raise LoraLegoError(f"{path}: {_one_line(error)}") from None
    merge_options = _options(
        path, options, [item.weight for item in model.inputs], [item.weight_overrides for item in model.inputs]
    )
    base = path.parent
    return Recipe(
        path=path,
        text=text,
        inputs=[_resolve(base, item.path, must_exist=True) for item in model.inputs],
        output=Path(_resolve(base, model.output, must_exist=False)),
        report=Path(_resolve(base, model.report, must_exist=False)) if model.report else None,
        options=merge_options,
    )


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraLegoError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LoraLegoError(f"{path}: cannot read the recipe: {getattr(error, 'strerror', None) or error}") from None
    return parse_recipe(text, path)
