"""Shared fixtures: a tiny random Llama built from a config (no download) and PEFT adapters made on it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests
# The tests use tiny tensors: one thread avoids OpenMP overhead and oversubscription on a 2-core CI box.
torch.set_num_threads(1)

BASE_NAME = "tiny-llama-for-tests"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = BASE_NAME
    model.name_or_path = BASE_NAME
    return model


def make_peft_adapter(
    path: Path,
    *,
    r: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base_name: str = BASE_NAME,
    **config_kwargs,
) -> Path:
    """Save a PEFT LoRA with random (non-zero) A and B, so every update is non-trivial."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    model.config._name_or_path = base_name
    model.name_or_path = base_name
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **config_kwargs)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    if dtype != torch.float32:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture
def adapter_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        folder = tmp_path / "inputs" / (name or f"adapter{next(counter)}")
        return make_peft_adapter(folder, **kwargs)

    return make


def make_mixed_adapters(root: Path) -> list[Path]:
    """Ranks 4, 8, 16 with alpha != r, one with rsLoRA, one on more modules."""
    return [
        make_peft_adapter(root / "r4", r=4, alpha=8, seed=1),
        make_peft_adapter(root / "r8", r=8, alpha=32, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        make_peft_adapter(root / "r16", r=16, alpha=12, seed=3, use_rslora=True),
    ]


@pytest.fixture
def mixed_adapters(tmp_path: Path) -> list[Path]:
    return make_mixed_adapters(tmp_path / "inputs")
