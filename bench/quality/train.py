"""Train one PEFT LoRA per in-domain task on SmolLM2-135M-Instruct (CPU).

Two adapter sets are produced:
  adapters/uniform/<task>/  rank 8, alpha 16, q_proj+v_proj (same config for all)
  adapters/hetero/<task>/   ranks cycling 4/8/16 with alpha != r, one adapter with
                            q/k/v/o targets, other seeds (stress-tests the merger)

Loss is the causal LM loss on the answer tokens (+ EOS) only. Adapters are saved in
bf16 to keep the committed files small. Usage:
  python train.py --sets uniform hetero            # full run (see STEPS)
  python train.py --sets uniform --tasks plural --steps 5 --out /tmp/x   # timing probe
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from models import load_smollm2
from peft import LoraConfig, PeftModel, get_peft_model
from tasks import IN_DOMAIN, Example, get_task
from transformers import PreTrainedModel, PreTrainedTokenizerBase

HERE = Path(__file__).resolve().parent
ADAPTER_ROOT = HERE / "adapters"
# One thread, not two: with other jobs sharing the 2 cores, two OpenMP threads were
# measured 3-10x slower per step than one (a descheduled thread stalls every barrier).
# Uncontended, two threads are about 1.5x faster: pass --threads 2 on an idle machine.
THREADS = 1
BATCH_SIZE = 16
WARMUP_STEPS = 10

# Steps per task, from step times measured on the shared 2-core machine (1 thread,
# batch 16): Rotten Tomatoes about 4-8 s/step, chat about 2-3 s, word tasks 1.5-3 s.
# Sized so all 14 adapters train in about 45 minutes even under that contention.
STEPS: dict[str, int] = {
    "rt_sentiment": 80,
    "rt_subjectivity": 50,
    "chat_topic": 60,
    "capital_world": 40,
    "past_tense": 30,
    "plural": 30,
    "comparative": 30,
}
BASE_LR = 1e-3  # for the uniform set's scaling alpha/r = 2


def scaled_lr(r: int, alpha: int) -> float:
    """Keep the effective update of the product B@A comparable across alpha/r.

    Adam's step size is set per parameter, so the delta on W scales with alpha/r;
    dividing the lr by it stops r8/a32 from taking 4x larger steps than r16/a16.
    """
    return BASE_LR * 2 / (alpha / r)


@dataclass(frozen=True)
class AdapterSpec:
    task: str
    adapter_set: str
    r: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    steps: int
    lr: float
    batch_size: int = BATCH_SIZE
    dropout: float = 0.05


def adapter_specs(adapter_set: str, steps: dict[str, int]) -> list[AdapterSpec]:
    tasks = list(IN_DOMAIN)
    if adapter_set == "uniform":
        return [
            AdapterSpec(t, "uniform", 8, 16, ("q_proj", "v_proj"), 1000 + i, steps[t],
                        scaled_lr(8, 16))
            for i, t in enumerate(tasks)
        ]
    # Heterogeneous: rank/alpha pairs deliberately break alpha == 2r so a merger must
    # fold the per-adapter scaling alpha/r into the weights correctly.
    cycle = [(4, 8), (8, 32), (16, 16)]
    specs = []
    for i, t in enumerate(tasks):
        r, alpha = cycle[i % len(cycle)]
        # One adapter with more modules: the merger must handle target sets that differ.
        targets = ("q_proj", "k_proj", "v_proj", "o_proj") if t == "capital_world" else (
            "q_proj", "v_proj")
        specs.append(AdapterSpec(t, "hetero", r, alpha, targets, 2000 + i, steps[t],
                                 scaled_lr(r, alpha)))
    return specs


# ---------------------------------------------------------------- data


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt positions get -100 so only the answer is learned.

    Prompt and answer are tokenized separately (answer with a leading space) exactly as
    score.py does, so train and test see identical token boundaries.
    """
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"]
    answer = [*answer, tokenizer.eos_token_id]  # teaches the model to stop after it
    return prompt + answer, [-100] * len(prompt) + answer


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence in the batch, on the LEFT.

    Left padding right-aligns every answer, so the loss needs logits only for the last
    few positions (`logits_to_keep`): this skips the 49k-vocabulary head and its fp32
    cross-entropy on prompt tokens, about a quarter of each step's time.
    """
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        labels[row, width - len(labs):] = torch.tensor(labs)
        mask[row, width - len(ids):] = 1
    # Positions count real tokens only, so padding does not shift the rotary phases.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "labels": labels}


def answer_loss(model: PeftModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, computing logits only where needed."""
    labels = inputs["labels"]
    answer_width = int((labels != -100).sum(-1).max())
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"], logits_to_keep=answer_width + 1,
    ).logits
    # logits[:, i] predicts the token after it: drop the last, align with the targets.
    predicted = logits[:, :-1].float()
    targets = labels[:, -answer_width:]
    return torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def batches(encoded: list, batch_size: int, steps: int, seed: int):
    """Seeded epoch-wise shuffling; small datasets simply cycle through more epochs."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        yield [encoded[i] for i in order[:batch_size]]
        order = order[batch_size:]


# ---------------------------------------------------------------- training


def lr_lambda(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_adapter(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: AdapterSpec, out_dir: Path
) -> dict:
    torch.manual_seed(spec.seed)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
        lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    task = get_task(spec.task)
    encoded = [encode(tokenizer, ex) for ex in task.train]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, spec.steps)
    )
    losses: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(batches(encoded, spec.batch_size, spec.steps, spec.seed)):
        inputs = collate(batch, tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, inputs)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"  [{spec.adapter_set}/{spec.task}] step {step + 1}/{spec.steps} "
                  f"loss {loss.item():.4f} ({elapsed / (step + 1):.2f} s/step)", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    save_bf16(model, out_dir)
    unwrap(model)
    return {
        **asdict(spec),
        "n_train": len(encoded),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / spec.steps, 3),
        "first_loss": round(sum(losses[:5]) / len(losses[:5]), 4),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
    }


def save_bf16(model: PeftModel, out_dir: Path) -> None:
    """Save only the LoRA weights, cast to bf16 (half the size; PEFT upcasts on load)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    model.save_pretrained(out_dir)


def unwrap(model: PeftModel) -> None:
    """Remove the injected LoRA layers so the same base model trains the next adapter."""
    model.base_model.unload()


def update_log(log_path: Path, entry: dict) -> None:
    """Rewrite the set's log after every adapter so a partial run is still documented."""
    log = json.loads(log_path.read_text()) if log_path.exists() else {"adapters": {}}
    log["adapters"][entry["task"]] = entry
    log["environment"] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "autocast": "bfloat16",
        "saved_dtype": "bfloat16", "warmup_steps": WARMUP_STEPS, "schedule": "cosine",
        "optimizer": "AdamW(weight_decay=0)", "base_model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
    }
    log_path.write_text(json.dumps(log, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["uniform", "hetero"])
    parser.add_argument("--tasks", nargs="+", default=list(IN_DOMAIN))
    parser.add_argument("--steps", type=int, default=None, help="override steps (probe)")
    parser.add_argument("--out", type=Path, default=ADAPTER_ROOT)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    for param in base.parameters():
        param.requires_grad_(False)
    steps = {t: args.steps or n for t, n in STEPS.items()}
    for adapter_set in args.sets:
        for spec in adapter_specs(adapter_set, steps):
            if spec.task not in args.tasks:
                continue
            out_dir = args.out / adapter_set / spec.task
            print(f"training {adapter_set}/{spec.task}: r={spec.r} alpha={spec.alpha} "
                  f"targets={spec.targets} steps={spec.steps}", flush=True)
            entry = train_adapter(base, tokenizer, spec, out_dir)
            update_log(args.out / adapter_set / "train_log.json", entry)
            print(f"  done in {entry['train_seconds']} s, final loss {entry['final_loss']}",
                  flush=True)


if __name__ == "__main__":
    main()
