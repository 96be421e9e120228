"""The merge pipeline: run a plan (``plan.py``) module by module, holding one module's pool at a time, and
write the result."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapters import Adapter, memory_adapter
from .adapters.formats import SINGLE_FILE_FORMATS, output_metadata, sidecar_path, write_adapter
from .errors import LoraLegoError
from .finite import all_finite
from .lowrank import rank_for_energy
from .methods import ModuleJob, ModuleResult
from .msu import Factors, concat
from .options import MergeOptions, make_options
from .parallel import default_workers, intra_op_threads, ordered_map, prefetch
from .plan import MergePlan, ModulePlan, output_config, plan_merge
from .safeio import refuse_overlap
from .vllm import pad_rank

__all__ = [
    "MergePlan",
    "iter_merged",
    "merge",
    "merge_module",
    "merge_to_folder",
    "module_seed",
    "plan_merge",
    "write_merged",
]

# Called with each module's result and the tensors written for it (output dtype, stored shape, padding).
OnModule = Callable[[str, ModuleResult, tuple[torch.Tensor, torch.Tensor]], None]

def module_seed(seed: int, module: str) -> int:
    """A per-module seed from the user's seed and the module name (independent of module order)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def module_rank(plan: MergePlan, module: ModulePlan, factors: list[Factors]) -> int:
    """The module's k: the planned one, or with ``--energy`` the rank that keeps that much of the module's
    ensemble energy, at most the planned one."""
    if plan.energy is None:
        return module.rank
    return min(module.rank, rank_for_energy(*concat(factors), plan.energy))


def read_module(plan: MergePlan, module: str) -> list[Factors]:
    """Read and fold one module's factors from every input that has it (in input order), checked."""
    spec = plan.modules[module]
    factors = [
        plan.adapters[j].folded(module, weight, plan.device)
        for j, weight in zip(spec.adapter_indices, spec.weights, strict=True)
    ]
    for j, pair in zip(spec.adapter_indices, factors, strict=True):
        _check_folded(plan.adapters[j], module, pair)
    return factors


def merge_module(plan: MergePlan, module: str, factors: list[Factors] | None = None) -> ModuleResult:
    """Merge one module (reading it first unless its ``factors`` are given); only this module is in memory."""
    spec = plan.modules[module]
    if factors is None:
        factors = read_module(plan, module)
    job = ModuleJob(
        module=module,
        factors=factors,
        adapter_indices=list(spec.adapter_indices),
        source_ranks=list(spec.source_ranks),
        rank=module_rank(plan, spec, factors),
        rank_requested=spec.rank_requested,
        seed=module_seed(plan.options.seed, module),
        params=plan.params,
    )
    result = plan.method.merge(job)
    if not (all_finite(result.lora_a) and all_finite(result.lora_b)):
        raise LoraLegoError(f"module {module}: the {plan.method.name} merge produced NaN or Inf")
    return result


def _stored(plan: MergePlan, module: str, result: ModuleResult) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast to the output dtype, restore conv shapes (``A: k x in x kh x kw``, ``B: out x k x 1 x 1``) and pad
    to the served rank of ``--target vllm`` (zero units: the update is unchanged)."""
    spec = plan.modules[module]
    k = result.lora_a.shape[0]
    lora_a = result.lora_a.reshape(k, *spec.a_shape[1:])
    lora_b = result.lora_b.reshape(spec.b_shape[0], k, *spec.b_shape[2:])
    stored = (
        lora_a.to(device="cpu", dtype=plan.output.dtype).contiguous(),
        lora_b.to(device="cpu", dtype=plan.output.dtype).contiguous(),
    )
    if not all(all_finite(tensor) for tensor in stored):  # e.g. float16 overflows at 65504
        name = str(plan.output.dtype).removeprefix("torch.")
        raise LoraLegoError(f"module {module}: the merged weights overflow {name}; use --dtype float32")
    if plan.output.served_rank is not None:
        stored = pad_rank(*stored, plan.output.served_rank)
    return stored


def iter_merged(
    plan: MergePlan, on_module: OnModule | None = None, *, workers: int | None = None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(module, A, B)`` as written (output dtype, stored shape, padding), in module order.

    On the CPU, ``workers`` modules (default: torch's thread count) are merged at once, each on one thread
    (see :mod:`loralego.parallel`), while a reader thread reads up to ``workers + 1`` modules ahead; memory
    holds at most ``2 workers + 2`` modules' pools. ``--executor ray`` runs the same jobs as Ray tasks.
    """
    workers = default_workers(plan.device) if workers is None else max(1, workers)
    names = list(plan.modules)
    with intra_op_threads(1) if workers > 1 else contextlib.nullcontext():
        if plan.options.executor == "ray":  # the same jobs as Ray tasks (ray_executor.py)
            from .ray_executor import ray_merged

            merged = ray_merged(plan, plan.options.ray_address)
        else:
            # A reader thread keeps the next modules read (at most workers + 1 ahead): reading overlaps compute.
            reads = prefetch(((module, read_module(plan, module)) for module in names), depth=workers + 1)
            merged = ordered_map(lambda item: merge_module(plan, *item), reads, workers)
        for module, result in zip(names, merged, strict=True):
            stored = _stored(plan, module, result)
            if on_module is not None:
                on_module(module, result, stored)
            del result  # hold nothing of this module once it is yielded
            yield (module, *stored)


# Options that say how a merge runs, not what it computes: left out of the output's record, so the bytes do
# not depend on them (--executor ray gives the local executor's bytes).
_NOT_RECORDED = {"force", "executor", "ray_address"}


def recorded_options(plan: MergePlan) -> dict[str, Any]:
    """The options as the merge records them: the common ones (but how it ran) and the method's parameters."""
    return plan.options.model_dump(mode="json", exclude=_NOT_RECORDED)


def provenance(plan: MergePlan) -> dict[str, str]:
    """Safetensors metadata recording how the output was made (strings only, deterministic)."""
    inputs = [
        {"name": a.name, "sha256": a.sha256, "weight": w} for a, w in zip(plan.adapters, plan.weights, strict=True)
    ]
    return {
        "loralego.version": __version__,
        "loralego.method": plan.method.name,
        "loralego.options": json.dumps(recorded_options(plan), sort_keys=True),
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
    lines += ["Options:", "", "```json", json.dumps(recorded_options(plan), indent=2, sort_keys=True), "```", ""]
    lines += ["Inputs:", "", "| adapter | weight | sha256 |", "|---|---|---|"]
    lines += [f"| {a.name} | {w:g} | `{a.sha256}` |" for a, w in zip(plan.adapters, plan.weights, strict=True)]
    return "\n".join(lines) + "\n"


def merge(adapters: list[Adapter], options: MergeOptions | None = None, **overrides: Any) -> Adapter:
    """Merge adapters in memory and return the merged adapter (scale 1, ``lora_alpha = r``).

    ``options`` and keyword overrides are the common options of :class:`MergeOptions` and the method's own
    parameters, by name (``loralego.merge(adapters, method="ties", rank=8, density=0.3)``).
    """
    plan = plan_merge(list(adapters), make_options(options, **overrides))
    tensors = {module: (lora_a, lora_b) for module, lora_a, lora_b in iter_merged(plan)}
    ranks = {module: int(pair[0].shape[0]) for module, pair in tensors.items()}
    merged = memory_adapter(
        f"merged-{plan.method.name}",
        tensors,
        config=output_config(plan)(ranks),
        dtype=plan.output.dtype,
        metadata=output_metadata(plan.adapters, provenance(plan), plan.rank),
        order=list(plan.modules),
    )
    merged.format = plan.output.format
    return merged


def input_paths(adapters: list[Adapter]) -> list[Path]:
    """The paths every write must keep clear of (checked file by file in :func:`safeio.refuse_overlap`)."""
    return [adapter.path for adapter in adapters if adapter.path is not None]


def _refuse_overlap(out: Path, adapters: list[Adapter], extra_files: dict[str, str] | None, fmt: str) -> None:
    refuse_overlap(out, input_paths(adapters))
    if fmt in SINGLE_FILE_FORMATS:  # the recipe copy goes beside a single-file output
        for name in extra_files or {}:
            refuse_overlap(sidecar_path(out, name), input_paths(adapters), "output file")


def merge_to_folder(
    adapters: list[Adapter],
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    command: str | None = None,
    on_module: OnModule | None = None,
    extra_files: dict[str, str] | None = None,
    **overrides: Any,
) -> MergePlan:
    """Plan, merge and stream the result into the output format's folder or file (see :func:`write_merged`)."""
    plan = plan_merge(list(adapters), make_options(options, **overrides))
    write_merged(plan, out, command=command, on_module=on_module, extra_files=extra_files)
    return plan


def write_merged(
    plan: MergePlan,
    out: str | Path,
    *,
    command: str | None = None,
    on_module: OnModule | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Run ``plan`` and stream the result into its output format's folder or file, atomically; modules are
    written as they finish. ``command`` (what the user ran) goes into the model card; ``extra_files`` (e.g.
    the recipe) go inside a PEFT folder, beside a single file."""
    out = Path(out)
    _refuse_overlap(out, plan.adapters, extra_files, plan.output.format)
    write_adapter(
        plan.output.format,
        out,
        tensors=iter_merged(plan, on_module),
        config=output_config(plan),
        metadata=output_metadata(plan.adapters, provenance(plan), plan.rank),
        force=plan.options.force,
        card=model_card(plan, command) if plan.output.format == "peft" else None,
        extra_files=extra_files,
        modules=list(plan.modules),
    )
