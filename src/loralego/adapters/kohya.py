"""kohya-style single files (sd-scripts, A1111, ComfyUI, LyCORIS): ``<name>.lora_down.weight`` (A),
``<name>.lora_up.weight`` (B), ``<name>.alpha``, names ``lora_unet_...`` / ``lora_te_...`` (see names.py for
how they map to canonical module names). The reading and writing loops are the single-file core's
(singlefile.py); this module holds what only kohya files say: rsLoRA in ``ss_network_args`` and the base
model in ``modelspec.architecture``. A missing ``alpha`` means ``alpha = rank`` (scale 1), as in every
kohya loader. Conv LoRAs (LoCon) store ``lora_down`` as ``r x in x kh x kw`` and ``lora_up`` as
``out x r x 1 x 1``; a LoCon ``lora_mid`` (Tucker) is composed into the down factor exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .singlefile import write_single_file

FORMAT = "kohya"


def uses_rslora(metadata: dict[str, str]) -> bool:
    """LyCORIS records ``rs_lora`` in ``ss_network_args``; it makes the scale ``alpha / sqrt(r)``."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return False
    value = args.get("rs_lora") if isinstance(args, dict) else None
    return str(value).lower() in ("true", "1")


def base_model(metadata: dict[str, str]) -> dict[str, str]:
    """The config a kohya file implies: its ModelSpec architecture as the base model, if recorded."""
    architecture = metadata.get("modelspec.architecture")
    return {"base_model_name_or_path": architecture} if architecture else {}


def write_kohya_file(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    layout: str = FORMAT,
) -> Path:
    """Write canonical ``(module, A, B)`` as a kohya file (``layout`` ``kohya`` or ``kohya-sgm``)."""
    return write_single_file(Path(out), layout, tensors=tensors, alphas=alphas, metadata=metadata, force=force)
