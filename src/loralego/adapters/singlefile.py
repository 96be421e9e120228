"""The one core of the single-file LoRA formats (kohya, LyCORIS, diffusers, ai-toolkit): the key grammar,
the reader (canonical module names from names.py, Flux's fused projections split, LoCon's lora_mid composed,
LoHa / LoKr converted on request), the writer of every single-file layout, alphas and atomic file writes.

A single-file output is written through :func:`loralego.safeio.atomic_file` (re-exported here): a temporary
folder beside the destination, renamed into place at the end, so a reader never sees a half-written file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import convert
from ..errors import LoraLegoError
from ..finite import all_finite
from ..safeio import atomic_file, write_text
from . import names
from .base import Adapter, ModuleInfo, check_factor_shapes, file_sha256, natural_key, unsupported_feature
from .safetensors_read import FLOAT_DTYPES, SafetensorsFile
from .safetensors_stream import SafetensorsStreamWriter

SUFFIX = ".safetensors"


def alpha_tensor(alpha: float) -> torch.Tensor:
    """Alphas are written as float32 scalars whatever the weights' dtype: bfloat16 cannot hold e.g. 257."""
    return torch.tensor(float(alpha), dtype=torch.float32)


def require_safetensors_path(out: Path, fmt: str) -> None:
    if out.suffix != SUFFIX:
        raise LoraLegoError(f"{out}: a {fmt} output is one file; give --out a path ending in {SUFFIX}")


def write_text_atomically(out: Path, text: str, *, force: bool = False, kind: str = "yaml") -> Path:
    """A small text file (a recipe copy, a report), written with the same all-or-nothing rule."""
    return write_text(out, text, force=force, kind=kind)


# --- the one reader of single-file LoRAs (kohya, LyCORIS, diffusers, ai-toolkit) ---

# Tensor-name suffixes -> (slot, layout). Longest first: ".lora_linear_layer.down.weight" before ".down.weight".
_SLOTS = (
    (".lora_linear_layer.down.weight", "down", "diffusers-legacy"),
    (".lora_linear_layer.up.weight", "up", "diffusers-legacy"),
    (".lora.down.weight", "down", "diffusers-legacy"),
    (".lora.up.weight", "up", "diffusers-legacy"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "diffusers"),
    (".lora_B.weight", "up", "diffusers"),
    (".alpha", "alpha", None),
    *((f".hada_{part}", f"hada_{part}", "kohya") for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{part}", f"lokr_{part}", "kohya") for part in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")),
)
# diffusers' attention processors before PEFT (2023): "...attn1.processor.to_q_lora.down.weight".
_OLD_PROCESSOR = re.compile(r"\.processor\.|_lora\.(down|up)\.weight$")
_LABELS = {"down": "down (lora_down / lora_A)", "up": "up (lora_up / lora_B)"}


@dataclass
class StoredModule:
    """One module as a file stores it: its tensor keys by slot."""

    name: str
    keys: dict[str, str]


def group_keys(path: Path, keys: list[str]) -> tuple[dict[str, StoredModule], set[str]]:
    """``{stored module name: its keys by slot}`` and the layouts the key suffixes belong to; refuse the rest."""
    modules: dict[str, StoredModule] = {}
    layouts: set[str] = set()
    for key in keys:
        if _OLD_PROCESSOR.search(key):
            raise LoraLegoError(
                f"{path}: tensor {key}: an old diffusers attention-processor LoRA (processor.to_q_lora.down, "
                "diffusers before its PEFT integration); load it in diffusers and save it again with save_lora_weights"
            )
        found = next((entry for entry in _SLOTS if key.endswith(entry[0]) and len(key) > len(entry[0])), None)
        if found is None:
            feature = unsupported_feature(key)
            if feature is not None:
                raise LoraLegoError(f"{path}: tensor {key}: {feature} is not supported (only LoRA, LoCon, LoHa, LoKr)")
            if key.endswith(".bias"):
                raise LoraLegoError(f"{path}: tensor {key}: LoRA with bias is not supported (only plain LoRA)")
            raise LoraLegoError(
                f"{path}: tensor {key}: not a LoRA tensor (expected '<module>.lora_down.weight' / '.lora_up.weight' "
                "/ '.alpha', or '<module>.lora_A.weight' / '.lora_B.weight')"
            )
        suffix, slot, layout = found
        name = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
        module = modules.setdefault(name, StoredModule(name, {}))
        if slot in module.keys:
            raise LoraLegoError(f"{path}: tensor {key}: module {name} has two {slot} tensors")
        module.keys[slot] = key
        if layout is not None:
            layouts.add(layout)
    return modules, layouts


PEFT_PREFIX = "base_model.model."


def read_alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    """A stored ``alpha``: one finite non-zero number (a 0-d tensor, or one element)."""
    if tensor.numel() != 1:
        raise LoraLegoError(f"{path}: tensor {key}: alpha must hold one number, got shape {list(tensor.shape)}")
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value) or value == 0:
        raise LoraLegoError(f"{path}: tensor {key}: alpha must be a finite non-zero number, got {value}")
    return value


@dataclass(frozen=True)
class Part:
    """How one canonical module is read from a stored one: B's rows ``rows`` (None: all), halves swapped."""

    stored: str
    rows: tuple[int, int] | None = None
    swapped: bool = False


def _split_rows(path: Path, stored: str, sizes: tuple[int | None, ...], d_in: int, d_out: int) -> list[tuple[int, int]]:
    """Row ranges of a fused projection's parts (see names.FLUX_FUSED)."""
    fixed = sum(size * d_in for size in sizes if size is not None)
    free = [size for size in sizes if size is None]
    rest = d_out - fixed
    if rest <= 0 or rest % len(free):
        raise LoraLegoError(
            f"{path}: module {stored}: {d_out} output rows cannot be split into the {len(sizes)} projections it fuses"
        )
    ranges, row = [], 0
    for size in sizes:
        count = size * d_in if size is not None else rest // len(free)
        ranges.append((row, row + count))
        row += count
    return ranges


def canonical_parts(path: Path, stored: StoredModule, d_in: int, d_out: int) -> dict[str, Part]:
    """The canonical module(s) a stored module is (names.py): kohya names mapped, diffusers names kept."""
    if not stored.name.startswith("lora_"):
        return {stored.name: Part(stored.name)}
    mapped = names.kohya_to_canonical(stored.name)
    if len(mapped.canonical) == 1:
        return {mapped.canonical[0]: Part(stored.name, swapped=mapped.swapped)}
    bfl = stored.name.removeprefix("lora_unet_")
    fused = next(f for t, f in names.FLUX_FUSED.items() if names._template_match(t, bfl) is not None)
    ranges = _split_rows(path, stored.name, fused.sizes, d_in, d_out)
    return {module: Part(stored.name, rows=rows) for module, rows in zip(mapped.canonical, ranges, strict=True)}


def _float_dtype(path: Path, weights: SafetensorsFile, key: str) -> torch.dtype:
    dtype = weights.dtypes[key]
    if dtype not in FLOAT_DTYPES:
        raise LoraLegoError(f"{path}: tensor {key}: not a floating-point tensor")
    return dtype


def _require(path: Path, stored: StoredModule, *slots: str) -> None:
    for slot in slots:
        if slot not in stored.keys:
            label = _LABELS.get(slot, slot)
            raise LoraLegoError(f"{path}: module {stored.name} has no {label} tensor")


def _lycoris_update(path: Path, weights: SafetensorsFile, stored: StoredModule, alpha: float | None) -> torch.Tensor:
    """The dense update (scale included, LyCORIS' rules) of a LoHa or LoKr module; 2-D (linear) modules only."""
    keys = stored.keys
    if "hada_t1" in keys or "hada_t2" in keys or "lokr_t2" in keys:
        raise LoraLegoError(f"{path}: module {stored.name}: Tucker LoHa/LoKr (hada_t / lokr_t2) is not supported")
    shapes = [weights.shapes[key] for slot, key in keys.items() if slot != "alpha"]
    if any(len(shape) != 2 for shape in shapes):
        raise LoraLegoError(
            f"{path}: module {stored.name}: a conv LoHa/LoKr stores its kernel flattened, which cannot be restored "
            "without the model; only linear LoHa/LoKr modules are converted"
        )
    get = weights.get
    if "hada_w1_a" in keys:
        _require(path, stored, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1a, w1b, w2a, w2b = (get(keys[s]) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or (w1a @ w1b).shape != (w2a @ w2b).shape:
            raise LoraLegoError(f"{path}: module {stored.name}: LoHa factor shapes do not agree")
        rank = w1b.shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        return convert.loha_update(w1a, w1b, w2a, w2b) * scale
    parts = {}
    rank = None
    for which in ("w1", "w2"):
        if f"lokr_{which}" in keys:
            parts[which] = get(keys[f"lokr_{which}"]).double()
        else:
            _require(path, stored, f"lokr_{which}_a", f"lokr_{which}_b")
            low_a, low_b = get(keys[f"lokr_{which}_a"]), get(keys[f"lokr_{which}_b"])
            if low_a.shape[1] != low_b.shape[0]:
                raise LoraLegoError(f"{path}: module {stored.name}: lokr_{which}_a and _b ranks differ")
            parts[which] = low_a.double() @ low_b.double()
            rank = rank or low_a.shape[1]  # LyCORIS: the rank of w1's factors, else w2's
    # LyCORIS scales by alpha / rank when a factor is low-rank, by 1 when both are full.
    scale = 1.0 if rank is None else (alpha if alpha is not None else rank) / rank
    return convert.lokr_update(parts["w1"], parts["w2"]) * scale


def read_single_file(
    path: Path,
    weights: SafetensorsFile,
    *,
    alphas_from_metadata: Callable[[str], float | None],
    use_rslora: bool,
    name: str | None,
    convert_to_lora: int | None = None,
) -> Adapter:
    """An :class:`Adapter` over one single-file LoRA of any layout, with canonical module names (names.py).

    Only headers (and alphas) are read here; factors on demand, except LoHa / LoKr modules, which are
    converted to LoRA now when ``convert_to_lora`` gives the rank (their kept energy in ``conversions``).
    """
    stored_modules, layouts = group_keys(path, weights.keys)
    if not any(set(m.keys) - {"alpha"} for m in stored_modules.values()):
        raise LoraLegoError(f"{path}: holds no LoRA tensors")
    if len(layouts - {"kohya"}) > 1 or (
        layouts - {"kohya"} and "kohya" in layouts and not _kohya_names_only(stored_modules)
    ):
        raise LoraLegoError(f"{path}: mixes LoRA tensor layouts ({', '.join(sorted(layouts))})")
    modules: dict[str, ModuleInfo] = {}
    sources: dict[str, tuple[StoredModule, Part, str]] = {}  # canonical -> (stored, part, kind)
    converted: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    conversions: dict[str, float] = {}
    dtypes: set[torch.dtype] = set()
    for stored in sorted(stored_modules.values(), key=lambda m: natural_key(m.name)):
        keys = stored.keys
        if set(keys) == {"alpha"}:
            raise LoraLegoError(f"{path}: tensor {keys['alpha']}: an alpha without LoRA factors")
        alpha = read_alpha(path, keys["alpha"], weights.get(keys["alpha"])) if "alpha" in keys else None
        if alpha is None:
            alpha = alphas_from_metadata(stored.name)
        for slot, key in keys.items():
            if slot != "alpha":
                dtypes.add(_float_dtype(path, weights, key))
        if any(slot.startswith(("hada_", "lokr_")) for slot in keys):
            kind = "LoHa" if any(slot.startswith("hada_") for slot in keys) else "LoKr"
            if convert_to_lora is None:
                raise LoraLegoError(
                    f"{path}: module {stored.name}: {kind} is not a LoRA; pass --convert-to-lora K to convert it "
                    "to rank K by truncated SVD of its update (the kept energy is printed)"
                )
            update = _lycoris_update(path, weights, stored, alpha)
            lora_a, lora_b, energy = convert.truncated_lora(update, convert_to_lora)
            rank, a_shape, b_shape, kind = lora_a.shape[0], tuple(lora_a.shape), tuple(lora_b.shape), "converted"
            alpha = float(rank)
        else:
            _require(path, stored, "down", "up")
            a_shape, b_shape = weights.shapes[keys["down"]], weights.shapes[keys["up"]]
            kind = "plain"
            if "mid" in keys:
                mid_shape = weights.shapes[keys["mid"]]
                if (
                    len(a_shape) != 4
                    or a_shape[2:] != (1, 1)
                    or len(mid_shape) != 4
                    or mid_shape[:2] != (a_shape[0], a_shape[0])
                ):
                    raise LoraLegoError(
                        f"{path}: module {stored.name}: lora_mid {list(mid_shape)} does not fit lora_down "
                        f"{list(a_shape)} (expected r x r x kh x kw after a r x in x 1 x 1 down)"
                    )
                a_shape = (a_shape[0], a_shape[1], *mid_shape[2:])
                kind = "tucker"
            check_factor_shapes(path, stored.name, a_shape, b_shape, ("down", "up"))
            rank = a_shape[0]
        d_in, d_out = math.prod(a_shape[1:]), b_shape[0]
        parts = canonical_parts(path, stored, d_in, d_out)
        for module, part in parts.items():
            if module in sources:
                raise LoraLegoError(
                    f"{path}: modules {sources[module][0].name} and {stored.name} are both {module} (two names "
                    "for one module)"
                )
            rows = part.rows[1] - part.rows[0] if part.rows else d_out
            if part.swapped and d_out % 2:
                raise LoraLegoError(f"{path}: module {stored.name}: {d_out} rows cannot be its shift and scale halves")
            modules[module] = ModuleInfo(
                module,
                rank=rank,
                alpha=float(alpha if alpha is not None else rank),
                a_shape=a_shape,
                b_shape=(rows, *b_shape[1:]),
            )
            sources[module] = (stored, part, kind)
            if kind == "converted":
                converted[module] = (lora_a, lora_b)
                conversions[module] = energy

    def loader(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        stored, part, kind = sources[module]
        if kind == "converted":
            lora_a, lora_b = converted[module]
        else:
            lora_a, lora_b = weights.get(stored.keys["down"]), weights.get(stored.keys["up"])
            if kind == "tucker":
                mid = weights.get(stored.keys["mid"])
                for key, tensor in ((stored.keys["mid"], mid),):
                    if not all_finite(tensor):
                        raise LoraLegoError(f"{path}: tensor {key}: contains NaN or Inf")
                lora_a = convert.compose_tucker_down(lora_a, mid)
        for slot, tensor in (("down", lora_a), ("up", lora_b)):
            if not all_finite(tensor):
                raise LoraLegoError(f"{path}: tensor {stored.keys.get(slot, stored.name)}: contains NaN or Inf")
        if part.swapped:
            lora_b = convert.swap_halves(lora_b)
        if part.rows is not None:
            lora_b = lora_b[part.rows[0] : part.rows[1]]
        return lora_a, lora_b

    return Adapter(
        name=name or path.stem,
        modules={module: modules[module] for module in sorted(modules, key=natural_key)},
        loader=loader,
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,  # mixed dtypes: widen, never narrow
        path=path,
        format=input_format(stored_modules, layouts),
        sha256=file_sha256(path),
        use_rslora=use_rslora,
        metadata=dict(weights.metadata),
        conversions=conversions,
    )


def _kohya_names_only(stored_modules: dict[str, StoredModule]) -> bool:
    return all(name.startswith("lora_") for name in stored_modules)


def input_format(stored_modules: dict[str, StoredModule], layouts: set[str]) -> str:
    """The format a file is written back in by default: its own, or ``diffusers`` for the legacy layout."""
    if "kohya" in layouts or _kohya_names_only(stored_modules):
        flats = [m.name.removeprefix("lora_unet_") for m in stored_modules.values() if m.name.startswith("lora_unet_")]
        return "kohya-sgm" if any(names.is_sgm(flat) for flat in flats) else "kohya"
    return "diffusers"


# --- the one writer of single-file LoRAs ---

SINGLE_FILE_LAYOUTS = ("kohya", "kohya-sgm", "diffusers")


def stored_name(
    module: str, layout: str, *, te_prefix: str = "lora_te_", up_attention_blocks: frozenset[int] = frozenset()
) -> str | None:
    """A canonical module's stored name in ``layout`` (None: it has none there). Flux fused parts are named
    by :func:`names.flux_fused_of` and fused by the writer."""
    if layout == "diffusers":
        return None if module.startswith("lora_") else module
    if names.flux_fused_of(module) is not None:
        return names.flux_fused_of(module)[0]  # type: ignore[index]
    return names.canonical_to_kohya(
        module, sgm=layout == "kohya-sgm", te_prefix=te_prefix, up_attention_blocks=up_attention_blocks
    )


def unwritable(modules: list[str], layout: str) -> list[str]:
    """The modules that have no name in ``layout`` (checked before merging)."""
    if layout not in SINGLE_FILE_LAYOUTS:
        return []
    attention_ups = _attention_up_blocks(modules)
    return [m for m in modules if stored_name(m, layout, up_attention_blocks=attention_ups) is None]


def _attention_up_blocks(modules: list[str]) -> frozenset[int]:
    found = (re.match(r"unet\.up_blocks\.(\d+)\.attentions\.", m) for m in modules)
    return frozenset(int(match[1]) for match in found if match)


_SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "diffusers": (".lora_A.weight", ".lora_B.weight")}


def write_single_file(
    out: Path,
    layout: str,
    *,
    tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, float] | None = None,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    alpha_metadata: Callable[[dict[str, int], dict[str, float]], dict[str, str]] | None = None,
    modules: list[str] | None = None,
) -> Path:
    """Write ``(canonical module, A, B)`` in ``layout``, atomically, streaming. ``modules``: those ``tensors``
    will yield, when known, so the header's space is reserved up front (each byte then written once).

    kohya layouts give every module an explicit ``<name>.alpha`` (default: its rank, scale 1): loaders that
    build one config for the whole file would otherwise give all modules the first module's ``alpha / r``,
    which is wrong as soon as ranks differ (e.g. an exact ``cat``). The diffusers layout carries ranks and
    alphas the way diffusers itself does, in metadata (``alpha_metadata(ranks, alphas)``, known at the end),
    since diffusers' loaders pass ``.alpha`` tensors of PEFT-style files on to PEFT, which ignores them.
    kohya layouts fuse Flux's split projections back (downs stacked, ups block-diagonal, scales folded into the ups,
    alpha = the fused rank), swap ``norm_out``'s halves back, and name text encoders ``lora_te1_`` when the file
    also adapts a second text encoder or a Flux transformer (``lora_te_`` otherwise). The parts of a fused
    projection, the text encoders' modules and the upsamplers (whose sgm index depends on the other modules) are
    held until the end of the stream.
    """
    out = Path(out)
    require_safetensors_path(out, layout)
    down_suffix, up_suffix = _SUFFIXES["diffusers" if layout == "diffusers" else "kohya"]
    seen: list[str] = []
    ranks: dict[str, int] = {}
    written_alphas: dict[str, float] = {}
    held: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused_spec: dict[str, tuple[names.Fused, int]] = {}

    def name_of(module: str, te_prefix: str = "lora_te_") -> str:
        name = stored_name(module, layout, te_prefix=te_prefix, up_attention_blocks=_attention_up_blocks(seen))
        if name is None:
            raise LoraLegoError(f"module {module}: has no name in the {layout} layout")
        return name

    # Stored names are the module's plus a layout prefix and suffix: reserve for three tensors per module with
    # that much slack (a header past it still comes out right, its data moved once; safetensors_stream).
    expected = None if modules is None else [m + "_" * 48 for m in modules for _ in range(3)]
    with atomic_file(out, force=force) as tmp, SafetensorsStreamWriter(tmp, metadata, expected) as writer:

        def emit(name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float) -> None:
            writer.add(f"{name}{down_suffix}", lora_a)
            writer.add(f"{name}{up_suffix}", lora_b)
            if layout == "diffusers":
                ranks[name], written_alphas[name] = int(lora_a.shape[0]), float(alpha)
            else:
                writer.add(f"{name}.alpha", alpha_tensor(alpha))

        for module, lora_a, lora_b in tensors:
            seen.append(module)
            alpha = (alphas or {}).get(module, float(lora_a.shape[0]))
            if layout != "diffusers":
                part = names.flux_fused_of(module)
                if part is not None:
                    bfl, spec, position, _ = part
                    scale = alpha / lora_a.shape[0]
                    up = lora_b if scale == 1 else (lora_b.float() * scale).to(lora_b.dtype)
                    fused.setdefault(bfl, {})[position] = (lora_a, up)
                    fused_spec[bfl] = (spec, lora_a.shape[1])
                    continue
                if module.startswith(("text_encoder.", "unet.up_blocks.")) and (
                    module.startswith("text_encoder.") or ".upsamplers." in module
                ):
                    held.append((module, lora_a, lora_b, alpha))
                    continue
                if module == "transformer.norm_out.linear":
                    lora_b = convert.swap_halves(lora_b)
            emit(name_of(module), lora_a, lora_b, alpha)
        te_prefix = "lora_te1_" if any(m.startswith(("text_encoder_2.", "transformer.")) for m in seen) else "lora_te_"
        for module, lora_a, lora_b, alpha in held:
            emit(name_of(module, te_prefix), lora_a, lora_b, alpha)
        for bfl, pieces in fused.items():
            spec, d_in = fused_spec[bfl]
            known = [pieces[p][1].shape[0] for p in pieces]
            rows = []
            for position, size in enumerate(spec.sizes):
                if position in pieces:
                    rows.append(pieces[position][1].shape[0])
                elif size is not None:
                    rows.append(size * d_in)
                elif spec.sizes == (None,) * len(spec.sizes):
                    rows.append(known[0])  # q, k and v have the same width
                else:
                    rows.append(names.FLUX_MLP_RATIO * d_in)
            lora_a, lora_b = convert.fuse_parts([pieces.get(p) for p in range(len(spec.parts))], rows)
            emit(f"lora_unet_{bfl}", lora_a, lora_b, float(lora_a.shape[0]))
        if alpha_metadata is not None:
            writer.metadata.update(alpha_metadata(ranks, written_alphas))
    return out
