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
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from .base import Adapter
from .peft import PREFIX, pattern_value
from .safetensors_stream import SafetensorsStreamWriter
from .singlefile import (
    alpha_tensor,
    atomic_file,
    build_adapter,
    open_safetensors,
    pair_factors,
    read_alpha,
    require_safetensors_path,
    unsupported_feature,
)

FORMAT = "diffusers"
METADATA_KEY = "lora_adapter_metadata"
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_OLD_FORMAT = re.compile(r"\.lora\.(down|up)\.weight$|_lora\.(down|up)\.weight$|lora_linear_layer")
_CONFIG_FIELDS = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "target_modules")


def is_diffusers_key(key: str) -> bool:
    return _FACTOR.match(key) is not None


def _metadata_configs(metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
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


def _metadata_alpha(configs: dict[str, dict[str, Any]], module: str, path: Path) -> float | None:
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


def load_diffusers(path: str | Path, name: str | None = None) -> Adapter:
    """Open a diffusers-style LoRA file lazily: headers, alphas and metadata are read, factors on demand."""
    path = Path(path)
    weights = open_safetensors(path)
    groups: dict[str, dict[str, str]] = {}
    alpha_keys: dict[str, str] = {}
    for key in weights.keys:
        feature = unsupported_feature(key)
        if feature is not None:
            raise LoraLegoError(f"{path}: tensor {key}: {feature} is not supported (only plain LoRA)")
        factor = _FACTOR.match(key)
        alpha = _ALPHA.match(key)
        if factor is not None:
            module = factor["module"].removeprefix(PREFIX)
            slot = groups.setdefault(module, {})
            if factor["which"] in slot:
                raise LoraLegoError(f"{path}: tensor {key}: module {module} has two lora_{factor['which']} tensors")
            slot[factor["which"]] = key
        elif alpha is not None:
            alpha_keys[alpha["module"].removeprefix(PREFIX)] = key
        elif _OLD_FORMAT.search(key):
            raise LoraLegoError(
                f"{path}: tensor {key}: an old diffusers attention-processor LoRA (lora.down/lora.up); "
                "convert it with diffusers first"
            )
        else:
            raise LoraLegoError(
                f"{path}: tensor {key}: not a LoRA factor (expected '<module>.lora_A.weight', "
                "'<module>.lora_B.weight' or '<module>.alpha')"
            )
    pairs = pair_factors(path, groups, alpha_keys, ("A", "B"), ("lora_A", "lora_B"))

    configs = _metadata_configs(weights.metadata, path)
    if any(config.get("use_dora") for config in configs.values()):
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY}: DoRA (use_dora) is not supported (only plain LoRA)")
    rslora = {bool(config.get("use_rslora", False)) for config in configs.values()}
    if len(rslora) > 1:
        raise LoraLegoError(f"{path}: metadata {METADATA_KEY}: components disagree on use_rslora")
    alphas: dict[str, float] = {}
    for module in pairs:
        if module in alpha_keys:
            alphas[module] = read_alpha(path, alpha_keys[module], weights.get(alpha_keys[module]))
        else:
            found = _metadata_alpha(configs, module, path)
            if found is not None:
                alphas[module] = found
    return build_adapter(
        path,
        weights,
        pairs,
        alphas,
        fmt=FORMAT,
        factor_names=("lora_A", "lora_B"),
        name=name,
        use_rslora=rslora == {True},
    )


def write_diffusers_file(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    modules: list[str] | None = None,
) -> Path:
    """Write ``(module, A, B)`` as a diffusers-style file, atomically, streaming.

    Every module gets an explicit ``<module>.alpha`` (default: its rank, scale 1): loaders that build one
    config for the whole file would otherwise give all modules the first module's ``alpha / r``, which is
    wrong as soon as ranks differ (e.g. an exact ``cat`` merge).
    """
    out = Path(out)
    require_safetensors_path(out, FORMAT)
    names = (
        None if modules is None else [f"{m}.{x}" for m in modules for x in ("lora_A.weight", "lora_B.weight", "alpha")]
    )
    with atomic_file(out, force=force) as tmp, SafetensorsStreamWriter(tmp, metadata, names) as writer:
        for module, lora_a, lora_b in tensors:
            alpha = (alphas or {}).get(module, float(lora_a.shape[0]))
            writer.add(f"{module}.lora_A.weight", lora_a)
            writer.add(f"{module}.lora_B.weight", lora_b)
            writer.add(f"{module}.alpha", alpha_tensor(alpha))
    return out
