"""Module names of diffusion LoRAs: one canonical naming per model family, and the stored layouts' names.

Canonical names are diffusers' own module paths with the pipeline component in front, as diffusers'
``save_lora_weights`` writes them: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (``text_encoder_2.`` for SDXL's second
encoder), ``transformer.transformer_blocks.0.attn.to_q`` (Flux). Every reader maps its file's names to these,
so files of different layouts merge module by module, and every writer maps them back.

Layouts and where their name maps come from:

- kohya (sd-scripts, A1111, ComfyUI): the diffusers path with dots flattened to underscores and a
  ``lora_unet_`` / ``lora_te_`` (``lora_te1_``) / ``lora_te2_`` / ``lora_transformer_`` prefix. Flattening
  loses which underscores were dots; :func:`unflatten` puts them back from the vocabulary of module-name
  parts of the diffusers UNet, CLIP, T5 and Flux models (``down_blocks``, ``to_q``, ``linear_1`` ...; the
  tests check it covers every part of those models). A name with a part outside it is not guessed: the
  module keeps its kohya name and can only be written as kohya.
- kohya SDXL with the sgm UNet's names (``input_blocks_4_1_...``, ``middle_block_1_...``,
  ``output_blocks_2_2_conv``; resnets' ``in_layers_2`` / ``out_layers_3`` / ``emb_layers_1`` /
  ``skip_connection``): block indices follow diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and the
  inner names its ``_convert_unet_lora_key``, for ``layers_per_block = 2`` (SD 1.x, SD 2.x, SDXL).
- kohya Flux (BFL names, ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``):
  the table of diffusers' ``_convert_kohya_flux_lora_to_diffusers``. Fused projections (``img_attn_qkv``,
  ``txt_attn_qkv``, ``linear1``) are several canonical modules: see :data:`FLUX_FUSED`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")

# Parts of diffusers / transformers module paths that contain an underscore (kohya flattens them too).
_COMPOUND_PARTS = [
    "add_embedding",
    "add_k_proj",
    "add_q_proj",
    "add_v_proj",
    "context_embedder",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "down_blocks",
    "ff_context",
    "guidance_embedder",
    "k_proj",
    "linear_1",
    "linear_2",
    "mid_block",
    "norm1_context",
    "norm_out",
    "out_proj",
    "proj_in",
    "proj_mlp",
    "proj_out",
    "q_proj",
    "self_attn",
    "single_transformer_blocks",
    "text_embedder",
    "text_model",
    "text_projection",
    "time_emb_proj",
    "time_embedding",
    "time_text_embed",
    "timestep_embedder",
    "to_add_out",
    "to_k",
    "to_out",
    "to_q",
    "to_v",
    "transformer_blocks",
    "up_blocks",
    "v_proj",
    "x_embedder",
    "wi_0",
    "wi_1",
]
# Parts without an underscore.
_SIMPLE_PARTS = set(
    [
        "DenseReluDense",
        "SelfAttention",
        "EncDecAttention",
        "attentions",
        "attn",
        "attn1",
        "attn2",
        "block",
        "conv",
        "conv1",
        "conv2",
        "downsamplers",
        "encoder",
        "fc1",
        "fc2",
        "ff",
        "k",
        "layer",
        "layers",
        "linear",
        "mlp",
        "net",
        "norm",
        "norm1",
        "o",
        "proj",
        "q",
        "resnets",
        "upsamplers",
        "v",
        "wi",
        "wo",
    ]
)
_COMPOUNDS = sorted((tuple(part.split("_")) for part in _COMPOUND_PARTS), key=len, reverse=True)

# kohya prefix -> canonical component; the first prefix of a component is the one written.
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"),
)


def flatten(path: str) -> str:
    """kohya's spelling of a dotted module path."""
    return path.replace(".", "_")


def unflatten(flat: str) -> str | None:
    """The dotted module path whose kohya spelling is ``flat``, or None if a part is not a known one."""
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for compound in _COMPOUNDS:
            if tuple(tokens[i : i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            token = tokens[i]
            if not (token.isdigit() or token in _SIMPLE_PARTS):
                return None
            parts.append(token)
            i += 1
    return ".".join(parts)


# --- the sgm (LDM) UNet names of kohya SDXL files, layers_per_block = 2 ---

_LAYERS_PER_BLOCK = 2
_SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
}
_SGM_BLOCK = re.compile(r"^(?P<where>input_blocks|middle_block|output_blocks)_(?:(?P<i>\d+)_)?(?P<j>\d+)_(?P<rest>.+)$")


def is_sgm(flat: str) -> bool:
    return flat.startswith(("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_")) or (
        flat == "out_2"
    )


def _sgm_inner(kind: str, rest: str) -> str | None:
    if kind == "resnets":
        return _SGM_RESNET.get(rest)
    return unflatten(rest)


def sgm_to_diffusers(flat: str) -> str | None:
    """``input_blocks_4_1_proj_in`` -> ``down_blocks.1.attentions.0.proj_in`` (None if not an sgm UNet name)."""
    if flat in _SGM_FIXED:
        return _SGM_FIXED[flat]
    found = _SGM_BLOCK.match(flat)
    if found is None:
        return None
    where, j, rest = found["where"], int(found["j"]), found["rest"]
    if where == "middle_block":
        if found["i"] is not None:
            return None
        kind, index = {0: ("resnets", 0), 1: ("attentions", 0), 2: ("resnets", 1)}.get(j, (None, 0))
        inner = _sgm_inner(kind, rest) if kind else None
        return f"mid_block.{kind}.{index}.{inner}" if inner else None
    if found["i"] is None:
        return None
    i = int(found["i"])
    per_block = _LAYERS_PER_BLOCK + 1
    if where == "input_blocks":
        if i == 0:
            return None
        block, layer = (i - 1) // per_block, (i - 1) % per_block
        if layer == _LAYERS_PER_BLOCK:  # the downsampler's conv, "op"
            return f"down_blocks.{block}.downsamplers.0.conv" if (j, rest) == (0, "op") else None
        kind = {0: "resnets", 1: "attentions"}.get(j)
        prefix = "down_blocks"
    else:
        block, layer = i // per_block, i % per_block
        if rest == "conv" and j in (1, 2):  # the upsampler's conv (j = 1 in a block without attention)
            return f"up_blocks.{block}.upsamplers.0.conv"
        kind = {0: "resnets", 1: "attentions"}.get(j)
        prefix = "up_blocks"
    inner = _sgm_inner(kind, rest) if kind else None
    return f"{prefix}.{block}.{kind}.{layer}.{inner}" if inner else None


_DIFFUSERS_BLOCK = re.compile(
    r"^(?P<where>down_blocks|mid_block|up_blocks)\.(?:(?P<block>\d+)\.)?(?P<kind>resnets|attentions|downsamplers|"
    r"upsamplers)\.(?P<layer>\d+)\.(?P<rest>.+)$"
)


def diffusers_to_sgm(path: str, up_attention_blocks: frozenset[int] = frozenset()) -> str | None:
    """The inverse of :func:`sgm_to_diffusers` (None for a path the sgm UNet does not name).

    ``up_attention_blocks``: the up blocks that have attentions (their upsampler is the third layer, ``_2_conv``,
    else the second, ``_1_conv``), known from the other modules being written.
    """
    for flat, diffusers in _SGM_FIXED.items():
        if path == diffusers:
            return flat
    found = _DIFFUSERS_BLOCK.match(path)
    if found is None:
        return None
    where, kind, layer, rest = found["where"], found["kind"], int(found["layer"]), found["rest"]
    per_block = _LAYERS_PER_BLOCK + 1
    if kind == "resnets":
        inner = {v: k for k, v in _SGM_RESNET.items()}.get(rest)
        if inner is None:
            return None
    else:
        inner = flatten(rest)
    if where == "mid_block":
        j = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, layer))
        return f"middle_block_{j}_{inner}" if j is not None else None
    block = int(found["block"])
    if where == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks_{1 + block * per_block + _LAYERS_PER_BLOCK}_0_op" if rest == "conv" else None
        if kind == "upsamplers" or layer >= _LAYERS_PER_BLOCK:
            return None
        return f"input_blocks_{1 + block * per_block + layer}_{0 if kind == 'resnets' else 1}_{inner}"
    if kind == "upsamplers":
        if rest != "conv":
            return None
        j = 2 if block in up_attention_blocks else 1
        return f"output_blocks_{block * per_block + _LAYERS_PER_BLOCK}_{j}_conv"
    if kind == "downsamplers" or layer > _LAYERS_PER_BLOCK:
        return None
    return f"output_blocks_{block * per_block + layer}_{0 if kind == 'resnets' else 1}_{inner}"


# --- Flux: BFL names (kohya) <-> diffusers names ---


@dataclass(frozen=True)
class Fused:
    """A BFL projection that diffusers splits into ``parts`` along the output rows. ``sizes``: each part's
    rows as a multiple of the input width (None: the rest of the rows)."""

    parts: tuple[str, ...]
    sizes: tuple[int | None, ...]


# Single projections, per block (``{i}``) or global; from diffusers' _convert_kohya_flux_lora_to_diffusers.
FLUX_SINGLE = {
    "double_blocks_{i}_img_attn_proj": "transformer_blocks.{i}.attn.to_out.0",
    "double_blocks_{i}_img_mlp_0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks_{i}_img_mlp_2": "transformer_blocks.{i}.ff.net.2",
    "double_blocks_{i}_img_mod_lin": "transformer_blocks.{i}.norm1.linear",
    "double_blocks_{i}_txt_attn_proj": "transformer_blocks.{i}.attn.to_add_out",
    "double_blocks_{i}_txt_mlp_0": "transformer_blocks.{i}.ff_context.net.0.proj",
    "double_blocks_{i}_txt_mlp_2": "transformer_blocks.{i}.ff_context.net.2",
    "double_blocks_{i}_txt_mod_lin": "transformer_blocks.{i}.norm1_context.linear",
    "single_blocks_{i}_linear2": "single_transformer_blocks.{i}.proj_out",
    "single_blocks_{i}_modulation_lin": "single_transformer_blocks.{i}.norm.linear",
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# BFL's final modulation emits (shift, scale); diffusers' norm_out.linear (scale, shift): B's halves swap.
FLUX_SWAPPED = {"final_layer_adaLN_modulation_1"}
# Flux's MLP is 4x the width (mlp_ratio 4): the size of a missing proj_mlp part when fusing linear1.
FLUX_MLP_RATIO = 4
FLUX_FUSED = {
    "double_blocks_{i}_img_attn_qkv": Fused(
        ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"),
        (None, None, None),
    ),
    "double_blocks_{i}_txt_attn_qkv": Fused(
        (
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ),
        (None, None, None),
    ),
    "single_blocks_{i}_linear1": Fused(
        (
            "single_transformer_blocks.{i}.attn.to_q",
            "single_transformer_blocks.{i}.attn.to_k",
            "single_transformer_blocks.{i}.attn.to_v",
            "single_transformer_blocks.{i}.proj_mlp",
        ),
        (1, 1, 1, None),
    ),
}


def _template_match(template: str, name: str) -> str | None:
    """The block index ``{i}`` for which ``template`` spells ``name`` ("" for a template without one)."""
    if "{i}" not in template:
        return "" if template == name else None
    head, tail = template.split("{i}")
    if name.startswith(head) and name.endswith(tail):
        middle = name[len(head) : len(name) - len(tail)]
        if middle.isdigit():
            return middle
    return None


def is_flux_bfl(flat: str) -> bool:
    return flat.startswith(
        (
            "double_blocks_",
            "single_blocks_",
            "img_in",
            "txt_in",
            "time_in_",
            "vector_in_",
            "guidance_in_",
            "final_layer_",
        )
    )


def flux_from_bfl(flat: str) -> tuple[str, ...] | None:
    """The canonical ``transformer.`` paths of one BFL module (several for a fused projection), or None."""
    for template, target in FLUX_SINGLE.items():
        index = _template_match(template, flat)
        if index is not None:
            return ("transformer." + target.replace("{i}", index),)
    for template, fused in FLUX_FUSED.items():
        index = _template_match(template, flat)
        if index is not None:
            return tuple("transformer." + part.replace("{i}", index) for part in fused.parts)
    return None


def flux_fused_of(path: str) -> tuple[str, Fused, int, str] | None:
    """For a canonical Flux path that is part of a fused BFL projection: (BFL name, its parts, part index,
    block index)."""
    relative = path.removeprefix("transformer.")
    for template, fused in FLUX_FUSED.items():
        for position, part in enumerate(fused.parts):
            index = _template_match(part, relative)
            if index is not None:
                return template.replace("{i}", index), fused, position, index
    return None


def flux_to_bfl(path: str) -> str | None:
    """The BFL name of a canonical Flux path that maps one to one (not part of a fused projection)."""
    relative = path.removeprefix("transformer.")
    for template, target in FLUX_SINGLE.items():
        index = _template_match(target, relative)
        if index is not None:
            return template.replace("{i}", index)
    return None


# --- kohya names <-> canonical names ---


@dataclass(frozen=True)
class KohyaName:
    """What one stored kohya module is: its canonical module(s), and whether B's halves are swapped."""

    canonical: tuple[str, ...]
    swapped: bool = False
    known: bool = True  # False: the kohya name itself is the module name (cannot be converted)


def kohya_to_canonical(name: str) -> KohyaName:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` -> ``unet.down_blocks.0.attentions.0.proj_in``."""
    for prefix, component in _KOHYA_PREFIXES:
        if not name.startswith(prefix):
            continue
        flat = name[len(prefix) :]
        if component == "unet" and is_flux_bfl(flat):
            paths = flux_from_bfl(flat)
            if paths is not None:
                return KohyaName(paths, swapped=flat in FLUX_SWAPPED)
            break
        path = sgm_to_diffusers(flat) if component == "unet" and is_sgm(flat) else unflatten(flat)
        if path is not None:
            return KohyaName((f"{component}.{path}",))
        break
    return KohyaName((name,), known=False)


def component_of(module: str) -> str | None:
    head = module.split(".", 1)[0]
    return head if head in COMPONENTS and "." in module else None


def canonical_to_kohya(module: str, *, sgm: bool, te_prefix: str, up_attention_blocks: frozenset[int]) -> str | None:
    """The kohya name of a canonical module that maps one to one (Flux fused parts are handled by the writer);
    None if it has none. ``te_prefix``: ``lora_te_`` (SD 1.x) or ``lora_te1_`` (SDXL, Flux)."""
    component = component_of(module)
    if component is None:
        return module if module.startswith("lora_") else None
    path = module[len(component) + 1 :]
    if component == "transformer":
        bfl = flux_to_bfl(module)
        return f"lora_unet_{bfl}" if bfl is not None else None
    if component == "unet":
        if sgm:
            sgm_name = diffusers_to_sgm(path, up_attention_blocks)
            return f"lora_unet_{sgm_name}" if sgm_name is not None else None
        return f"lora_unet_{flatten(path)}"
    prefix = te_prefix if component == "text_encoder" else "lora_te2_"
    return prefix + flatten(path)
