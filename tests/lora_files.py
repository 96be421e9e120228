"""Diffusion-style LoRA files made by the tests: kohya (``lora_down``/``lora_up``/``alpha``) and diffusers
(``lora_A``/``lora_B``), with SD 1.5 / SDXL / Flux key names, linear and conv (1x1, 3x3) modules, alpha != r."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# module -> (kind, in, out): "linear", "conv1x1" or "conv3x3". Shapes are small but distinct per module.
SD15_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("conv1x1", 32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("linear", 32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ("linear", 24, 32),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("conv3x3", 16, 32),
    "lora_unet_mid_block_attentions_0_proj_out": ("conv1x1", 32, 32),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ("linear", 24, 48),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ("linear", 24, 24),
}
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("linear", 40, 40),
    "lora_unet_input_blocks_4_1_proj_in": ("linear", 40, 40),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("linear", 24, 24),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": ("linear", 48, 24),
}
FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": ("linear", 32, 96),
    "lora_unet_double_blocks_0_txt_mlp_0": ("linear", 32, 64),
    "lora_unet_single_blocks_0_linear1": ("linear", 32, 96 + 128),  # q, k, v (32 each) and the 4x MLP
}
# The canonical (diffusers) module names of the kohya modules above, written out by hand.
KOHYA_CANONICAL = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": ["unet.down_blocks.0.attentions.0.proj_in"],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ],
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    ],
    "lora_unet_down_blocks_0_resnets_0_conv1": ["unet.down_blocks.0.resnets.0.conv1"],
    "lora_unet_mid_block_attentions_0_proj_out": ["unet.mid_block.attentions.0.proj_out"],
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ["text_encoder.text_model.encoder.layers.0.mlp.fc1"],
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": [
        "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"
    ],
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    ],
    "lora_unet_input_blocks_4_1_proj_in": ["unet.down_blocks.1.attentions.0.proj_in"],
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    ],
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": ["text_encoder_2.text_model.encoder.layers.0.mlp.fc2"],
    "lora_unet_double_blocks_0_img_attn_qkv": [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"],
    "lora_unet_double_blocks_0_txt_mlp_0": ["transformer.transformer_blocks.0.ff_context.net.0.proj"],
    "lora_unet_single_blocks_0_linear1": [
        *(f"transformer.single_transformer_blocks.0.attn.to_{x}" for x in "qkv"),
        "transformer.single_transformer_blocks.0.proj_mlp",
    ],
}


def canonical(modules: dict[str, tuple[str, int, int]]) -> list[str]:
    """The sorted canonical module names of a kohya module table."""
    return sorted(name for module in modules for name in KOHYA_CANONICAL[module])


SD_DIFFUSERS = {
    "unet.down_blocks.0.attentions.0.proj_in": ("conv1x1", 32, 32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("linear", 32, 32),
    "unet.down_blocks.0.resnets.0.conv1": ("conv3x3", 16, 32),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": ("linear", 24, 48),
}

KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "3",
    "ss_output_name": "style_a",
    "sshs_model_hash": "0" * 64,
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "style a",
}


def factors(
    kind: str, d_in: int, d_out: int, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-zero (down/A, up/B) in stored shapes: conv A ``r x in x kh x kw``, B ``out x r x 1 x 1``."""
    if kind == "linear":
        a_shape, b_shape = (rank, d_in), (d_out, rank)
    else:
        k = 1 if kind == "conv1x1" else 3
        a_shape, b_shape = (rank, d_in, k, k), (d_out, rank, 1, 1)
    return torch.randn(a_shape, generator=generator) * 0.3, torch.randn(b_shape, generator=generator) * 0.3


def make_kohya(
    path: Path,
    *,
    modules: dict[str, tuple[str, int, int]] = SD15_KOHYA,
    rank: int = 4,
    alpha: float | None = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    no_alpha: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A kohya LoRA file; ``alpha=None`` or modules in ``no_alpha`` get no alpha tensor (alpha = rank)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (kind, d_in, d_out) in modules.items():
        down, up = factors(kind, d_in, d_out, rank, generator)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None and name not in no_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(KOHYA_METADATA if metadata is None else metadata))
    return path


def make_diffusers(
    path: Path,
    *,
    modules: dict[str, tuple[str, int, int]] = SD_DIFFUSERS,
    rank: int = 4,
    seed: int = 0,
    alphas: dict[str, float] | None = None,
    adapter_metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A diffusers-style LoRA file: ``.alpha`` tensors for the modules in ``alphas``; ``adapter_metadata``
    goes to the ``lora_adapter_metadata`` metadata key (as diffusers writes it)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (kind, d_in, d_out) in modules.items():
        lora_a, lora_b = factors(kind, d_in, d_out, rank, generator)
        tensors[f"{name}.lora_A.weight"] = lora_a.to(dtype)
        tensors[f"{name}.lora_B.weight"] = lora_b.to(dtype)
        if alphas and name in alphas:
            tensors[f"{name}.alpha"] = torch.tensor(float(alphas[name]))
    metadata = {"format": "pt"}
    if adapter_metadata is not None:
        metadata["lora_adapter_metadata"] = json.dumps(adapter_metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
