"""Which reader opens a path, which writer an output goes through, and what metadata it carries.

Formats: ``peft`` (a folder with ``adapter_config.json``) and the single-file layouts (one reader and one
writer, singlefile.py): ``kohya`` (``lora_down``/``lora_up``/``alpha``, diffusers-style UNet names, BFL Flux
names), ``kohya-sgm`` (the same with SDXL's sgm UNet names, ``input_blocks_4_1_...``) and ``diffusers``
(``lora_A``/``lora_B`` with ``unet.``/``text_encoder.``/``transformer.`` names, as ``save_lora_weights``
writes them). Every input is read into canonical module names (names.py), so inputs of different layouts
merge module by module and any layout can be written; a module that has no name in the requested layout
(e.g. a language model's module in kohya) is refused before merging. The output format follows the first
input unless ``--format`` names another (the legacy diffusers layout, ``.lora.down``, is written as
``diffusers``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from ..safeio import check_destination
from . import diffusers, hub, kohya
from .base import Adapter
from .peft import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, load_peft, write_peft_folder
from .safetensors_read import SafetensorsFile
from .singlefile import (
    SINGLE_FILE_LAYOUTS,
    SUFFIX,
    read_single_file,
    unwritable,
    write_single_file,
    write_text_atomically,
)

FORMATS = ("peft", *SINGLE_FILE_LAYOUTS)
SINGLE_FILE_FORMATS = SINGLE_FILE_LAYOUTS

# Metadata of the first input that would be wrong on the merged file: hashes of the input's weights, the
# input's own LoRA config (diffusers prefers it over the tensors' alphas) and a previous merge's record.
_STALE_METADATA = {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata"}


def open_adapter(spec: str | Path, name: str | None = None, convert_to_lora: int | None = None) -> Adapter:
    """Open a PEFT folder, a kohya or diffusers ``.safetensors`` file, a folder holding one such file, or a
    Hugging Face model id already in the local hub cache (never downloaded)."""
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as error:  # e.g. a parent folder without search permission
        raise LoraLegoError(f"{path}: cannot open: {error.strerror or error}") from None
    if exists:
        return _open_path(path, name, convert_to_lora)
    cached = hub.resolve_cached(str(spec))
    if cached is None:
        hint = f", nor a model id in the local {hub.describe_cache()}" if hub.looks_like_repo_id(str(spec)) else ""
        raise LoraLegoError(f"{path}: no such file or folder{hint}")
    return _open_path(cached, name or str(spec), convert_to_lora)


def _open_path(path: Path, name: str | None, convert_to_lora: int | None = None) -> Adapter:
    if path.is_dir():
        # A PEFT weights file without its config has lost its scales: refuse rather than guess alpha = r.
        if (path / CONFIG_NAME).exists() or (path / SAFETENSORS_NAME).exists() or (path / BIN_NAME).exists():
            return load_peft(path, name=name)
        files = sorted(path.glob(f"*{SUFFIX}"))
        if len(files) == 1:
            return open_file(files[0], name or path.resolve().name, convert_to_lora)
        if len(files) > 1:
            listed = ", ".join(f.name for f in files[:4]) + (", ..." if len(files) > 4 else "")
            raise LoraLegoError(f"{path}: no {CONFIG_NAME} and several {SUFFIX} files ({listed}); name the file")
        return load_peft(path, name=name)  # its error names the missing adapter_config.json
    return open_file(path, name, convert_to_lora)


def open_file(path: Path, name: str | None = None, convert_to_lora: int | None = None) -> Adapter:
    """A single-file LoRA of any layout (kohya, kohya-sgm, LyCORIS, diffusers, legacy diffusers, ai-toolkit)."""
    if path.suffix != SUFFIX:
        raise LoraLegoError(f"{path}: expected a PEFT adapter folder or a {SUFFIX} LoRA file")
    weights = SafetensorsFile(path)
    configs = diffusers.metadata_configs(weights.metadata, path)
    rslora_metadata = diffusers.check_metadata(configs, path)
    adapter = read_single_file(
        path,
        weights,
        alphas_from_metadata=lambda module: diffusers.metadata_alpha(configs, module, path),
        use_rslora=kohya.uses_rslora(weights.metadata) or rslora_metadata,
        name=name,
        convert_to_lora=convert_to_lora,
    )
    adapter.config = kohya.base_model(weights.metadata)
    return adapter


def output_format(adapters: list[Adapter], requested: str | None) -> str:
    """The output format: the inputs' unless ``requested``; refuse conversions that would guess names."""
    fmt = requested or adapters[0].format
    if fmt not in FORMATS:
        raise LoraLegoError(f"--format {fmt}: unknown format (choose from {', '.join(FORMATS)})")
    modules = sorted({module for adapter in adapters for module in adapter.modules})
    if fmt == "peft":
        kohya_only = [m for m in modules if m.startswith("lora_")]
        missing = kohya_only
    else:
        missing = unwritable(modules, fmt)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LoraLegoError(
            f"--format {fmt}: module {missing[0]}{more} has no name in the {fmt} layout (a kohya name whose parts "
            "are not known diffusers module parts, or a module the layout does not name)"
        )
    return fmt


def _without_rslora(args_json: str) -> str:
    """kohya's ``ss_network_args`` minus ``rs_lora``: a merged output is written at plain scale ``alpha / r``."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError:
        return args_json
    if isinstance(args, dict) and "rs_lora" in args:
        args = {key: value for key, value in args.items() if key != "rs_lora"}
        return json.dumps(args)
    return args_json


def output_metadata(adapters: list[Adapter], provenance: dict[str, str], main_rank: int | None) -> dict[str, str]:
    """The merged file's safetensors metadata: the first input's (minus what the merge makes wrong), the
    names of the inputs (``modelspec.merged_from``, comma-separated as the ModelSpec convention), and the
    merge's own record (``loralego.*``: method, options, inputs' hashes)."""
    inherited = {
        key: value
        for key, value in adapters[0].metadata.items()
        if key not in _STALE_METADATA and not key.startswith("loralego.")
    }
    if "ss_network_args" in inherited:
        inherited["ss_network_args"] = _without_rslora(inherited["ss_network_args"])
    for key in ("ss_network_dim", "ss_network_alpha"):  # the merged adapter's own rank, at scale 1
        if key in inherited:
            if main_rank is None:
                del inherited[key]
            else:
                inherited[key] = str(main_rank)
    inherited["modelspec.merged_from"] = ", ".join(adapter.name for adapter in adapters)
    return {**inherited, **provenance}


def sidecar_path(out: Path, file_name: str) -> Path:
    """Where a single-file output's extra file goes: ``merged.safetensors`` -> ``merged.recipe.yaml``."""
    return out.with_name(out.name.removesuffix(SUFFIX) + "." + file_name)


def write_adapter(
    fmt: str,
    out: str | Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    config: dict[str, Any] | Callable[[dict[str, int]], dict[str, Any]],
    metadata: dict[str, str] | None = None,
    force: bool = False,
    card: str | None = None,
    alphas: dict[str, float] | None = None,
    extra_files: dict[str, str] | None = None,
    modules: list[str] | None = None,
) -> None:
    """Write an adapter in ``fmt``, atomically.

    PEFT folders hold ``extra_files`` inside; single files get them beside (``<stem>.<file name>``). A PEFT
    output always has scale 1 per module (``lora_alpha = r``), which is what merges produce; ``alphas``
    (single-file formats only) keep other scales, e.g. when re-saving a loaded adapter. ``modules``: the modules
    ``tensors`` will yield, when known (the header's space is then reserved exactly, see safetensors_stream).
    """
    out = Path(out)
    if fmt == "peft":
        write_peft_folder(
            out,
            tensors=tensors,
            config=config,
            metadata=metadata,
            force=force,
            card=card,
            extra_files=extra_files,
            modules=modules,
        )
        return
    if fmt not in SINGLE_FILE_FORMATS:
        raise LoraLegoError(f"--format {fmt}: unknown format (choose from {', '.join(FORMATS)})")
    sidecars = {sidecar_path(out, file_name): text for file_name, text in (extra_files or {}).items()}
    for sidecar in sidecars:  # refuse before merging, not after
        check_destination(sidecar, folder=False, force=force, kind="yaml")
    write_single_file(
        out,
        fmt,
        tensors=tensors,
        alphas=alphas,
        metadata=metadata,
        force=force,
        alpha_metadata=diffusers.alpha_metadata if fmt == "diffusers" else None,
        modules=modules,
    )
    for sidecar, text in sidecars.items():
        write_text_atomically(sidecar, text, force=force, kind="yaml")
