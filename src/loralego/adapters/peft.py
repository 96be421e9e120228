"""Read and write PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraLegoError
from ..finite import all_finite
from ..patterns import PatternError, compile_pattern
from ..patterns import fullmatch as bounded_fullmatch
from ..safeio import MAX_CONFIG_BYTES, read_text, require_regular
from .atomic import atomic_folder
from .base import (
    PEFT_ONLY_FEATURES,
    Adapter,
    ModuleInfo,
    check_factor_shapes,
    file_sha256,
    natural_key,
    unsupported_feature,
)
from .safetensors_read import FLOAT_DTYPES, SafetensorsFile
from .safetensors_stream import SafetensorsStreamWriter

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# Config keys whose non-default values mean the adapter is not plain LoRA.
_UNSUPPORTED_CONFIG: list[tuple[str, Callable[[Any], bool], str]] = [
    ("use_dora", bool, "DoRA (use_dora)"),
    ("bias", lambda v: v not in (None, "none"), "LoRA with bias"),
    ("lora_bias", bool, "LoRA with bias (lora_bias)"),
    ("modules_to_save", bool, "modules_to_save (fully trained modules)"),
    ("trainable_token_indices", bool, "trainable_token_indices"),
    ("use_qalora", bool, "QA-LoRA"),
    ("alora_invocation_tokens", bool, "Activated LoRA (alora_invocation_tokens)"),
    ("arrow_config", bool, "Arrow routing (arrow_config)"),
    ("kasa_config", bool, "KaSA (kasa_config)"),
    ("monteclora_config", bool, "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora)"),
    ("target_parameters", bool, "LoRA on parameters (target_parameters)"),
]


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        text = read_text(path, MAX_CONFIG_BYTES, "the config")
    except FileNotFoundError:
        raise LoraLegoError(f"{path}: missing (not a PEFT adapter folder)") from None
    except OSError as error:
        raise LoraLegoError(f"{path}: cannot read: {error.strerror or error}") from None
    except LoraLegoError as error:
        if "found a folder" in str(error):  # keep the long-standing wording for a config that is a folder
            raise LoraLegoError(f"{path}: cannot read: Is a directory") from None
        raise
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoraLegoError(f"{path}: not valid JSON ({error.msg}: line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise LoraLegoError(f"{path}: not a PEFT config (JSON nested too deeply)") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise LoraLegoError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise LoraLegoError(f"{path}: expected a JSON object")
    return config


def _check_config(config: dict[str, Any], path: Path) -> None:
    where = path / CONFIG_NAME
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraLegoError(f"{where}: peft_type {_short(peft_type)} is not supported (only plain LoRA can be merged)")
    for key, is_set, feature in _UNSUPPORTED_CONFIG:
        if is_set(config.get(key)):
            raise LoraLegoError(f"{where}: {feature} is not supported (only plain LoRA can be merged)")
    for key, kinds, kind_name in (("r", (int,), "an integer"), ("lora_alpha", (int, float), "a number")):
        if key not in config:
            raise LoraLegoError(f"{where}: missing key {key!r}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise LoraLegoError(f"{where}: key {key!r} must be {kind_name}, got {_short(value)}")
        if value <= 0 and key == "r":
            raise LoraLegoError(f"{where}: key 'r' must be >= 1, got {value}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            raise LoraLegoError(f"{where}: key {key!r} must map module patterns to numbers")
        for pattern in value:  # PEFT treats the keys as regular expressions; a broken one matches nothing sane
            try:
                compile_pattern(pattern)
            except PatternError as error:
                raise LoraLegoError(f"{where}: key {key!r}: {error}") from None
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise LoraLegoError(f"{where}: key {key!r} must be true or false")
    # Read by the merge (base-model check, output config): wrong types would fail far from the file.
    base = config.get("base_model_name_or_path")
    if not isinstance(base, (str, type(None))):
        raise LoraLegoError(f"{where}: key 'base_model_name_or_path' must be a string, got {_short(base)}")
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise LoraLegoError(
            f"{where}: key 'target_modules' must be a string or a list of strings, got {_short(targets)}"
        )


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, so a huge config value cannot flood the one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pattern_value(patterns: dict[str, Any], module: str, default: Any, where: str = "pattern") -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name
    (matched with a time bound: the keys come from an untrusted file)."""
    for key, value in patterns.items():
        if bounded_fullmatch(rf"(?:.*\.)?(?:{key})", module, where):
            return value
    return default


class _BinFile:
    """A legacy ``adapter_model.bin``: loaded with ``weights_only=True`` so no code in it can run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _require_file(path)
        try:
            with warnings.catch_warnings():  # torch warns on stderr about pickle protocols: keep errors one line
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # any failure of the restricted unpickler is a refusal, whatever its type
            raise LoraLegoError(
                f"{path}: refused: not a plain tensor checkpoint ({_unpickling_reason(error)}; "
                "loaded with weights_only=True, nothing in it was run)"
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided for k, v in state.items()
        ):
            raise LoraLegoError(f"{path}: refused: expected a mapping of names to dense tensors")
        self._state = state
        self.keys = list(state)
        self.shapes = {key: tuple(value.shape) for key, value in state.items()}
        self.dtypes: dict[str, torch.dtype | None] = {key: value.dtype for key, value in state.items()}
        self.metadata: dict[str, str] = {}

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _require_file(path: Path) -> None:
    """Only regular files are handed to the parsers: a FIFO would block them, /dev/zero never ends."""
    require_regular(path)


# torch's weights-only errors are paragraphs that end in advice to load with weights_only=False; keep the fact.
_UNPICKLING_FACTS = (
    (re.compile(r"GLOBAL (\S+?)[.,]?(?:\s|$)"), "unsupported GLOBAL {}"),
    (re.compile(r"WeightsUnpickler error: (.+?)(?:\s+Check the documentation|\.\s|$)"), "{}"),
    (re.compile(r"([^.]*zip archive[^.]*)"), "{}"),
)


def _unpickling_reason(error: BaseException) -> str:
    text = _one_line(error)
    for pattern, template in _UNPICKLING_FACTS:
        found = pattern.search(text)
        if found:
            return template.format(found.group(1).strip())
    return text if len(text) <= 160 else text[:157] + "..."


def _parse_keys(keys: Iterable[str], path: Path) -> dict[str, dict[str, str]]:
    """Group tensor names by module: ``{module: {"A": key, "B": key}}``; refuse anything else."""
    keys = list(keys)
    # Name the adapter kind first: it explains the other unexpected tensors (e.g. a saved embedding layer).
    for key in keys:
        feature = unsupported_feature(key, PEFT_ONLY_FEATURES)
        if feature is not None:
            raise LoraLegoError(f"{path}: tensor {key}: {feature} is not supported (only plain LoRA)")
    modules: dict[str, dict[str, str]] = {}
    adapter_names: dict[str, str] = {}
    for key in keys:
        match = _FACTOR_KEY.match(key)
        if match is None:
            if key.endswith(".bias") and ".lora_" in key:
                raise LoraLegoError(f"{path}: tensor {key}: LoRA with bias is not supported (only plain LoRA)")
            if ".lora_" not in key:
                raise LoraLegoError(
                    f"{path}: tensor {key}: a full weight, not a LoRA factor "
                    "(modules_to_save and saved embedding layers are not supported)"
                )
            raise LoraLegoError(f"{path}: tensor {key}: not a LoRA factor (expected '<module>.lora_A.weight')")
        module = match["module"].removeprefix(PREFIX)
        slot = modules.setdefault(module, {})
        if match["which"] in slot:
            raise LoraLegoError(f"{path}: tensor {key}: module {module} has two lora_{match['which']} tensors")
        slot[match["which"]] = key
        adapter = match["adapter"] or ""
        named = adapter_names.setdefault(module, adapter)
        if named != adapter:  # lora_A.default with lora_B.other: factors of two different adapters
            raise LoraLegoError(
                f"{path}: tensor {key}: module {module} pairs factors of different adapters "
                f"({named or '(unnamed)'!s} and {adapter or '(unnamed)'!s})"
            )
    return modules


def load_peft(folder: str | Path, name: str | None = None) -> Adapter:
    """Open a PEFT LoRA folder lazily: config and tensor headers are read and checked, tensors are not."""
    folder = Path(folder)
    try:
        exists, is_dir = folder.exists(), folder.is_dir()
    except OSError as error:  # e.g. a parent folder without search permission
        raise LoraLegoError(f"{folder}: cannot open: {error.strerror or error}") from None
    if not exists:
        raise LoraLegoError(f"{folder}: no such file or folder")
    if not is_dir:
        raise LoraLegoError(f"{folder}: expected a PEFT adapter folder")
    config = _read_config(folder)
    _check_config(config, folder)
    if (folder / SAFETENSORS_NAME).exists():
        weights: SafetensorsFile | _BinFile = SafetensorsFile(folder / SAFETENSORS_NAME)
    elif (folder / BIN_NAME).exists():
        weights = _BinFile(folder / BIN_NAME)
    else:
        raise LoraLegoError(f"{folder}: no {SAFETENSORS_NAME} or {BIN_NAME}")
    groups = _parse_keys(weights.keys, weights.path)
    if not groups:
        raise LoraLegoError(f"{weights.path}: holds no LoRA tensors")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, ModuleInfo] = {}
    dtypes: set[torch.dtype] = set()
    for module in sorted(groups, key=natural_key):
        keys = groups[module]
        for which in ("A", "B"):
            if which not in keys:
                raise LoraLegoError(f"{weights.path}: module {module} has no lora_{which} tensor")
        a_shape, b_shape = weights.shapes[keys["A"]], weights.shapes[keys["B"]]
        for key in (keys["A"], keys["B"]):
            dtype = weights.dtypes[key]
            if dtype not in FLOAT_DTYPES:
                raise LoraLegoError(f"{weights.path}: tensor {key}: not a floating-point tensor")
            dtypes.add(dtype)
        check_factor_shapes(weights.path, module, a_shape, b_shape, ("lora_A", "lora_B"))
        rank = a_shape[0]
        where = folder / CONFIG_NAME
        expected_rank = pattern_value(rank_pattern, module, config["r"], f"{where}: key 'rank_pattern'")
        if rank != expected_rank:
            raise LoraLegoError(
                f"{weights.path}: tensor {keys['A']}: rank {rank} disagrees with the config's r = {expected_rank}"
            )
        alpha = float(pattern_value(alpha_pattern, module, config["lora_alpha"], f"{where}: key 'alpha_pattern'"))
        if not math.isfinite(alpha) or alpha == 0:
            raise LoraLegoError(f"{folder / CONFIG_NAME}: lora_alpha of {module} must be a finite non-zero number")
        modules[module] = ModuleInfo(module, rank=rank, alpha=alpha, a_shape=a_shape, b_shape=b_shape)

    def loader(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        keys = groups[module]
        lora_a, lora_b = weights.get(keys["A"]), weights.get(keys["B"])
        for key, tensor in ((keys["A"], lora_a), (keys["B"], lora_b)):
            if not all_finite(tensor):
                raise LoraLegoError(f"{weights.path}: tensor {key}: contains NaN or Inf")
        return lora_a, lora_b

    # Mixed dtypes inside one file are written back as float32 rather than narrowed.
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Adapter(
        name=name or folder.resolve().name,
        modules=modules,
        loader=loader,
        dtype=dtype,
        config=config,
        path=folder,
        format="peft",
        sha256=file_sha256(weights.path),
        use_rslora=bool(config.get("use_rslora", False)),
        metadata=dict(weights.metadata),
    )


def merged_config(
    template: dict[str, Any], ranks: dict[str, int], target_modules: list[str] | str, main_rank: int | None = None
) -> dict[str, Any]:
    """The config of a scale-1 merged adapter: ``lora_alpha = r`` for every module.

    ``r`` is ``main_rank`` (the requested k) or else the most common rank; modules of other ranks go to
    ``rank_pattern`` / ``alpha_pattern``
    (keys are full module names, which PEFT matches as suffixes).
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    if main_rank is None:
        main_rank = max(sorted(counts), key=lambda rank: counts[rank]) if counts else 1
    pattern = {module: rank for module, rank in ranks.items() if rank != main_rank}
    config = {
        key: value
        for key, value in template.items()
        if key not in ("layers_to_transform", "layers_pattern", "megatron_config", "loftq_config", "eva_config")
    }
    config.update(
        {
            "peft_type": "LORA",
            "r": main_rank,
            "lora_alpha": main_rank,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": target_modules,
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "modules_to_save": None,
            "inference_mode": True,
        }
    )
    return config


def write_peft_folder(
    out: Path,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    config: dict[str, Any] | Callable[[dict[str, int]], dict[str, Any]],
    metadata: dict[str, str] | None = None,
    force: bool = False,
    card: str | None = None,
    extra_files: dict[str, str] | None = None,
    modules: list[str] | None = None,
) -> Path:
    """Write ``(module, A, B)`` tensors as a PEFT folder, atomically, streaming tensors to disk.

    ``config`` is either the final config or a function of ``{module: rank}`` (known once all tensors are
    written). ``card`` is the model card text (README.md), if any; ``extra_files`` maps further file names
    to their text (e.g. the recipe the merge was run from), written inside the same atomic folder. ``modules``:
    the modules that will come, when known, so the header's space is reserved up front (each byte written once).
    """
    with atomic_folder(out, force=force) as tmp:
        ranks: dict[str, int] = {}
        metadata = {"format": "pt", **(metadata or {})}
        names = None if modules is None else [f"{PREFIX}{m}.lora_{x}.weight" for m in modules for x in "AB"]
        with SafetensorsStreamWriter(tmp / SAFETENSORS_NAME, metadata, names) as writer:
            for module, lora_a, lora_b in tensors:
                writer.add(f"{PREFIX}{module}.lora_A.weight", lora_a)
                writer.add(f"{PREFIX}{module}.lora_B.weight", lora_b)
                ranks[module] = int(lora_a.shape[0])
        final_config = config(ranks) if callable(config) else config
        (tmp / CONFIG_NAME).write_text(json.dumps(final_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
    return out
