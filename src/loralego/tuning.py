"""Learned merge weights from a few examples (``loralego tune``; needs ``loralego[tune]``).

Two strategies, both on the completion loss of the examples with the base model and the adapters frozen:

- ``search``: one weight per adapter by a gradient-free CMA-ES (:mod:`loralego.search`), as LoraHub
  (arXiv 2307.13269): L1-regularised loss, weights bounded to [-1.5, 1.5], a fixed budget of loss evaluations.
- ``gradient``: one weight per (adapter, module) or per (adapter, layer) by Adam on the loss, as the learned
  layer-wise weights over concatenated LoRAs of LoRA Soups / CAT (arXiv 2410.13025).

While weights are learned the model runs the exact weighted ensemble: every adapted linear layer computes
``W x + sum_j w_j B_j A_j x`` (each adapter's alpha / r folded in), which is what ``cat`` writes. The chosen
method then merges with the learned weights through the ordinary pipeline; for a method that compresses
(lego, svd, ties) the written adapter is an approximation of that ensemble, and its own loss is measured and
reported beside the ensemble's. A held-out share of the examples picks the stopping point: the candidate (or
step) with the lowest held-out loss is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .adapters import Adapter, natural_key
from .causal_lm import Encoded, batches, encode, example_losses, mean_loss
from .errors import LoraLegoError
from .examples import Example, split_holdout
from .options import MergeOptions
from .search import Candidate, cma_es

Strategy = Literal["search", "gradient"]
Granularity = Literal["adapter", "module", "layer"]
TUNE_FILE = "tune.json"
SEARCH_BOUNDS = (-1.5, 1.5)


@dataclass(frozen=True)
class TuneSettings:
    strategy: Strategy = "search"
    granularity: Granularity | None = None  # default: adapter for search, module for gradient
    init_weight: float | None = None  # default: 1 / number of adapters (the average ensemble)
    holdout: float = 0.2
    seed: int = 0
    budget: int = 40  # search: loss evaluations (LoraHub's default is 40 steps)
    sigma: float | None = None  # search: CMA-ES initial step size; default half the starting weight (or 0.1)
    steps: int = 50  # gradient: Adam steps (each one pass over the training share)
    lr: float = 0.01  # gradient
    eval_every: int = 5  # gradient: held-out check every this many steps
    l1: float = 0.05  # weight of sum_j |w_j| in the objective (mean over groups); LoraHub's default
    batch_size: int = 16
    bf16: bool = False  # bf16 autocast for the forward passes (faster on CPU; fp32 by default)

    def resolved_granularity(self) -> Granularity:
        if self.granularity is not None:
            return self.granularity
        return "adapter" if self.strategy == "search" else "module"


def layer_of(module: str) -> str:
    """The layer a module belongs to: its first numeric name part (``model.layers.3.mlp`` -> ``3``)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return match.group(1) if match else "(no layer)"


def group_names(modules: Sequence[str], granularity: Granularity) -> tuple[list[str], dict[str, int]]:
    """The weight groups (rows of the weight table) and each module's group."""
    if granularity == "adapter":
        return ["all"], dict.fromkeys(modules, 0)
    keys = {m: (m if granularity == "module" else layer_of(m)) for m in modules}
    names = sorted(set(keys.values()), key=natural_key)
    index = {name: i for i, name in enumerate(names)}
    return names, {m: index[keys[m]] for m in modules}


class WeightedLoRALinear(torch.nn.Module):
    """``base(x) + sum_j w[group, j] * B_j A_j x`` for the frozen, folded factors of the adapters with this module."""

    def __init__(self, base: torch.nn.Linear, factors: list[tuple[torch.Tensor, torch.Tensor]], owners: list[int],
                 group: int, table: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", torch.cat([a for a, _ in factors], 0), persistent=False)
        self.register_buffer("lora_b", torch.cat([b for _, b in factors], 1), persistent=False)
        unit_owner = [owner for owner, (a, _) in zip(owners, factors, strict=True) for _ in range(a.shape[0])]
        self.register_buffer("unit_owner", torch.tensor(unit_owner, dtype=torch.long), persistent=False)
        self.group = group
        self.table = table  # a callable, so the shared table is not registered as this module's parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self.table()[self.group].index_select(0, self.unit_owner)
        hidden = torch.nn.functional.linear(x, self.lora_a.to(x.dtype)) * units.to(x.dtype)
        return self.base(x) + torch.nn.functional.linear(hidden, self.lora_b.to(x.dtype))


def _submodule(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, torch.nn.Module]:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        return parent, child, getattr(parent, child)
    except AttributeError:
        raise LoraLegoError(f"module {name}: not in the base model (adapter made for another model?)") from None


@contextlib.contextmanager
def weighted_ensemble(
    model: torch.nn.Module, adapters: Sequence[Adapter], groups: dict[str, int], table: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Replace every adapted linear layer by its weighted ensemble for the duration of the block."""
    device = next(model.parameters()).device
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for module in groups:
            parent, child, base = _submodule(model, module)
            if type(base) is not torch.nn.Linear:
                raise LoraLegoError(f"module {module}: tune supports LoRA on linear layers, not {type(base).__name__}")
            owners = [j for j, a in enumerate(adapters) if module in a.modules]
            factors = [adapters[j].folded(module, 1.0, device) for j in owners]
            if factors[0][0].shape[1] != base.in_features or factors[0][1].shape[0] != base.out_features:
                raise LoraLegoError(
                    f"module {module}: adapter shape {tuple(factors[0][1].shape[:1]) + tuple(factors[0][0].shape[1:])}"
                    f" does not fit the base layer's {base.out_features}x{base.in_features}"
                )
            setattr(parent, child, WeightedLoRALinear(base, factors, owners, groups[module], table))
            swapped.append((parent, child, base))
        yield
    finally:
        for parent, child, base in reversed(swapped):
            setattr(parent, child, base)


@dataclass
class TuneResult:
    """What was learned: ``weights[g][j]`` for group ``g`` (see ``groups``) and adapter ``j``."""

    strategy: Strategy
    granularity: Granularity
    adapters: list[str]
    groups: list[str]
    weights: list[list[float]]
    loss_before: dict[str, float]
    loss_after: dict[str, float]
    evaluations: int
    chosen_at: int  # evaluation (search) or step (gradient) whose weights were kept
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0
    n_heldout: int = 0
    written_loss: dict[str, float] | None = None

    def module_weights(self, modules: dict[str, int]) -> list[dict[str, float]]:
        """Per adapter, each module's learned weight (``modules``: module -> group)."""
        return [{m: self.weights[g][j] for m, g in modules.items()} for j in range(len(self.adapters))]

    def record(self, settings: TuneSettings, method: str) -> dict[str, Any]:
        """The deterministic record written beside the output (no wall time: same seed, same bytes)."""
        return {
            "strategy": self.strategy,
            "granularity": self.granularity,
            "method": method,
            "adapters": self.adapters,
            "groups": self.groups,
            "weights": [[round(w, 8) for w in row] for row in self.weights],
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "written_loss": self.written_loss,
            "evaluations": self.evaluations,
            "chosen_at": self.chosen_at,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        }


@dataclass
class _Data:
    train: list[dict[str, torch.Tensor]]
    heldout: list[dict[str, torch.Tensor]]
    n_train: int
    n_heldout: int


def prepare(tokenizer: Any, examples: Sequence[Example], settings: TuneSettings) -> _Data:
    train, heldout = split_holdout(examples, settings.holdout, settings.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0  # padded positions are masked out; any id works
    enc_train: list[Encoded] = [encode(tokenizer, e) for e in train]
    enc_held: list[Encoded] = [encode(tokenizer, e) for e in heldout]
    return _Data(
        batches(enc_train, pad, settings.batch_size),
        batches(enc_held, pad, settings.batch_size) if enc_held else [],
        len(enc_train),
        len(enc_held),
    )


# (weights kept, evaluations or steps run, the evaluation or step kept, held-out history)
_Outcome = tuple[torch.Tensor, int, int, list[dict[str, float]]]


def _losses(model: Any, data: _Data, bf16: bool) -> dict[str, float]:
    out = {"train": round(mean_loss(model, data.train, bf16), 6)}
    if data.heldout:
        out["heldout"] = round(mean_loss(model, data.heldout, bf16), 6)
    return out


def _penalty(table: torch.Tensor, l1: float) -> torch.Tensor:
    return l1 * table.abs().sum(-1).mean()


def tune_weights(
    model: Any,
    tokenizer: Any,
    adapters: Sequence[Adapter],
    examples: Sequence[Example],
    settings: TuneSettings,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[TuneResult, dict[str, int]]:
    """Learn the weights; returns the result and the module -> group map used."""
    if not adapters:
        raise LoraLegoError("no adapters to tune")
    granularity = settings.resolved_granularity()
    if settings.strategy == "search" and granularity != "adapter":
        raise LoraLegoError("--strategy search learns one weight per adapter; use --strategy gradient for "
                            f"--granularity {granularity}")
    if settings.budget < 1 or settings.steps < 1 or settings.eval_every < 1 or settings.batch_size < 1:
        raise LoraLegoError("--budget, --steps, --eval-every and --batch-size must be >= 1")
    if not all(math.isfinite(v) and v > 0 for v in (settings.lr, 1.0 if settings.sigma is None else settings.sigma)):
        raise LoraLegoError("--lr and --sigma must be positive numbers")
    if not (math.isfinite(settings.l1) and settings.l1 >= 0):
        raise LoraLegoError("--l1 must be a number >= 0")
    init = settings.init_weight if settings.init_weight is not None else 1.0 / len(adapters)
    if not math.isfinite(init):
        raise LoraLegoError("--init-weight must be a finite number")
    modules = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    names, groups = group_names(modules, granularity)
    data = prepare(tokenizer, examples, settings)
    device = next(model.parameters()).device
    table = torch.full((len(names), len(adapters)), float(init), device=device)
    holder = {"table": table}
    start = time.perf_counter()
    with weighted_ensemble(model, adapters, groups, lambda: holder["table"]):
        before = _losses(model, data, settings.bf16)
        if settings.strategy == "search":
            result = _search(model, data, holder, init, settings, progress)
        else:
            result = _gradient(model, data, holder, settings, progress)
        best_table, evaluations, chosen_at, history = result
        holder["table"] = best_table
        after = _losses(model, data, settings.bf16)
    return (
        TuneResult(
            strategy=settings.strategy,
            granularity=granularity,
            adapters=[a.name for a in adapters],
            groups=names,
            weights=best_table.detach().cpu().double().tolist(),
            loss_before=before,
            loss_after=after,
            evaluations=evaluations,
            chosen_at=chosen_at,
            history=history,
            seconds=time.perf_counter() - start,
            n_train=data.n_train,
            n_heldout=data.n_heldout,
        ),
        groups,
    )


def _search(model: Any, data: _Data, holder: dict[str, torch.Tensor], init: float, settings: TuneSettings,
            progress: Callable[[int, int, str], None] | None) -> _Outcome:
    device = holder["table"].device
    n = holder["table"].shape[1]

    def set_weights(x: Sequence[float]) -> None:
        holder["table"] = torch.tensor([list(x)], dtype=torch.float32, device=device)

    def objective(x: np.ndarray) -> float:
        set_weights(x.tolist())
        return mean_loss(model, data.train, settings.bf16) + settings.l1 * float(np.abs(x).sum())

    history: list[dict[str, float]] = []
    picked: dict[str, Any] = {"held": math.inf, "candidate": None, "checked": None}

    def on_generation(best: Candidate, used: int) -> None:
        if best.evaluation != picked["checked"]:  # a new best on the training share: check it on the held-out
            picked["checked"] = best.evaluation
            set_weights(best.x)
            held = mean_loss(model, data.heldout, settings.bf16) if data.heldout else best.value
            history.append(
                {"evaluation": best.evaluation, "objective": round(best.value, 6), "heldout": round(held, 6)}
            )
            if held < picked["held"]:
                picked.update(held=held, candidate=best)
        if progress is not None:
            progress(used, settings.budget, f"objective {best.value:.4f}")

    # The default step is on the scale of the weights themselves: at n = 7 the average ensemble's 1/7 is below
    # LoraHub's usual steps, and on SmolLM2 a first step of 0.2 per weight found nothing better than the start.
    sigma = settings.sigma if settings.sigma is not None else (0.5 * abs(init) if init else 0.1)
    cma_es(objective, np.full(n, init), sigma0=sigma, budget=settings.budget, seed=settings.seed,
           bounds=SEARCH_BOUNDS, on_generation=on_generation)
    chosen: Candidate = picked["candidate"]
    weights = torch.tensor([list(chosen.x)], dtype=torch.float32, device=device)
    return weights, settings.budget, chosen.evaluation, history


def _gradient(model: Any, data: _Data, holder: dict[str, torch.Tensor], settings: TuneSettings,
              progress: Callable[[int, int, str], None] | None) -> _Outcome:
    torch.manual_seed(settings.seed)  # nothing here is random today; kept so a dropout-using model is seeded too
    table = torch.nn.Parameter(holder["table"].clone())
    holder["table"] = table
    optimizer = torch.optim.Adam([table], lr=settings.lr)
    history: list[dict[str, float]] = []
    total = data.n_train

    def held_loss() -> float:
        return mean_loss(model, data.heldout or data.train, settings.bf16)

    best_held, best_table, chosen = held_loss(), table.detach().clone(), 0
    history.append({"step": 0, "heldout": round(best_held, 6)})
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        running = 0.0
        for batch in data.train:
            losses = example_losses(model, batch, settings.bf16)
            loss = losses.sum() / total
            loss.backward()
            running += float(loss.detach())
        penalty = _penalty(table, settings.l1)
        if settings.l1:
            penalty.backward()
        optimizer.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            held = held_loss()
            history.append({"step": step, "train": round(running, 6), "heldout": round(held, 6)})
            if held < best_held:
                best_held, best_table, chosen = held, table.detach().clone(), step
        if progress is not None:
            progress(step, settings.steps, f"loss {running:.4f}")
    holder["table"] = best_table
    return best_table, settings.steps, chosen, history


def tuned_options(
    adapters: Sequence[Adapter], result: TuneResult, groups: dict[str, int]
) -> dict[str, Any]:
    """The merge options that give the learned combination: per-adapter weights as ``weights``; finer ones as
    ``weight_overrides``, one pattern per module, its escaped full name (a full name matches itself over its
    whole length, so it is always the most specific pattern for its module)."""
    if result.granularity == "adapter":
        return {"weights": list(result.weights[0])}
    per_adapter = result.module_weights(groups)
    overrides = [
        {re.escape(m): w for m, w in table.items() if m in a.modules}
        for a, table in zip(adapters, per_adapter, strict=True)
    ]
    return {"weights": [1.0] * len(adapters), "weight_overrides": overrides}


def written_losses(model: Any, tokenizer: Any, merged: Adapter, examples: Sequence[Example],
                   settings: TuneSettings) -> dict[str, float]:
    """Loss of a written (merged) adapter on the same split, at weight 1."""
    data = prepare(tokenizer, examples, settings)
    groups = dict.fromkeys(merged.modules, 0)
    table = torch.ones((1, 1), device=next(model.parameters()).device)
    with weighted_ensemble(model, [merged], groups, lambda: table):
        return _losses(model, data, settings.bf16)


def tune_to_folder(
    base_model: str | Path,
    adapters: Sequence[Adapter],
    examples: Sequence[Example],
    out: str | Path,
    settings: TuneSettings,
    options: MergeOptions | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    command: str | None = None,
    **overrides: Any,
) -> TuneResult:
    """Learn the weights, merge with them through the ordinary pipeline, write ``out`` with ``tune.json``.

    ``options`` / ``overrides`` are the merge's (as :func:`loralego.merge`; default method ``cat`` and dtype
    float32, so the learned combination is written exactly); ``device`` there is also where the model runs.
    """
    from .causal_lm import load_causal_lm
    from .options import make_options
    from .pipeline import merge, merge_to_folder
    from .plan import plan_merge

    if options is None:
        overrides = {"method": "cat", "dtype": "float32", **overrides}
    options = make_options(options, **overrides)
    if options.weights is not None or options.weight_overrides:
        raise LoraLegoError("tune learns the weights; do not pass --weights or --weight-override")
    # Refuse what the merge would refuse (options, incompatible adapters) before any model is loaded.
    plan_merge(list(adapters), make_options(options, weights=[1.0] * len(adapters)))
    if options.device == "cuda" and not torch.cuda.is_available():
        raise LoraLegoError("--device cuda: no CUDA device is available")
    use_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    out = Path(out)
    if out.exists() and not options.force:
        raise LoraLegoError(f"{out}: already exists (use --force to overwrite)")
    model, tokenizer = load_causal_lm(base_model, torch.device("cuda" if use_cuda else "cpu"))
    started = time.perf_counter()
    result, groups = tune_weights(model, tokenizer, adapters, examples, settings, progress)
    learned = tuned_options(adapters, result, groups)
    # Measure what will be written (the merge is deterministic), then write it once, atomically, with its record.
    merged = merge(list(adapters), options, **learned)
    result.written_loss = written_losses(model, tokenizer, merged, examples, settings)
    record = result.record(settings, options.method)
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    merge_to_folder(list(adapters), out, options, command=command, extra_files={TUNE_FILE: text}, **learned)
    result.seconds = time.perf_counter() - started
    return result
