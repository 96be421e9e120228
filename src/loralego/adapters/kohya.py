"""Kohya-style single-file LoRAs (sd-scripts, ComfyUI, A1111): one ``*.safetensors`` file with, per module,
``<module>.lora_down.weight`` (A), ``<module>.lora_up.weight`` (B) and ``<module>.alpha``.

Module names are kept exactly as stored (``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te1_...``/``lora_te2_...`` for SDXL, ``lora_unet_double_blocks_0_img_attn_qkv`` for Flux): they
flatten the model's dotted names into underscores, which cannot be undone without the model, so kohya
files are merged and written as kohya files only. A missing ``alpha`` means ``alpha = rank`` (scale 1), as
in every kohya loader. Conv LoRAs (LoCon) store ``lora_down`` as ``r x in x kh x kw`` and ``lora_up`` as
``out x r x 1 x 1``; the merge sees them flattened and the writer restores the shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import LoraLegoError
from .base import Adapter
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

FORMAT = "kohya"
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_down|lora_up)\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")


def is_kohya_key(key: str) -> bool:
    return _FACTOR.match(key) is not None


def _rslora(metadata: dict[str, str]) -> bool:
    """LyCORIS records ``rs_lora`` in ``ss_network_args``; it makes the scale ``alpha / sqrt(r)``."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return False
    value = args.get("rs_lora") if isinstance(args, dict) else None
    return str(value).lower() in ("true", "1")


def load_kohya(path: str | Path, name: str | None = None) -> Adapter:
    """Open a kohya LoRA file lazily: headers and alphas are read and checked, factors on demand."""
    path = Path(path)
    weights = open_safetensors(path)
    groups: dict[str, dict[str, str]] = {}
    alpha_keys: dict[str, str] = {}
    for key in weights.keys:
        feature = unsupported_feature(key)
        if feature is not None:
            raise LoraLegoError(f"{path}: tensor {key}: {feature} is not supported (only plain LoRA)")
        factor = _FACTOR.match(key)
        if factor is not None:
            slot = groups.setdefault(factor["module"], {})
            if factor["which"] in slot:
                raise LoraLegoError(f"{path}: tensor {key}: module {factor['module']} has two {factor['which']}")
            slot[factor["which"]] = key
            continue
        alpha = _ALPHA.match(key)
        if alpha is not None:
            alpha_keys[alpha["module"]] = key
            continue
        raise LoraLegoError(
            f"{path}: tensor {key}: not a kohya LoRA tensor (expected '<module>.lora_down.weight', "
            "'<module>.lora_up.weight' or '<module>.alpha')"
        )
    pairs = pair_factors(path, groups, alpha_keys, ("lora_down", "lora_up"), ("lora_down", "lora_up"))
    alphas = {module: read_alpha(path, key, weights.get(key)) for module, key in alpha_keys.items()}
    architecture = weights.metadata.get("modelspec.architecture")
    config = {"base_model_name_or_path": architecture} if architecture else {}
    return build_adapter(
        path,
        weights,
        pairs,
        alphas,
        fmt=FORMAT,
        factor_names=("lora_down", "lora_up"),
        name=name,
        config=config,
        use_rslora=_rslora(weights.metadata),
    )


def write_kohya_file(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    modules: list[str] | None = None,
) -> Path:
    """Write ``(module, A, B)`` as a kohya file, atomically, streaming. ``alphas`` default to the rank
    (scale 1, what a merge produces); every module gets an explicit ``alpha`` so no loader has to guess."""
    out = Path(out)
    require_safetensors_path(out, FORMAT)
    names = (
        None
        if modules is None
        else [f"{m}.{x}" for m in modules for x in ("lora_down.weight", "lora_up.weight", "alpha")]
    )
    with atomic_file(out, force=force) as tmp, SafetensorsStreamWriter(tmp, metadata, names) as writer:
        for module, lora_a, lora_b in tensors:
            alpha = (alphas or {}).get(module, float(lora_a.shape[0]))
            writer.add(f"{module}.lora_down.weight", lora_a)
            writer.add(f"{module}.lora_up.weight", lora_b)
            writer.add(f"{module}.alpha", alpha_tensor(alpha))
    return out
