"""One options model for the CLI, recipes and the Python API: every merge option is defined here once.

The CLI builds its flags from these fields (``cli.add_option_flags``), so a new option appears everywhere
by adding one field with a description.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import LoraLegoError


class MergeOptions(BaseModel):
    """How to merge. Defaults follow the LoRA-LEGO spec (docs/method.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("lego", description="merge method (see `loralego methods`)")
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
        None, description="one weight per input adapter (default: all 1; lego+: all 1/n)"
    )
    seed: int = Field(0, description="seed for k-means and DARE; same seed, same bytes")
    # LoRA-LEGO (lego) options
    n_init: int = Field(4, description="k-means restarts (lego)")
    max_iter: int = Field(100, description="k-means iteration cap (lego)")
    param_reweight: bool = Field(True, description="scale each centroid to its members' mean norm (lego)")
    output_reweight: bool = Field(True, description="scale the merged update by sqrt(r_ref / k) (lego)")
    norm: Literal["inf", "2"] = Field("inf", description="norm used by parameter reweighting (lego)")
    r_ref: float | None = Field(
        None, description="reference rank of output reweighting; default: mean input rank of the module (lego)"
    )
    # Rank-wise variants (lego+; each can be set on lego too). None: the method's own default.
    gauge: Literal["none", "balanced"] | None = Field(
        None,
        description="unit gauge before clustering: none, or balanced (||a|| = ||b||, canonical sign); "
        "default none for lego, balanced for lego+",
    )
    cluster_on: Literal["units", "directions"] | None = Field(
        None,
        description="cluster the units, or their per-half unit directions; default units for lego, "
        "directions for lego+",
    )
    representative: Literal["mean", "rank1", "rank1_mean", "ties"] | None = Field(
        None,
        description="rank of each cluster: mean of its units; best rank-1 approximation of its summed update "
        "(rank1); or of that sum divided by the number of input adapters in the cluster (rank1_mean); TIES "
        "inside the cluster, trimming each unit to --density and electing a sign per coordinate (ties); "
        "default mean",
    )
    output_scale: Literal["sqrt_rank", "match_norm", "least_squares"] | None = Field(
        None,
        description="output reweighting: the paper's sqrt(r_ref / k) (sqrt_rank, applied to mean representatives "
        "only); or one factor per module that gives the merged update the Frobenius norm of the exact weighted "
        "ensemble (match_norm) or its least-squares fit to it (least_squares); default sqrt_rank for lego, "
        "least_squares for lego+",
    )
    balance: bool = Field(
        False,
        description="rescale every adapter's update to the same Frobenius norm per module before clustering, "
        "so one with a large alpha / r does not take every cluster (lego)",
    )
    # TIES / DARE / magnitude pruning options
    density: float = Field(0.2, description="fraction of entries kept (ties, dare_*, magnitude_prune)")
    majority_sign: Literal["total", "frequency"] = Field("total", description="sign election of ties / dare_ties")
    space: Literal["dense", "factors"] = Field(
        "dense",
        description="where ties / dare_* / magnitude_prune work: dense = on each module's full update, then the "
        "best rank-k approximation (any ranks; PEFT's *_svd); factors = on A and B separately (PEFT's plain "
        "variants; equal ranks only, output rank = input rank)",
    )
    # Execution and output
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
    format: Literal["peft", "kohya", "diffusers"] | None = Field(
        None, description="output format; default: the inputs' (peft <-> diffusers convert, kohya does not)"
    )
    target: Literal["vllm"] | None = Field(
        None,
        description="serving target the output must satisfy; vllm: one rank from vLLM's --max-lora-rank values "
        "for all modules (smaller ones padded with zero units), alpha = r, checked before writing",
    )

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be >= 1")
        return value

    @field_validator("rank_overrides", mode="before")
    @classmethod
    def _parse_overrides(cls, value: object) -> dict[str, int]:
        from .overrides import validate_overrides

        return validate_overrides(value)  # type: ignore[arg-type]

    @field_validator("energy")
    @classmethod
    def _energy_in_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1]")
        return value

    @field_validator("density")
    @classmethod
    def _density_in_range(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1]")
        return value

    @field_validator("n_init", "max_iter")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(w != w or abs(w) == float("inf") for w in value):
            raise ValueError("must be finite numbers")
        return value


def make_options(options: MergeOptions | None = None, **overrides: object) -> MergeOptions:
    """Build options from an existing model and/or keyword overrides, turning validation errors into one line."""
    from pydantic import ValidationError

    base = options.model_dump() if options is not None else {}
    base.update(overrides)
    try:
        return MergeOptions(**base)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "options"
        message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix for validator errors
        raise LoraLegoError(f"option {where}: {message}") from None
