"""The merge plan: everything a merge decides, resolved once from the inputs' headers and the options,
before the first tensor is read. Methods, writers, ``--verify``, the report and the model card read the
plan and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import Adapter, natural_key
from .adapters.formats import output_format
from .adapters.peft import PREFIX, merged_config
from .errors import LoraLegoError
from .methods import MergeMethod, MethodParams, RankRequest, get_method
from .options import MergeOptions
from .overrides import module_weight, override_for, unused_patterns
from .vllm import check_inputs as check_vllm_inputs
from .vllm import check_vllm, serving_rank


@dataclass(frozen=True)
class ModulePlan:
    """One output module: which inputs hold it, their ranks, and its output rank.

    ``rank`` is what the method returns; with ``--energy`` it is the cap, and the module's final k is the
    rank that keeps the energy target, at most ``rank`` (known once its factors are read).
    """

    name: str
    adapter_indices: tuple[int, ...]
    source_ranks: tuple[int, ...]
    rank: int
    rank_requested: bool
    a_shape: tuple[int, ...]  # stored shapes of the output (conv kernels kept), at rank 1
    b_shape: tuple[int, ...]
    weights: tuple[float, ...] = ()  # each input's weight on this module (--weights, or a --weight-override)


@dataclass(frozen=True)
class OutputSpec:
    """What is written: the format, the serving target, the dtype, and for ``--target vllm`` the one rank
    every module is padded to (vLLM's ``--max-lora-rank``)."""

    format: str
    dtype: torch.dtype
    target: str | None = None
    served_rank: int | None = None


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before the first tensor is read."""

    adapters: list[Adapter]
    options: MergeOptions
    method: MergeMethod
    params: MethodParams
    weights: list[float]
    rank: int | None  # the global k (--rank or the method's default); None: exact
    modules: dict[str, ModulePlan]  # in output (natural) order
    device: torch.device
    output: OutputSpec
    warnings: tuple[str, ...] = ()

    @property
    def energy(self) -> float | None:
        return self.options.energy


def target_modules(adapters: list[Adapter], modules: list[str]) -> list[str]:
    """The output's target_modules: the union of the inputs' name lists when that describes the merged
    modules exactly; otherwise the full module names (which PEFT matches as suffixes)."""
    lists = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in lists) and not any(a.config.get("layers_to_transform") for a in adapters):
        union = sorted({name for t in lists for name in t})  # type: ignore[union-attr]
        if all(any(m == t or m.endswith("." + t) for t in union) for m in modules):
            return union
    return list(modules)


def output_config(plan: MergePlan) -> Callable[[dict[str, int]], dict[str, Any]]:
    """The PEFT config of the output as a function of the written ranks (rank_pattern for the odd ones)."""
    template = dict(plan.adapters[0].config)
    targets = target_modules(plan.adapters, list(plan.modules))
    main_rank = None if plan.output.target == "vllm" else plan.rank  # vllm: the one padded rank
    return lambda ranks: merged_config(template, ranks, targets, main_rank)


def _check_target(plan: MergePlan) -> None:
    """``--target vllm``: the config and tensor shapes the plan will write, against vLLM's rules, before
    any tensor is read."""
    rank = plan.output.served_rank
    if plan.output.target != "vllm" or rank is None:
        return
    dtype = str(plan.output.dtype).removeprefix("torch.")
    planned: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, spec in plan.modules.items():
        planned[f"{PREFIX}{name}.lora_A.weight"] = ((rank, *spec.a_shape[1:]), dtype)
        planned[f"{PREFIX}{name}.lora_B.weight"] = ((spec.b_shape[0], rank, *spec.b_shape[2:]), dtype)
    check_vllm(output_config(plan)(dict.fromkeys(plan.modules, rank)), planned)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraLegoError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _check_compatible(adapters: list[Adapter], force: bool) -> list[str]:
    """Refuse adapters that cannot share one output; return warnings for what --force let through."""
    warnings: list[str] = []
    bases = sorted({a.base_model for a in adapters if a.base_model})
    if len(bases) > 1:
        message = f"adapters name different base models: {', '.join(bases)}"
        if not force:
            raise LoraLegoError(message + " (use --force to merge anyway)")
        warnings.append(message + "; merging anyway (--force)")
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        raise LoraLegoError("adapters disagree on fan_in_fan_out; they cannot share one output")
    # Inputs of different formats share canonical module names (adapters/names.py): they merge layer by layer.
    shapes: dict[str, tuple[tuple[int, ...], int, str]] = {}
    for adapter in adapters:
        for module, info in adapter.modules.items():
            shape = (info.a_shape[1:], info.d_out, adapter.name)
            if module in shapes and shapes[module][:2] != shape[:2]:
                first = shapes[module]
                raise LoraLegoError(
                    f"module {module}: {first[2]} adapts a {first[1]}x{math.prod(first[0])} weight but "
                    f"{adapter.name} a {info.d_out}x{info.d_in} one (different base models?)"
                )
            shapes.setdefault(module, shape)
    return warnings


def _weights(options: MergeOptions, method: MergeMethod, n: int) -> list[float]:
    if options.weights is None:
        return [1.0 / n if method.average_by_default else 1.0] * n
    if len(options.weights) != n:
        raise LoraLegoError(f"--weights: got {len(options.weights)} weights for {n} adapters")
    return list(options.weights)


def _weight_override_warnings(options: MergeOptions, adapters: list[Adapter]) -> list[str]:
    overrides = options.weight_overrides or []
    if len(overrides) > len(adapters):
        raise LoraLegoError(f"--weight-override {len(overrides)}:...: there are only {len(adapters)} inputs")
    return [
        f"--weight-override {index + 1}:{pattern}: matches no module of {adapters[index].name}"
        for index, patterns in enumerate(overrides)
        for pattern in unused_patterns(patterns, adapters[index].modules)
    ]


def _plan_module(
    name: str,
    adapters: list[Adapter],
    method: MergeMethod,
    params: MethodParams,
    options: MergeOptions,
    rank: int | None,
    weights: list[float],
) -> ModulePlan:
    indices = tuple(j for j, adapter in enumerate(adapters) if name in adapter.modules)
    infos = [adapters[j].modules[name] for j in indices]
    source_ranks = tuple(info.rank for info in infos)
    if method.equal_ranks and len(set(source_ranks)) > 1:
        raise LoraLegoError(
            f"method {method.name} needs equal ranks, but module {name} has ranks "
            f"{sorted(set(source_ranks))}; use cat, svd or lego for mixed ranks"
        )
    override = override_for(options.rank_overrides, name)
    requested = override is not None or options.rank is not None or options.energy is not None
    request = RankRequest(
        module=name,
        rank=override if override is not None else rank,
        requested=requested,
        energy=options.energy,
        source_ranks=list(source_ranks),
        d_out=infos[0].d_out,
        d_in=infos[0].d_in,
    )
    return ModulePlan(
        name=name,
        adapter_indices=indices,
        source_ranks=source_ranks,
        rank=method.output_rank(params, request),
        rank_requested=requested,
        a_shape=(1, *infos[0].a_shape[1:]),
        b_shape=(infos[0].b_shape[0], 1, *infos[0].b_shape[2:]),
        weights=tuple(module_weight(weights, options.weight_overrides, j, name) for j in indices),
    )


def _output(adapters: list[Adapter], options: MergeOptions, modules: dict[str, ModulePlan]) -> OutputSpec:
    fmt = output_format(adapters, options.format)
    if options.dtype == "auto":
        dtypes = {a.dtype for a in adapters}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    else:
        dtype = getattr(torch, options.dtype)  # one of float32, float16, bfloat16 (validated by MergeOptions)
    if options.target != "vllm":
        return OutputSpec(fmt, dtype)
    check_vllm_inputs(adapters, fmt)
    return OutputSpec(fmt, dtype, "vllm", serving_rank(max(m.rank for m in modules.values())))


def plan_merge(adapters: list[Adapter], options: MergeOptions) -> MergePlan:
    """Resolve a merge from the inputs' headers and the options; refuse what cannot be merged, now."""
    if not adapters:
        raise LoraLegoError("no adapters to merge")
    method = get_method(options.method)
    params = options.parameters
    weights = _weights(options, method, len(adapters))
    warnings = _check_compatible(adapters, options.force)
    if options.energy is not None and not method.takes_rank:
        raise LoraLegoError(f"--energy picks an output rank, but method {method.name} does not take one")
    rank = options.rank
    if rank is None and not method.exact_by_default and options.energy is None:
        rank = max(info.rank for a in adapters for info in a.modules.values())
    names = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    modules = {name: _plan_module(name, adapters, method, params, options, rank, weights) for name in names}
    warnings += [f"--rank-override {p}: matches no module" for p in unused_patterns(options.rank_overrides, names)]
    warnings += _weight_override_warnings(options, adapters)
    plan = MergePlan(
        adapters=adapters,
        options=options,
        method=method,
        params=params,
        weights=weights,
        rank=rank,
        modules=modules,
        device=_resolve_device(options.device),
        output=_output(adapters, options, modules),
        warnings=tuple(warnings),
    )
    _check_target(plan)
    return plan
