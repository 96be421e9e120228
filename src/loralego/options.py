"""The options of a merge: the common ones (inputs' weights, rank, seed, output...) defined here once, and
the chosen method's own parameters, declared by the method (``methods/*.py``) and validated against it.

The CLI builds its flags from these declarations (``cli.add_option_flags``), recipes and the Python API take
the same names, so a new option or parameter appears everywhere by adding one field with a description.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .errors import LoraLegoError
from .methods import MethodParams, get_method
from .methods.base import check_count, check_fraction
from .overrides import MAX_RANK  # far above any LoRA, low enough that a typo cannot ask for a terabyte of zeros


class MergeOptions(BaseModel):
    """How to merge. ``parameters`` are the method's own (see ``loralego methods METHOD``)."""

    # strict: values from recipes and metadata keep their kind (rank: true, density: "0.3" are refused)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str = Field("lego+", description="merge method (see `loralego methods`; default lego+, docs/results.md)")
    rank: int | None = Field(
        None,
        description="output rank k; default: the largest input rank (cat and task_arithmetic: exact sum)",
    )
    rank_overrides: dict[str, int] = Field(
        default_factory=dict,
        description="output rank for modules matching a pattern, as PATTERN=K (repeatable): a regex on whole "
        "name parts (mlp, self_attn.q_proj, layers\\.[0-3]\\..*); the most specific match wins",
    )
    energy: float | None = Field(
        None,
        description="pick each module's k as the smallest rank whose best approximation of the exact weighted "
        "ensemble keeps this fraction of its energy (squared Frobenius norm), at most --rank if given; "
        "for methods that take a rank (not cat or linear)",
    )
    weights: list[float] | None = Field(
        None, description="one weight per input adapter (default: all 1)"
    )
    seed: int = Field(0, description="seed for k-means and DARE; same seed, same bytes")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the written tensors; auto: the inputs' dtype"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device (auto: cuda if present)")
    executor: Literal["local", "ray"] = Field(
        "local",
        description="where modules are merged: local (this process, one worker thread per core) or ray (Ray "
        "tasks; inputs on storage every worker sees; needs the ray extra); same bytes either way",
    )
    ray_address: str | None = Field(
        None, description="address of an existing Ray cluster for --executor ray (default: start a local one)"
    )
    force: bool = Field(False, description="overwrite an existing output; merge adapters of different base models")
    format: Literal["peft", "kohya", "kohya-sgm", "diffusers"] | None = Field(
        None,
        description="output format: peft (folder), kohya (one file; diffusers-style UNet names, BFL Flux names), "
        "kohya-sgm (kohya with SDXL's input_blocks names) or diffusers (save_lora_weights' layout); default: the "
        "first input's (see docs/formats.md)",
    )
    convert_to_lora: int | None = Field(
        None,
        description="convert LoHa / LoKr modules to LoRA of this rank by truncated SVD of their update (the kept "
        "energy is printed per module); without it they are refused",
    )
    weight_overrides: list[dict[str, float]] | None = Field(
        None,
        description="per input, the weight of the modules matching a pattern (same patterns as --rank-override), "
        "as I:PATTERN=W with I the input's position from 1 (repeatable); the most specific match wins, other "
        "modules keep the input's --weights value",
    )
    target: Literal["vllm"] | None = Field(
        None,
        description="serving target the output must satisfy; vllm: one rank from vLLM's --max-lora-rank values "
        "for all modules (smaller ones padded with zero units), alpha = r, checked before writing",
    )
    parameters: SerializeAsAny[MethodParams] = Field(
        default_factory=MethodParams, description="the method's own parameters (validated against its declaration)"
    )

    @model_validator(mode="before")
    @classmethod
    def _method_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            method = data.get("method", "lego+")
            if not isinstance(method, str):
                raise ValueError("method must be a name (see `loralego methods`)")
            data = {**data, "parameters": method_parameters(method, data.get("parameters"))}
        return data

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | None) -> int | None:
        return value if value is None else check_count(value, MAX_RANK)

    @field_validator("energy")
    @classmethod
    def _energy(cls, value: float | None) -> float | None:
        return value if value is None else check_fraction(value)

    @field_validator("rank_overrides", mode="before")
    @classmethod
    def _parse_overrides(cls, value: object) -> dict[str, int]:
        from .overrides import validate_overrides

        return validate_overrides(value)  # type: ignore[arg-type]

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_sequence(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value  # the API may pass a tuple; strict wants a list
    @field_validator("convert_to_lora")
    @classmethod
    def _convert_rank_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be >= 1")
        return value

    @field_validator("weight_overrides", mode="before")
    @classmethod
    def _parse_weight_overrides(cls, value: object) -> list[dict[str, float]] | None:
        from .overrides import validate_weight_overrides

        return validate_weight_overrides(value)  # type: ignore[arg-type]

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(w != w or abs(w) == float("inf") for w in value):
            raise ValueError("must be finite numbers")
        return value


COMMON_OPTIONS = tuple(name for name in MergeOptions.model_fields if name != "parameters")


def method_parameters(method: str, given: MethodParams | Mapping[str, Any] | None) -> MethodParams:
    """``given`` validated against ``method``'s declaration; a parameter it does not take is refused by name."""
    declared = get_method(method).params
    if isinstance(given, declared):
        return given
    if isinstance(given, MethodParams):  # another method's parameters: only those set explicitly carry over
        given = given.model_dump(exclude_unset=True)
    if given is not None and not isinstance(given, Mapping):
        raise LoraLegoError(f"parameters of {method}: expected a mapping of names to values")
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared.model_fields))
    if unknown:
        takes = ", ".join(declared.model_fields) or "none"
        raise LoraLegoError(
            f"option {unknown[0]}: unknown key: not a merge option, and method {method} takes no such parameter "
            f"(its parameters: {takes})"
        )
    try:
        return declared.model_validate(given)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "parameters"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise LoraLegoError(f"option {where}: {message}") from None


def make_options(options: MergeOptions | None = None, **overrides: Any) -> MergeOptions:
    """Options from an existing model and/or keyword overrides, turning validation errors into one line.

    Keywords that are not common options are the method's parameters (``density=0.3`` for ties), so the
    Python API takes them flat, as the CLI does; ``parameters={...}`` works too.
    """
    base = options.model_dump(exclude={"parameters"}) if options is not None else {}
    parameters = options.parameters.model_dump(exclude_unset=True) if options is not None else {}
    for name, value in overrides.items():
        if name in COMMON_OPTIONS:
            base[name] = value
        elif name == "parameters":
            given = value.model_dump(exclude_unset=True) if isinstance(value, MethodParams) else value
            if given is not None and not isinstance(given, Mapping):
                raise LoraLegoError("option parameters: expected a mapping of names to values")
            parameters.update(given or {})
        else:
            parameters[name] = value
    try:
        return MergeOptions(**base, parameters=parameters)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "options"
        message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix for validator errors
        raise LoraLegoError(f"option {where}: {message}") from None
