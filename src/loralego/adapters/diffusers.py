"""Diffusers-style single-file LoRAs: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` keys in one
``*.safetensors`` file without an ``adapter_config.json`` (``unet.down_blocks...``, ``transformer...``,
``text_encoder...``), as diffusers' ``save_lora_weights`` and most diffusion trainers write them.

Alphas, in order of precedence: a ``<module>.alpha`` tensor; the LoRA config diffusers stores in the
``lora_adapter_metadata`` metadata key (``lora_alpha`` / ``alpha_pattern``, either bare or per component as
``transformer.lora_alpha``); otherwise ``alpha = rank`` (scale 1). Module names are kept as stored, except a
leading ``base_model.model.`` (PEFT's wrapper prefix, not a module name), so a bare PEFT state dict reads as
the same modules as its PEFT folder.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from .names import component_of
from .peft import pattern_value
from .singlefile import write_single_file

FORMAT = "diffusers"
METADATA_KEY = "lora_adapter_metadata"
_CONFIG_FIELDS = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "target_modules")


def metadata_configs(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """The LoRA configs in ``lora_adapter_metadata``: ``{"": config}`` when bare (one config for every
    module), else ``{component: config}`` from keys like ``transformer.lora_alpha``."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY} is not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY} must be a JSON object")
    if any(key in data for key in _CONFIG_FIELDS):
        return {"": data}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return configs


def metadata_alpha(configs: dict[str, dict[str, Any]], module: str, path: Path) -> float | None:
    if "" in configs:
        config, relative = configs[""], module
    else:
        component, _, relative = module.partition(".")
        if component not in configs:
            return None
        config = configs[component]
    if "lora_alpha" not in config and not config.get("alpha_pattern"):
        return None
    alpha = pattern_value(config.get("alpha_pattern") or {}, relative, config.get("lora_alpha"))
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha == 0 or alpha != alpha:
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY}: lora_alpha of {module} must be a non-zero number")
    return float(alpha)


def check_metadata(configs: dict[str, dict[str, Any]], path: Path) -> bool:
    """Refuse DoRA; return use_rslora (one value for every component)."""
    if any(config.get("use_dora") for config in configs.values()):
        raise LoraLegoError(
            f"{path}: metadata {METADATA_KEY}: DoRA (use_dora) is not supported (its magnitude vector rescales the "
            "whole weight, which no LoRA merge can carry)"
        )
    rslora = {bool(config.get("use_rslora", False)) for config in configs.values()}
    if len(rslora) > 1:
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY}: components disagree on use_rslora")
    return rslora == {True}


def alpha_metadata(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, str]:
    """``lora_adapter_metadata`` as diffusers' ``save_lora_weights`` writes it: per component (``unet.r``,
    ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, ``unet.target_modules``), the most
    common rank as ``r`` with its alpha, every other module's rank and alpha as full-path patterns."""
    by_component: dict[str, dict[str, str]] = {}
    for module in ranks:
        component = component_of(module)
        prefix = component or ""
        relative = module[len(component) + 1 :] if component else module
        by_component.setdefault(prefix, {})[relative] = module
    packed: dict[str, Any] = {}
    for component, modules in sorted(by_component.items()):
        counts = Counter((ranks[m], alphas[m]) for m in modules.values())
        (main_rank, main_alpha), _ = max(sorted(counts.items()), key=lambda item: item[1])
        config = {
            "r": main_rank,
            "lora_alpha": main_alpha,
            "rank_pattern": {rel: ranks[m] for rel, m in modules.items() if ranks[m] != main_rank},
            "alpha_pattern": {rel: alphas[m] for rel, m in modules.items() if alphas[m] != main_alpha},
            "target_modules": sorted(modules),
            "use_dora": False,
            "use_rslora": False,
        }
        for key, value in config.items():
            packed[f"{component}.{key}" if component else key] = value
    return {METADATA_KEY: json.dumps(packed, sort_keys=True)}


def write_diffusers_file(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write canonical ``(module, A, B)`` as a diffusers file (``lora_A`` / ``lora_B`` / ``alpha``)."""
    return write_single_file(
        Path(out), FORMAT, tensors=tensors, alphas=alphas, metadata=metadata, force=force, alpha_metadata=alpha_metadata
    )
