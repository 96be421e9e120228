"""Toy models and tasks for the tune / route tests: a word-level tokenizer, a tiny Llama and a tiny BERT
built from configs (nothing downloaded), a task only one adapter can solve, and a separable routing set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from loralego.causal_lm import batches, encode, example_losses
from loralego.examples import Example

WORDS = [f"p{i}" for i in range(10)] + [f"q{i}" for i in range(10)] + [f"c{i}" for i in range(5)] + ["->"]


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_base(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    # A wide initialisation: at the usual 0.02 the output head of a 32-wide model keeps every logit near 0,
    # so no LoRA on it could make the toy task learnable.
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def save_encoder(folder: Path) -> Path:
    """A tiny BERT whose word embeddings put the p-words near one direction and the q-words near another: the
    routing set is separable by construction, so the test checks the router, not a random encoder's luck."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    vocab = word_tokenizer().get_vocab()
    directions = torch.randn(2, 32)
    with torch.no_grad():
        table = model.embeddings.word_embeddings.weight
        for token, index in vocab.items():
            if token[0] in "pq" and token[1:].isdigit():
                table[index] = directions["pq".index(token[0])] + 0.3 * torch.randn(32)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def solver_examples(n: int, seed: int, task: str | None = "solver") -> list[Example]:
    """``p_i p_j ->`` completes with ``c_(i mod 5)``: learnable, and unknown to the untrained base."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i, j = rng.randrange(10), rng.randrange(10)
        out.append(Example(f"p{i} p{j} ->", f" c{i % 5}", task))
    return out


def other_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(f"q{rng.randrange(10)} q{rng.randrange(10)} ->", f" c{rng.randrange(5)}", "noise") for _ in range(n)
    ]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion, **({"task": e.task} if e.task else {})})
             for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_solver(folder: Path, base_folder: Path, steps: int = 150) -> Path:
    """A LoRA trained on the solver task (the only adapter that solves it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(model, config)
    tokenizer = word_tokenizer()
    prepared = batches([encode(tokenizer, e) for e in solver_examples(64, 7)], tokenizer.pad_token_id, 64)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        example_losses(model, prepared[0]).mean().backward()
        optimizer.step()
    model.save_pretrained(str(folder))
    return folder


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def random_adapter(folder: Path, base_folder: Path, seed: int, scale: float = 0.3) -> Path:
    """A LoRA with random factors on the toy base: it solves nothing and, at full weight, hurts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(str(folder))
    return folder
