"""The merge pipeline: plan once, then merge module by module, holding one module's pool at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters import Adapter, memory_adapter, natural_key
from .adapters.formats import output_format, output_metadata, write_adapter
from .adapters.peft import merged_config
from .errors import LoraLegoError
from .finite import all_finite
from .lowrank import rank_for_energy
from .methods import MergeMethod, ModuleJob, ModuleResult, get_method
from .msu import Factors, concat
from .options import MergeOptions, make_options
from .overrides import override_for, unused_patterns
from .parallel import default_workers, intra_op_threads, ordered_map, prefetch
from .vllm import pad_all

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before the first tensor is read."""

    adapters: list[Adapter]
    options: MergeOptions
    method: MergeMethod
    modules: list[str]
    weights: list[float]
    rank: int | None
    device: torch.device
    out_dtype: torch.dtype
    warnings: tuple[str, ...] = ()
    out_format: str = "peft"


def module_seed(seed: int, module: str) -> int:
    """A per-module seed from the user's seed and the module name (independent of module order)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    if len({a.format for a in adapters}) > 1:
        raise LoraLegoError("adapters are in different formats: " + ", ".join(sorted({a.format for a in adapters})))
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


def plan_merge(adapters: list[Adapter], options: MergeOptions) -> MergePlan:
    if not adapters:
        raise LoraLegoError("no adapters to merge")
    method = get_method(options.method)
    if options.weights is not None:
        weights = list(options.weights)
    else:
        weights = [1.0 / len(adapters) if method.average_by_default else 1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoraLegoError(f"--weights: got {len(weights)} weights for {len(adapters)} adapters")
    warnings = _check_compatible(adapters, options.force)
    modules = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    if method.equal_ranks:
        for module in modules:
            ranks = {a.modules[module].rank for a in adapters if module in a.modules}
            if len(ranks) > 1:
                raise LoraLegoError(
                    f"method {method.name} needs equal ranks, but module {module} has ranks "
                    f"{sorted(ranks)}; use cat, svd or lego for mixed ranks"
                )
    if options.energy is not None and not method.takes_rank:
        raise LoraLegoError(f"--energy picks an output rank, but method {method.name} does not take one")
    rank = options.rank
    if rank is None and not method.exact_by_default and options.energy is None:
        rank = max(info.rank for a in adapters for info in a.modules.values())
    out_format = output_format(adapters, options.format, options.target)
    warnings += [f"--rank-override {p}: matches no module" for p in unused_patterns(options.rank_overrides, modules)]
    if options.dtype == "auto":
        dtypes = {a.dtype for a in adapters}
        out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    else:
        out_dtype = _DTYPES[options.dtype]
    return MergePlan(
        adapters=adapters,
        options=options,
        method=method,
        modules=modules,
        weights=weights,
        rank=rank,
        device=_resolve_device(options.device),
        out_dtype=out_dtype,
        warnings=tuple(warnings),
        out_format=out_format,
    )


# Folded factors above this Frobenius norm could overflow float32 in the methods' squared distances and
# products (k-means, Gram matrices) and fail there with an unrelated error; a trained LoRA is many orders of
# magnitude below it.
_MAX_FOLDED_NORM = 1e15


def _check_folded(adapter: Adapter, module: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Refuse finite but absurdly large weights (or an overflow of the scale and weight) before merging."""
    for which, tensor in zip(("lora_A", "lora_B"), factors, strict=True):
        # float32 is enough to compare with the limit: a norm past float32's range (~1e19) is inf, also refused.
        norm = float(torch.linalg.vector_norm(tensor))
        if not norm <= _MAX_FOLDED_NORM:
            raise LoraLegoError(
                f"{adapter.path or adapter.name}: module {module}: {which} is too large to merge "
                f"(norm {norm:.3g} after scaling by alpha/r and the weight; limit {_MAX_FOLDED_NORM:.0e})"
            )


def module_rank(plan: MergePlan, module: str, factors: list[Factors] | None = None) -> int | None:
    """The requested k of one module: the most specific ``--rank-override`` matching it, else ``--rank``;
    with ``--energy``, the rank that keeps that much of the module's ensemble energy, capped by the former."""
    override = override_for(plan.options.rank_overrides, module)
    rank = override if override is not None else plan.rank
    if plan.options.energy is not None and factors:
        needed = rank_for_energy(*concat(factors), plan.options.energy)
        rank = needed if rank is None else min(rank, needed)
    return rank


def read_module(plan: MergePlan, module: str) -> list[Factors]:
    """Read and fold one module's factors from every input that has it (in input order), checked."""
    indices = [j for j, adapter in enumerate(plan.adapters) if module in adapter.modules]
    factors = [plan.adapters[j].folded(module, plan.weights[j], plan.device) for j in indices]
    for j, pair in zip(indices, factors, strict=True):
        _check_folded(plan.adapters[j], module, pair)
    return factors


def merge_module(plan: MergePlan, module: str, factors: list[Factors] | None = None) -> ModuleResult:
    """Merge one module (reading it first unless its ``factors`` are given); only this module is in memory."""
    if factors is None:
        factors = read_module(plan, module)
    indices = [j for j, adapter in enumerate(plan.adapters) if module in adapter.modules]
    job = ModuleJob(
        module=module,
        factors=factors,
        adapter_indices=indices,
        source_ranks=[plan.adapters[j].modules[module].rank for j in indices],
        rank=module_rank(plan, module, factors),
        seed=module_seed(plan.options.seed, module),
        options=plan.options,
    )
    result = plan.method.merge(job)
    if not (all_finite(result.lora_a) and all_finite(result.lora_b)):
        raise LoraLegoError(f"module {module}: the {plan.method.name} merge produced NaN or Inf")
    return result


def _stored_shape(plan: MergePlan, module: str, result: ModuleResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast to the output dtype and restore conv shapes (``A: k x in x kh x kw``, ``B: out x k x 1 x 1``)."""
    info = next(a.modules[module] for a in plan.adapters if module in a.modules)
    k = result.lora_a.shape[0]
    lora_a = result.lora_a.reshape(k, *info.a_shape[1:])
    lora_b = result.lora_b.reshape(info.b_shape[0], k, *info.b_shape[2:])
    stored = (
        lora_a.to(device="cpu", dtype=plan.out_dtype).contiguous(),
        lora_b.to(device="cpu", dtype=plan.out_dtype).contiguous(),
    )
    if not all(all_finite(tensor) for tensor in stored):  # e.g. float16 overflows at 65504
        name = str(plan.out_dtype).removeprefix("torch.")
        raise LoraLegoError(f"module {module}: the merged weights overflow {name}; use --dtype float32")
    return stored


def iter_merged(
    plan: MergePlan, on_module: Callable[[str, ModuleResult], None] | None = None, *, workers: int | None = None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(module, A, B)`` in the output dtype and stored shape, in module order.

    On the CPU, ``workers`` modules (default: torch's thread count) are merged at once, each on one thread
    (see :mod:`loralego.parallel`), while a reader thread reads up to ``workers + 1`` modules ahead; memory
    holds at most ``2 workers + 2`` modules' pools.
    """
    workers = default_workers(plan.device) if workers is None else max(1, workers)
    with intra_op_threads(1) if workers > 1 else contextlib.nullcontext():
        if plan.options.executor == "ray":  # the same jobs as Ray tasks (ray_executor.py)
            from .ray_executor import ray_merged

            merged = ray_merged(plan, plan.options.ray_address)
        else:
            # A reader thread keeps the next modules read (at most workers + 1 ahead): reading overlaps compute.
            reads = prefetch(((module, read_module(plan, module)) for module in plan.modules), depth=workers + 1)
            merged = ordered_map(lambda item: merge_module(plan, *item), reads, workers)
        for module, result in zip(plan.modules, merged, strict=True):
            if on_module is not None:
                on_module(module, result)
            stored = _stored_shape(plan, module, result)
            del result  # hold nothing of this module once it is yielded
            yield (module, *stored)


def target_modules(adapters: list[Adapter], modules: list[str]) -> list[str]:
    """The output's target_modules: the union of the inputs' name lists when that describes the merged
    modules exactly; otherwise the full module names (which PEFT matches as suffixes)."""
    lists = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in lists) and not any(a.config.get("layers_to_transform") for a in adapters):
        union = sorted({name for t in lists for name in t})  # type: ignore[union-attr]
        if all(any(m == t or m.endswith("." + t) for t in union) for m in modules):
            return union
    return list(modules)


# Options that say how a merge runs, not what it computes: left out of the output's record, so the bytes do
# not depend on them (--executor ray gives the local executor's bytes).
_NOT_RECORDED = {"force", "executor", "ray_address"}


def provenance(plan: MergePlan) -> dict[str, str]:
    """Safetensors metadata recording how the output was made (strings only, deterministic)."""
    options = plan.options.model_dump(mode="json", exclude=_NOT_RECORDED)
    inputs = [
        {"name": a.name, "sha256": a.sha256, "weight": w} for a, w in zip(plan.adapters, plan.weights, strict=True)
    ]
    return {
        "loralego.version": __version__,
        "loralego.method": plan.method.name,
        "loralego.options": json.dumps(options, sort_keys=True),
        "loralego.inputs": json.dumps(inputs, sort_keys=True),
    }


def model_card(plan: MergePlan, command: str | None) -> str:
    """README.md of the output: what it is, the exact command, the options and the inputs' hashes."""
    base = plan.adapters[0].base_model
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- lora", "- loralego", f"- {plan.method.name}", "---", ""]
    lines += [
        f"# Merged LoRA ({plan.method.name})",
        "",
        f"Made by loralego {__version__} from {len(plan.adapters)} adapter(s) with method `{plan.method.name}`"
        + (f", rank {plan.rank}." if plan.rank is not None else ", exact rank."),
        "",
    ]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [
        "Options:",
        "",
        "```json",
        json.dumps(plan.options.model_dump(mode="json", exclude=_NOT_RECORDED), indent=2, sort_keys=True),
        "```",
        "",
    ]
    lines += ["Inputs:", "", "| adapter | weight | sha256 |", "|---|---|---|"]
    lines += [f"| {a.name} | {w:g} | `{a.sha256}` |" for a, w in zip(plan.adapters, plan.weights, strict=True)]
    return "\n".join(lines) + "\n"


def _output_config(plan: MergePlan) -> Callable[[dict[str, int]], dict[str, Any]]:
    template = dict(plan.adapters[0].config)
    targets = target_modules(plan.adapters, plan.modules)
    main_rank = None if plan.options.target == "vllm" else plan.rank  # vllm: the one padded rank
    return lambda ranks: merged_config(template, ranks, targets, main_rank)


def merge(adapters: list[Adapter], options: MergeOptions | None = None, **overrides: Any) -> Adapter:
    """Merge adapters in memory and return the merged adapter (scale 1, ``lora_alpha = r``).

    ``options`` and keyword overrides are the fields of :class:`MergeOptions` (the CLI's flags).
    """
    plan = plan_merge(list(adapters), make_options(options, **overrides))
    tensors = {module: (lora_a, lora_b) for module, lora_a, lora_b in iter_merged(plan)}
    if plan.options.target == "vllm":
        tensors = pad_all(tensors)
    ranks = {module: int(pair[0].shape[0]) for module, pair in tensors.items()}
    merged = memory_adapter(
        f"merged-{plan.method.name}",
        tensors,
        config=_output_config(plan)(ranks),
        dtype=plan.out_dtype,
        metadata=output_metadata(plan.adapters, provenance(plan), plan.rank),
        order=plan.modules,
    )
    merged.format = plan.out_format
    return merged


def _refuse_overlap(out: Path, adapters: list[Adapter]) -> None:
    target = out.resolve()
    for adapter in adapters:
        if adapter.path is None:
            continue
        source = adapter.path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise LoraLegoError(f"{out}: output overlaps input {adapter.path}; choose another folder")


def merge_to_folder(
    adapters: list[Adapter],
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    command: str | None = None,
    on_module: Callable[[str, ModuleResult], None] | None = None,
    extra_files: dict[str, str] | None = None,
    **overrides: Any,
) -> MergePlan:
    """Merge and stream the result into the output format's folder or file, atomically; modules are written as
    they finish. ``extra_files`` (e.g. the recipe) go inside a PEFT folder, beside a single file."""
    out = Path(out)
    plan = plan_merge(list(adapters), make_options(options, **overrides))
    _refuse_overlap(out, plan.adapters)
    if command is None:
        command = shlex.join(["loralego", *sys.argv[1:]]) if sys.argv[0].endswith("loralego") else None
    write_adapter(
        plan.out_format,
        out,
        tensors=iter_merged(plan, on_module),
        config=_output_config(plan),
        metadata=output_metadata(plan.adapters, provenance(plan), plan.rank),
        force=plan.options.force,
        card=model_card(plan, command) if plan.out_format == "peft" else None,
        extra_files=extra_files,
        target=plan.options.target,
        modules=plan.modules,
    )
    return plan
