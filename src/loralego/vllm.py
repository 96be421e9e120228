"""``--target vllm``: a PEFT folder that vLLM's LoRA loader accepts, checked before it is written.

The rules, from vLLM's documentation and its PEFT loading conventions (``LoRAConfig.max_lora_rank``, the
PEFT helper's feature checks, the LoRA weight-name parser):

- ``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's ``MaxLoRARanks``) and must be
  at least the adapter's rank; vLLM scales every module by one ``lora_alpha / r`` from the config and ignores
  ``rank_pattern`` / ``alpha_pattern``. So the output has one rank ``r`` from that list for every module and
  ``lora_alpha = r`` (scale 1, what a merge produces), with no per-module patterns.
- no ``modules_to_save``, no DoRA, no LoRA bias (``bias: none``);
- tensor names ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; 2-D factors only (vLLM
  serves language models: no conv LoRAs), ``lora_A`` ``r x d_in`` and ``lora_B`` ``d_out x r``.

Modules whose merged rank is below the chosen ``r`` are padded with zero units: rows of zeros in A and
columns of zeros in B add ``0 * 0^T`` to the update, so it is unchanged, bit for bit. Padding rather than
refusing keeps every ``--rank`` usable (``--rank 12`` is served at 16) and lets exact merges (``cat``, whose
rank is the sum of the inputs') be served; the cost is memory for the zero units only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .adapters.base import Adapter
from .adapters.peft import CONFIG_NAME, PREFIX, SAFETENSORS_NAME
from .adapters.safetensors_read import parse_header
from .errors import LoraLegoError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_KEY = re.compile(rf"^{re.escape(PREFIX)}(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")

TensorSpec = tuple[tuple[int, ...], str]


def serving_rank(max_rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``max_rank``."""
    for rank in VLLM_RANKS:
        if rank >= max_rank:
            return rank
    raise LoraLegoError(
        f"--target vllm: the merged rank {max_rank} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); "
        f"merge with --rank {VLLM_RANKS[-1]} or less"
    )


def pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append zero units up to ``rank``: zero rows in A (dim 0), zero columns in B (dim 1); update unchanged."""
    extra = rank - lora_a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {lora_a.shape[0]} down to {rank}")
    if extra == 0:
        return lora_a, lora_b
    zeros_a = lora_a.new_zeros((extra, *lora_a.shape[1:]))
    zeros_b = lora_b.new_zeros((lora_b.shape[0], extra, *lora_b.shape[2:]))
    return torch.cat([lora_a, zeros_a], dim=0), torch.cat([lora_b, zeros_b], dim=1)


def check_inputs(adapters: list[Adapter], out_format: str) -> None:
    """What can be known before merging: the output is a PEFT folder of linear (2-D) LoRAs."""
    if out_format != "peft":
        raise LoraLegoError(
            f"--target vllm writes a PEFT folder, but the output format is {out_format} "
            "(vLLM serves PEFT adapters of language models)"
        )
    for adapter in adapters:
        for module, info in adapter.modules.items():
            if len(info.a_shape) != 2:
                raise LoraLegoError(
                    f"--target vllm: module {module} of {adapter.name} is a conv LoRA; vLLM serves linear LoRAs only"
                )


def _spec(value: Any) -> TensorSpec:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    shape, dtype = value
    return tuple(shape), str(dtype)


def check_vllm(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> int:
    """Check a PEFT config and its tensors (``{name: tensor}`` or ``{name: (shape, dtype)}``) against vLLM's
    rules; raise :class:`LoraLegoError` naming the first broken rule, else return the ``--max-lora-rank``."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraLegoError(f"vLLM: peft_type must be LORA, got {config.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoraLegoError(f"vLLM: adapter_config.json needs {key!r}")
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank not in VLLM_RANKS:
        raise LoraLegoError(f"vLLM: r = {rank!r} is not a --max-lora-rank value ({', '.join(map(str, VLLM_RANKS))})")
    if config["lora_alpha"] != rank:
        raise LoraLegoError(f"vLLM target: lora_alpha must equal r = {rank} (scale 1), got {config['lora_alpha']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LoraLegoError(
                f"vLLM: {key} is ignored by vLLM (one rank and alpha for all modules); it must be empty"
            )
    if config.get("modules_to_save"):
        raise LoraLegoError("vLLM: modules_to_save must be None")
    if config.get("use_dora"):
        raise LoraLegoError("vLLM: DoRA (use_dora) is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise LoraLegoError("vLLM: LoRA bias is not supported (bias must be 'none')")
    if config.get("use_rslora"):
        raise LoraLegoError("vLLM target: use_rslora must be false (the scale must be alpha / r = 1)")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        raise LoraLegoError("vLLM: target_modules must be a module-name list or a pattern")
    modules: dict[str, dict[str, TensorSpec]] = {}
    for name, value in tensors.items():
        match = _KEY.match(name)
        if match is None:
            raise LoraLegoError(f"vLLM: tensor {name}: expected '{PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
        shape, dtype = _spec(value)
        modules.setdefault(match["module"], {})[match["which"]] = (shape, dtype)
    if not modules:
        raise LoraLegoError("vLLM: the adapter holds no LoRA tensors")
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LoraLegoError(f"vLLM: module {module} has no {missing} tensor")
        (a_shape, _), (b_shape, _) = pair["A"], pair["B"]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise LoraLegoError(f"vLLM: module {module}: factors must be 2-D (linear LoRA), got {a_shape} / {b_shape}")
        if a_shape[0] != rank or b_shape[1] != rank:
            raise LoraLegoError(
                f"vLLM: module {module}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not have rank r = {rank}"
            )
    return rank


def check_vllm_folder(folder: str | Path) -> int:
    """:func:`check_vllm` on a written PEFT folder; returns the ``--max-lora-rank`` to serve it with."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    entries, _, _ = parse_header(folder / SAFETENSORS_NAME)  # the one safetensors header parser
    return check_vllm(config, {name: (tuple(e["shape"]), e["dtype"]) for name, e in entries.items()})
