"""Scoring harness: accuracy of a causal LM (optionally with a LoRA) on the tasks.

- classify tasks: the label whose answer tokens have the highest summed
  log-likelihood after the prompt wins (restricted to the task's label set);
- generate tasks: greedy decoding of a few tokens, exact match of the first word
  (case-insensitive) against the accepted answers.

Prompts and answers are tokenized exactly as in train.py (prompt, then " " + answer).
Batches are left-padded with explicit position ids, under `torch.inference_mode()` and
bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from tasks import ALL_TASKS, Example, Task, load_tasks
from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_NEW_TOKENS = 6  # the longest word answer ("Ouagadougou") is 5 tokens
DEFAULT_BATCH = 32
HERE = Path(__file__).resolve().parent


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Scorer:
    """Holds a model + tokenizer and caches tokenized label candidates."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bf16: bool = True
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.bf16 = bf16
        self._label_ids: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def label_ids(self, label: str) -> list[int]:
        if label not in self._label_ids:
            self._label_ids[label] = self._ids(" " + label)
        return self._label_ids[label]

    # ------------------------------------------------------------ classification

    def classify(self, examples: Sequence[Example], labels_of: dict[str, tuple[str, ...]]) -> list[str]:
        """Predicted label per example; examples may come from different tasks."""
        if all(len(self.label_ids(lab)) == 1 for ex in examples for lab in labels_of[ex.task]):
            return self._classify_single_token(examples, labels_of)
        return self._classify_multi_token(examples, labels_of)

    def _classify_single_token(
        self, examples: Sequence[Example], labels_of: dict[str, tuple[str, ...]]
    ) -> list[str]:
        # One forward per prompt: the next-token distribution ranks all labels at once.
        batch = _left_pad([self._ids(ex.prompt) for ex in examples], self.tokenizer.pad_token_id)
        logits = self._forward(batch, keep=1)[:, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        predictions = []
        for row, ex in enumerate(examples):
            labels = labels_of[ex.task]
            ids = torch.tensor([self.label_ids(lab)[0] for lab in labels])
            predictions.append(labels[int(log_probs[row, ids].argmax())])
        return predictions

    def _classify_multi_token(
        self, examples: Sequence[Example], labels_of: dict[str, tuple[str, ...]]
    ) -> list[str]:
        # Fallback for labels spanning several tokens: one sequence per (prompt, label).
        rows, owners, answer_lens = [], [], []
        for i, ex in enumerate(examples):
            prompt = self._ids(ex.prompt)
            for label in labels_of[ex.task]:
                answer = self.label_ids(label)
                rows.append(prompt + answer)
                owners.append((i, label))
                answer_lens.append(len(answer))
        width = max(answer_lens)
        batch = _left_pad(rows, self.tokenizer.pad_token_id)
        log_probs = torch.log_softmax(self._forward(batch, keep=width + 1)[:, :-1].float(), -1)
        targets = batch["input_ids"][:, -width:]
        token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        best: dict[int, tuple[float, str]] = {}
        for row, ((i, label), n) in enumerate(zip(owners, answer_lens, strict=True)):
            total = float(token_lp[row, width - n:].sum())
            if i not in best or total > best[i][0]:
                best[i] = (total, label)
        return [best[i][1] for i in range(len(examples))]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions, on the CPU (the model may be on a GPU)."""
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        on_device = {name: t.to(self.device) for name, t in batch.items()}
        with _autocast(self.bf16, self.device):
            logits = self.model(**on_device, position_ids=position_ids.to(self.device), logits_to_keep=keep).logits
        return logits.cpu()

    # ------------------------------------------------------------ generation

    def generate(self, examples: Sequence[Example]) -> list[str]:
        """First word of the greedy continuation of each prompt."""
        batch = _left_pad([self._ids(ex.prompt) for ex in examples], self.tokenizer.pad_token_id)
        with _autocast(self.bf16, self.device):
            out = self.model.generate(
                **{name: t.to(self.device) for name, t in batch.items()},
                max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        texts = self.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True
        )
        return [first_word(t) for t in texts]

    # ------------------------------------------------------------ batches

    def predict(
        self, examples: Sequence[Example], tasks: dict[str, Task], batch_size: int
    ) -> list[str]:
        """Predictions in input order; each batch is split by kind (one pass over data)."""
        labels_of = {name: task.labels for name, task in tasks.items()}
        predictions: list[str] = [""] * len(examples)
        for start in range(0, len(examples), batch_size):
            chunk = range(start, min(start + batch_size, len(examples)))
            for kind in ("classify", "generate"):
                idx = [i for i in chunk if tasks[examples[i].task].kind == kind]
                if not idx:
                    continue
                subset = [examples[i] for i in idx]
                preds = (self.classify(subset, labels_of) if kind == "classify"
                         else self.generate(subset))
                for i, pred in zip(idx, preds, strict=True):
                    predictions[i] = pred
        return predictions


def first_word(text: str) -> str:
    words = text.strip().split()
    return re.sub(r"^\W+|\W+$", "", words[0]) if words else ""


def is_correct(example: Example, prediction: str) -> bool:
    return prediction.lower() in {a.lower() for a in example.accepted}


def _by_length(examples: Sequence[Example]) -> list[Example]:
    # Similar lengths in a batch waste less compute on padding.
    return sorted(examples, key=lambda ex: len(ex.prompt))


@torch.inference_mode()
def task_outcomes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    batch_size: int = DEFAULT_BATCH,
    bf16: bool = True,
) -> dict[str, list[bool]]:
    """{task: whether each test example was answered correctly}, in the task's own test order.

    The order is fixed by tasks.py, so two runs' outcome lists pair example by example (the paired
    bootstrap in report.py relies on it).
    """
    scorer = Scorer(model, tokenizer, bf16)
    outcomes = {}
    for name, task in tasks.items():
        order = sorted(range(len(task.test)), key=lambda i: len(task.test[i].prompt))
        examples = [task.test[i] for i in order]
        predictions = scorer.predict(examples, tasks, batch_size)
        hits = [False] * len(order)
        for i, example, prediction in zip(order, examples, predictions, strict=True):
            hits[i] = is_correct(example, prediction)
        outcomes[name] = hits
    return outcomes


def score_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    batch_size: int = DEFAULT_BATCH,
    bf16: bool = True,
) -> dict[str, float]:
    """{task: accuracy on its test set}."""
    outcomes = task_outcomes(model, tokenizer, tasks, batch_size, bf16)
    return {name: sum(hits) / len(hits) for name, hits in outcomes.items()}


def encode_outcomes(hits: Sequence[bool]) -> str:
    """A run's outcomes on one task as a compact string of 0/1 (kept in the results JSON)."""
    return "".join("1" if hit else "0" for hit in hits)


def mixture(tasks: dict[str, Task], seed: int = 0) -> list[Example]:
    """All tasks' test examples in one seeded shuffle."""
    examples = [ex for task in tasks.values() for ex in task.test]
    random.Random(seed).shuffle(examples)
    return examples


@torch.inference_mode()
def score_mixed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    bf16: bool = True,
) -> dict[str, float]:
    """Score one shuffled mixture in one pass: per-task accuracy plus overall scores.

    `overall` is accuracy over all examples (big tasks weigh more); `macro` is the
    unweighted mean of the per-task accuracies.
    """
    examples = mixture(tasks, seed)
    predictions = Scorer(model, tokenizer, bf16).predict(examples, tasks, batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, pred in zip(examples, predictions, strict=True):
        hits[ex.task].append(is_correct(ex, pred))
    scores = {name: sum(hits[name]) / len(hits[name]) for name in tasks}
    scores["overall"] = sum(sum(h) for h in hits.values()) / len(examples)
    scores["macro"] = sum(scores[name] for name in tasks) / len(tasks)
    return scores


class AdapterBench:
    """Scores many adapter folders against one base model loaded once.

    The first adapter wraps the base in a PeftModel; later ones are added with
    `load_adapter`, activated, scored and deleted again, so only one is live at a time.
    The base alone is scored with the adapters disabled.
    """

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.base = base
        self.tokenizer = tokenizer
        self.peft: PeftModel | None = None
        self._count = 0

    def score_base(self, tasks: dict[str, Task], mixed: bool = False, outcomes: bool = False, **kwargs):
        fn = score_mixed if mixed else task_outcomes if outcomes else score_tasks
        if self.peft is None:
            return fn(self.base, self.tokenizer, tasks, **kwargs)
        with self.peft.disable_adapter():
            return fn(self.peft, self.tokenizer, tasks, **kwargs)

    def score_adapter(
        self, path: Path | str, tasks: dict[str, Task], mixed: bool = False, outcomes: bool = False, **kwargs
    ):
        """Accuracies per task (or, with ``outcomes``, each example's hit) with ``path`` as the live adapter."""
        fn = score_mixed if mixed else task_outcomes if outcomes else score_tasks
        with self.adapter(path) as model:
            return fn(model, self.tokenizer, tasks, **kwargs)

    def adapter(self, path: Path | str) -> _ActiveAdapter:
        """Load `path` as the only live adapter (context manager yielding the model)."""
        self._count += 1
        name = f"adapter{self._count}"
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.peft.load_adapter(str(path), adapter_name=name)
        self.peft.set_adapter(name)
        # Drop the previous adapter only now: PEFT refuses to delete the last one.
        for other in [n for n in self.peft.peft_config if n != name]:
            self.peft.delete_adapter(other)
        self.peft.eval()
        return _ActiveAdapter(self.peft)


class _ActiveAdapter:
    """`with bench.adapter(path) as model:` scores with exactly that adapter active."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def __enter__(self) -> PeftModel:
        return self.model

    def __exit__(self, *exc: object) -> None:
        return None


def adapter_dirs(root: Path) -> Iterator[tuple[str, Path]]:
    """(set/task, folder) for every adapter folder under root."""
    for config in sorted(root.glob("*/*/adapter_config.json")):
        yield f"{config.parent.parent.name}/{config.parent.name}", config.parent


def main() -> None:
    from models import load_smollm2

    parser = argparse.ArgumentParser(description="score base model and adapter folders")
    parser.add_argument("--adapters", type=Path, default=HERE / "adapters")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS))
    parser.add_argument("--out", type=Path, default=HERE / "adapters" / "scores_single.json")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    parser.add_argument("--only", nargs="*", default=None, help="set/task names to score")
    # 1 thread by default: see train.THREADS (2 threads stall when the cores are shared).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-done", action="store_true", help="keep entries already in --out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    tasks = load_tasks(args.tasks)
    bench = AdapterBench(base, tokenizer)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("meta", {})
    results["meta"].update({
        "bf16_autocast": not args.fp32, "batch_size": args.batch_size,
        "test_sizes": {name: len(task.test) for name, task in tasks.items()},
    })
    runs = [("base", None), *adapter_dirs(args.adapters)]
    for label, path in runs:
        if args.only is not None and label not in args.only:
            continue
        if args.skip_done and label in results:
            continue
        start = time.perf_counter()
        kwargs = {"batch_size": args.batch_size, "bf16": not args.fp32}
        scores = (bench.score_base(tasks, **kwargs) if path is None
                  else bench.score_adapter(path, tasks, **kwargs))
        results[label] = {k: round(v, 4) for k, v in scores.items()}
        print(f"{label:28s} " + " ".join(f"{k}={v:.3f}" for k, v in scores.items())
              + f"  ({time.perf_counter() - start:.0f}s)", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
