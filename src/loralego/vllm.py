"""``--target vllm``: a PEFT folder that vLLM's LoRA loader accepts, checked before it is written.

The rules, from vLLM's documentation and its PEFT loading conventions (``LoRAConfig.max_lora_rank``, the
PEFT helper's feature checks, the LoRA weight-name parser):

- ``--max-lora-rank`` takes one of 8, 16, 32, 64, 128, 256, 320, 512 and must be at least the adapter's
  rank; vLLM scales every module by one ``lora_alpha / r`` from the config and ignores ``rank_pattern`` /
  ``alpha_pattern``. So the output has one rank ``r`` from that list for every module and ``lora_alpha = r``
  (scale 1, what a merge produces), with no per-module patterns.
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
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .adapters.base import Adapter
from .adapters.peft import CONFIG_NAME, PREFIX, SAFETENSORS_NAME, write_peft_folder
from .adapters.safetensors_stream import SafetensorsStreamWriter
from .errors import LoraLegoError

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
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


def safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """``{name: (shape, dtype)}`` from a safetensors header, without reading any tensor data."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items() if name != "__metadata__"}


def check_vllm_folder(folder: str | Path) -> int:
    """:func:`check_vllm` on a written PEFT folder; returns the ``--max-lora-rank`` to serve it with."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return check_vllm(config, safetensors_header(folder / SAFETENSORS_NAME))


def pad_all(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """In-memory variant (``loralego.merge``): pad every module to one vLLM rank."""
    rank = serving_rank(max(a.shape[0] for a, _ in tensors.values()))
    return {module: pad_rank(a, b, rank) for module, (a, b) in tensors.items()}


def write_vllm_folder(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    config: Callable[[dict[str, int]], dict[str, Any]],
    metadata: dict[str, str] | None = None,
    force: bool = False,
    card: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> int:
    """Write a vLLM-ready PEFT folder, atomically; returns the ``--max-lora-rank`` to use.

    The serving rank is the largest merged rank rounded up to a vLLM value, known only once every module is
    merged: modules are streamed unpadded into a scratch file beside ``out``, then padded while being
    streamed into the folder. The final config and tensor shapes go through :func:`check_vllm` before
    anything is written at ``out``.
    """
    out = Path(out)
    if out.exists() and not (force and out.is_dir()):  # refuse before merging, as the other writers do
        what = (
            "folder already exists (use --force to replace it)" if out.is_dir() else "path exists and is not a folder"
        )
        raise LoraLegoError(f"{out}: output {what}")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.vllm-", dir=parent))
    try:
        ranks: dict[str, int] = {}
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {}
        unpadded = scratch / "unpadded.safetensors"
        with SafetensorsStreamWriter(unpadded) as writer:
            for index, (module, lora_a, lora_b) in enumerate(tensors):
                writer.add(f"{index}.A", lora_a)
                writer.add(f"{index}.B", lora_b)
                ranks[module] = int(lora_a.shape[0])
                shapes[module] = (tuple(lora_a.shape), tuple(lora_b.shape), str(lora_a.dtype).removeprefix("torch."))
        if not ranks:
            raise LoraLegoError("--target vllm: the merge produced no modules")
        rank = serving_rank(max(ranks.values()))
        final_config = config(dict.fromkeys(ranks, rank))
        planned = {}
        for module, (a_shape, b_shape, dtype) in shapes.items():
            planned[f"{PREFIX}{module}.lora_A.weight"] = ((rank, *a_shape[1:]), dtype)
            planned[f"{PREFIX}{module}.lora_B.weight"] = ((b_shape[0], rank, *b_shape[2:]), dtype)
        check_vllm(final_config, planned)

        def padded() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
            from safetensors import safe_open

            with safe_open(str(unpadded), framework="pt") as handle:
                for index, module in enumerate(ranks):
                    yield (module, *pad_rank(handle.get_tensor(f"{index}.A"), handle.get_tensor(f"{index}.B"), rank))

        write_peft_folder(
            out,
            tensors=padded(),
            config=final_config,
            metadata=metadata,
            force=force,
            card=card,
            extra_files=extra_files,
            modules=list(ranks),
        )
        return rank
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
