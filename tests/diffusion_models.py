"""Tiny SD 1.5-, SDXL- and Flux-shaped diffusers models built from configs (no downloads), their LoRA files
written by the libraries themselves, and the loading of a LoRA file through diffusers' own loaders."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # the tiny CLIP config's token ids are outside its vocabulary


def _clip(projection: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _sd15_unet() -> torch.nn.Module:
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def _sdxl_unet() -> torch.nn.Module:
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=20,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 8,
    ).eval()


def _flux() -> torch.nn.Module:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


# Targets per component: attention, MLP, conv (1x1 proj_in in SD 1.5, 3x3 resnet convs), time embedding.
SD_UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLUX_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "proj_out",
    "norm.linear",
    "proj_mlp",
    "x_embedder",
    "context_embedder",
    "norm_out.linear",
]


@dataclass
class Family:
    """A tiny pipeline: its components (name -> model), LoRA targets per component, the diffusers loader."""

    name: str
    components: dict[str, torch.nn.Module]
    targets: dict[str, list[str]]
    pipeline: type
    layouts: list[str] = field(default_factory=list)

    def inputs(self) -> dict[str, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.components:
            if name.startswith("text_encoder"):
                out[name] = {"input_ids": torch.randint(2, 50, (1, 5), generator=generator)}
            elif name == "unet":
                cross = self.components["unet"].config.cross_attention_dim
                out[name] = {
                    "sample": torch.randn(1, 4, 8, 8, generator=generator),
                    "timestep": torch.tensor([10]),
                    "encoder_hidden_states": torch.randn(1, 5, cross, generator=generator),
                }
                if self.name == "sdxl":
                    out[name]["added_cond_kwargs"] = {
                        "text_embeds": torch.randn(1, 8, generator=generator),
                        "time_ids": torch.randn(1, 6, generator=generator),
                    }
            else:
                out[name] = {
                    "hidden_states": torch.randn(1, 16, 4, generator=generator),
                    "encoder_hidden_states": torch.randn(1, 3, 12, generator=generator),
                    "pooled_projections": torch.randn(1, 10, generator=generator),
                    "timestep": torch.tensor([0.5]),
                    "guidance": torch.tensor([3.0]),
                    "img_ids": torch.zeros(16, 3),
                    "txt_ids": torch.zeros(3, 3),
                }
        return out


def family(name: str) -> Family:
    torch.manual_seed(0)
    if name == "sd15":
        return Family(
            name,
            {"unet": _sd15_unet(), "text_encoder": _clip()},
            {"unet": SD_UNET_TARGETS, "text_encoder": CLIP_TARGETS},
            StableDiffusionPipeline,
            ["diffusers", "kohya"],
        )
    if name == "sdxl":
        return Family(
            name,
            {"unet": _sdxl_unet(), "text_encoder": _clip(), "text_encoder_2": _clip(True)},
            {"unet": SD_UNET_TARGETS, "text_encoder": CLIP_TARGETS, "text_encoder_2": CLIP_TARGETS},
            StableDiffusionXLPipeline,
            ["diffusers", "kohya", "kohya-sgm"],
        )
    return Family(
        name,
        {"transformer": _flux(), "text_encoder": _clip()},
        {"transformer": FLUX_TARGETS, "text_encoder": CLIP_TARGETS},
        FluxPipeline,
        ["diffusers", "kohya"],
    )


def peft_lora(
    model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int
) -> dict[str, torch.Tensor]:
    """A random LoRA of ``model`` trained by nobody: PEFT's own injection with non-zero B, as a state dict."""
    torch.manual_seed(seed)
    wrapped = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False), copy.deepcopy(model)
    )
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(wrapped).items()}


def save_diffusers(fam: Family, folder: Path, rank: int, alpha: float, seed: int) -> Path:
    """diffusers' ``save_lora_weights`` of a random LoRA on every component (``lora_adapter_metadata`` kept)."""
    layers, metadata = {}, {}
    for index, (component, model) in enumerate(fam.components.items()):
        layers[f"{component}_lora_layers"] = peft_lora(model, fam.targets[component], rank, alpha, seed + index)
        metadata[f"{component}_lora_adapter_metadata"] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": fam.targets[component],
        }
    fam.pipeline.save_lora_weights(folder, **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya(fam: Family, path: Path, rank: int, seed: int) -> Path:
    """diffusers' ``convert_state_dict_to_kohya`` of a random LoRA (SD/SDXL; it writes ``alpha = rank``)."""
    state = {}
    for index, (component, model) in enumerate(fam.components.items()):
        for key, value in peft_lora(model, fam.targets[component], rank, rank, seed + index).items():
            state[f"{component}.{key}"] = value
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, str(path))
    return path


class WarningsCaught(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_in_diffusers(fam: Family, path: Path) -> tuple[dict[str, torch.nn.Module], list[str]]:
    """Fresh copies of the components with the LoRA file loaded through diffusers' own ``lora_state_dict`` and
    ``load_lora_into_*``; returns them and the warnings diffusers logged (missing / unexpected keys)."""
    caught = WarningsCaught()
    loggers = [
        logging.getLogger(name)
        for name in (
            "diffusers",
            "diffusers.loaders.peft",
            "diffusers.utils.peft_utils",
            "diffusers.loaders.lora_base",
            "diffusers.loaders.lora_pipeline",
        )
    ]
    for logger in loggers:
        logger.addHandler(caught)
    try:
        models = {name: copy.deepcopy(model) for name, model in fam.components.items()}
        if fam.name == "flux":
            state, metadata = fam.pipeline.lora_state_dict(str(path), return_lora_metadata=True)
            fam.pipeline.load_lora_into_transformer(state, None, models["transformer"], metadata=metadata)
            alphas = None
        else:
            state, alphas, metadata = fam.pipeline.lora_state_dict(
                str(path), unet_config=models["unet"].config, return_lora_metadata=True
            )
            fam.pipeline.load_lora_into_unet(state, alphas, models["unet"], metadata=None if alphas else metadata)
        for name in models:
            if name.startswith("text_encoder") and any(k.startswith(f"{name}.") for k in state):
                fam.pipeline.load_lora_into_text_encoder(
                    state, alphas, models[name], prefix=name, metadata=None if alphas else metadata
                )
    finally:
        for logger in loggers:
            logger.removeHandler(caught)
    return models, caught.messages


def lora_layer_count(model: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def with_updates(model: torch.nn.Module, updates: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` whose weights are ``W + update`` (module paths relative to the model)."""
    merged = copy.deepcopy(model)
    for path, update in updates.items():
        weight = merged.get_submodule(path).weight
        with torch.no_grad():
            weight += update.reshape(weight.shape).to(weight.dtype)
    return merged


def forward(fam: Family, name: str, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False) if name != "text_encoder_2" else model(**inputs)
    first = out[0]
    return first if isinstance(first, torch.Tensor) else first[0]
