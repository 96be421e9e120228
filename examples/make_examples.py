"""Write the small example adapters in examples/adapters/ (committed; rerun to regenerate them).

Three PEFT LoRA folders for a tiny Llama-shaped model (hidden 64, 2 layers): ranks 4, 8 and 16 with
lora_alpha != r, one on q/k/v/o and two on q/v. Only torch and safetensors are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, KV = 64, 2, 32
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}
EXAMPLES = {
    "task_a": {"r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"], "seed": 1},
    "task_b": {"r": 8, "lora_alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 2},
    "task_c": {"r": 16, "lora_alpha": 16, "targets": ["q_proj", "v_proj"], "seed": 3},
}


def write_example(folder: Path, r: int, lora_alpha: int, targets: list[str], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for target in targets:
            d_out, d_in = SHAPES[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, d_in, generator=generator) / d_in**0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, r, generator=generator) * 0.02).bfloat16()
    config = {
        "base_model_name_or_path": "example/tiny-llama",
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    root = Path(__file__).parent / "adapters"
    for name, spec in EXAMPLES.items():
        write_example(root / name, spec["r"], spec["lora_alpha"], spec["targets"], spec["seed"])
        print(f"wrote {root / name}")
