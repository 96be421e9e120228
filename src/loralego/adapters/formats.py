"""Which reader opens a path, which writer an output goes through, and what metadata it carries.

Formats: ``peft`` (a folder with ``adapter_config.json``), ``kohya`` (one file, ``lora_down``/``lora_up``/
``alpha``) and ``diffusers`` (one file, ``lora_A``/``lora_B`` without a config). The output format follows
the inputs unless ``--format`` names another. Conversions are allowed only where no name has to be
guessed: ``peft`` <-> ``diffusers`` (the same ``lora_A``/``lora_B`` convention; module names are kept
verbatim, a PEFT folder written from a diffusers file names full module paths and no base model). Kohya
names flatten the model's dotted names into underscores, which cannot be undone without the model, so
kohya <-> anything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from . import hub
from .base import Adapter
from .diffusers import is_diffusers_key, load_diffusers, write_diffusers_file
from .kohya import is_kohya_key, load_kohya, write_kohya_file
from .peft import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, load_peft, write_peft_folder
from .singlefile import SUFFIX, open_safetensors, write_text_atomically

FORMATS = ("peft", "kohya", "diffusers")
SINGLE_FILE_FORMATS = ("kohya", "diffusers")
_CONVERSIONS = {("peft", "diffusers"), ("diffusers", "peft")}

# Metadata of the first input that would be wrong on the merged file: hashes of the input's weights, the
# input's own LoRA config (diffusers prefers it over the tensors' alphas) and a previous merge's record.
_STALE_METADATA = {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata"}


def open_adapter(spec: str | Path, name: str | None = None) -> Adapter:
    """Open a PEFT folder, a kohya or diffusers ``.safetensors`` file, a folder holding one such file, or a
    Hugging Face model id already in the local hub cache (never downloaded)."""
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as error:  # e.g. a parent folder without search permission
        raise LoraLegoError(f"{path}: cannot open: {error.strerror or error}") from None
    if exists:
        return _open_path(path, name)
    cached = hub.resolve_cached(str(spec))
    if cached is None:
        hint = f", nor a model id in the local {hub.describe_cache()}" if hub.looks_like_repo_id(str(spec)) else ""
        raise LoraLegoError(f"{path}: no such file or folder{hint}")
    return _open_path(cached, name or str(spec))


def _open_path(path: Path, name: str | None) -> Adapter:
    if path.is_dir():
        # A PEFT weights file without its config has lost its scales: refuse rather than guess alpha = r.
        if (path / CONFIG_NAME).exists() or (path / SAFETENSORS_NAME).exists() or (path / BIN_NAME).exists():
            return load_peft(path, name=name)
        files = sorted(path.glob(f"*{SUFFIX}"))
        if len(files) == 1:
            return open_file(files[0], name or path.resolve().name)
        if len(files) > 1:
            listed = ", ".join(f.name for f in files[:4]) + (", ..." if len(files) > 4 else "")
            raise LoraLegoError(f"{path}: no {CONFIG_NAME} and several {SUFFIX} files ({listed}); name the file")
        return load_peft(path, name=name)  # its error names the missing adapter_config.json
    return open_file(path, name)


def sniff_format(path: Path) -> str:
    """``kohya`` or ``diffusers`` from a single file's tensor names."""
    keys = open_safetensors(path).keys
    kohya = any(is_kohya_key(key) for key in keys)
    diffusers = any(is_diffusers_key(key) for key in keys)
    if kohya and diffusers:
        raise LoraLegoError(f"{path}: mixes kohya (lora_down/lora_up) and diffusers (lora_A/lora_B) tensor names")
    if kohya:
        return "kohya"
    if diffusers:
        return "diffusers"
    example = f" (first tensor: {keys[0]})" if keys else ""
    raise LoraLegoError(f"{path}: no LoRA factors (lora_down/lora_up or lora_A/lora_B tensors){example}")


def open_file(path: Path, name: str | None = None) -> Adapter:
    if path.suffix != SUFFIX:
        raise LoraLegoError(f"{path}: expected a PEFT adapter folder or a {SUFFIX} LoRA file")
    fmt = sniff_format(path)
    return load_kohya(path, name) if fmt == "kohya" else load_diffusers(path, name)


def output_format(adapters: list[Adapter], requested: str | None) -> str:
    """The output format: the inputs' unless ``requested``; refuse conversions that would guess names."""
    source = adapters[0].format
    fmt = requested or source
    if fmt not in FORMATS:
        raise LoraLegoError(f"--format {fmt}: unknown format (choose from {', '.join(FORMATS)})")
    if fmt != source and (source, fmt) not in _CONVERSIONS:
        why = (
            "kohya module names flatten dots into underscores and cannot be mapped to other formats without the model"
            if "kohya" in (source, fmt)
            else "no conversion is defined"
        )
        raise LoraLegoError(f"--format {fmt}: cannot write {source} inputs as {fmt}: {why}")
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
        if sidecar.exists() and not force:
            raise LoraLegoError(f"{sidecar}: output file already exists (use --force to replace it)")
    writer = write_kohya_file if fmt == "kohya" else write_diffusers_file
    writer(out, tensors=tensors, alphas=alphas, metadata=metadata, force=force, modules=modules)
    for sidecar, text in sidecars.items():
        write_text_atomically(sidecar, text, force=True)
