"""A local causal LM and its completion loss on few-shot examples (for ``tune``; needs ``loralego[tune]``).

Models and tokenizers load from local folders only (``local_files_only``): nothing is ever downloaded.
Prompt and completion are tokenized apart, without special tokens, and joined (the completion followed by
EOS when the tokenizer has one), so the loss covers exactly the completion's tokens; batches are left-padded
with position ids that count real tokens only, and logits are computed for the completion positions only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LoraLegoError
from .examples import Example

MAX_TOKENS = 1024


def require(package: str) -> Any:
    """Import an optional dependency of ``loralego[tune]`` or refuse in one line."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise LoraLegoError(f"this command needs {package}: pip install 'loralego[tune]'") from None


def _check_folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise LoraLegoError(f"{what} {folder}: not a folder (give a local model folder; nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise LoraLegoError(f"{what} {folder}: no config.json (not a Hugging Face model folder)")
    return folder


def load_causal_lm(path: str | Path, device: torch.device) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local folder, the model in float32, eval mode, parameters frozen."""
    transformers = require("transformers")
    folder = _check_folder(path, "--base-model")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        text = " ".join(str(error).split())[:300]
        raise LoraLegoError(f"--base-model {folder}: cannot load a causal LM and tokenizer: {text}") from None
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    completion_tokens: int  # the last ones of ids


def encode(tokenizer: Any, example: Example, max_tokens: int = MAX_TOKENS) -> Encoded:
    prompt = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion.append(int(tokenizer.eos_token_id))
    if not completion:
        raise LoraLegoError(f"example {example.prompt[:40]!r}: its completion has no tokens")
    ids = prompt + completion
    if len(ids) > max_tokens:  # keep the completion whole, cut the prompt's beginning
        if len(completion) > max_tokens:
            raise LoraLegoError(f"example {example.prompt[:40]!r}: completion longer than {max_tokens} tokens")
        ids = ids[-max_tokens:]
    return Encoded(tuple(ids), len(completion))


def batch_tensors(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    keep = max(r.completion_tokens for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), keep), -100, dtype=torch.long)
    for row, item in enumerate(rows):
        ids[row, width - len(item.ids):] = torch.tensor(item.ids)
        mask[row, width - len(item.ids):] = 1
        targets[row, keep - item.completion_tokens:] = torch.tensor(item.ids[-item.completion_tokens:])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "targets": targets}


def batches(rows: Sequence[Encoded], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed batches (sorted by length, so little padding), built once."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].ids), i))
    return [batch_tensors([rows[i] for i in order[s:s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def example_losses(model: Any, batch: dict[str, torch.Tensor], bf16: bool = False) -> torch.Tensor:
    """Mean cross-entropy over each example's completion tokens (one value per row)."""
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    keep = targets.shape[1]
    context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            logits_to_keep=keep + 1,
        ).logits
    predicted = logits[:, :-1].float()
    token = torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(targets.shape)
    counts = (targets != -100).sum(-1).clamp(min=1)
    return token.sum(-1) / counts


def mean_loss(model: Any, prepared: Sequence[dict[str, torch.Tensor]], bf16: bool = False) -> float:
    """Mean per-example completion loss over all batches, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in prepared:
            losses = example_losses(model, batch, bf16)
            total += float(losses.double().sum())
            count += losses.numel()
    return total / max(count, 1)

