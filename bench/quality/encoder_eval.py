"""Reduced evaluation on all-MiniLM-L6-v2: the whole path of issue 4 on real text in a few CPU minutes.

The full evaluation (evaluate.py) scores committed SmolLM2 adapters. This reduced one trains small LoRAs on
the MiniLM encoder inside the run, saves them as PEFT folders, merges them with lora-lego (the CLI for cat, the
Python API for the rest), loads every merged folder with ``PeftModel.from_pretrained`` and scores it on every
task. CI runs it (tests/test_eval_pipeline.py) to check the pipeline end to end and the exact identities;
``python bench/quality/encoder_eval.py`` prints the same table.

The classifier has no trained head: a head would have to travel as ``modules_to_save``, which lora-lego
refuses (a full layer is not a sum of rank-1 units). Instead a text's mean-pooled, normalised embedding is
compared by cosine similarity with the embeddings of its task's label words (made by the same adapted
encoder), times a fixed temperature. Only the encoder's LoRA is trained, so the LoRA *is* the classifier and a
merged LoRA is a merged classifier.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from models import load_minilm
from peft import LoraConfig, PeftModel, get_peft_model
from tasks import Example, Task, get_task
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import loralego
import loralego.cli

# 2 for CI's two free cores. On a machine shared with other jobs one thread was measured ~5x faster per
# training step than two (a descheduled OpenMP thread stalls every barrier): set LORALEGO_EVAL_THREADS=1 there.
THREADS = int(os.environ.get("LORALEGO_EVAL_THREADS", "2"))
TEMPERATURE = 20.0  # cosine in [-1, 1] -> logits in [-20, 20]: sharp enough for cross-entropy to train
MAX_LENGTH = 128  # prompts are at most ~90 tokens (tasks.MAX_TEXT_WORDS): never truncates
BATCH_SIZE = 16
SCORE_BATCH = 64
N_TRAIN = 256
N_TEST = 200
SUBSAMPLE_SEED = 0
TARGETS = ("query", "value")


@dataclass(frozen=True)
class LoraSpec:
    """How one task LoRA is trained."""

    task: str
    r: int
    alpha: int
    seed: int
    steps: int
    lr: float = 2e-3


# Mixed ranks and alpha != r: the merger must fold each adapter's scale (2 and 3) into its factors. Step counts
# keep the run short; each LoRA still beats the base encoder on its task by a wide margin (the test asserts it).
DEFAULT_SPECS = (
    LoraSpec("rt_sentiment", r=8, alpha=16, seed=11, steps=40),
    LoraSpec("rt_subjectivity", r=4, alpha=12, seed=12, steps=30),
    LoraSpec("chat_topic", r=8, alpha=16, seed=13, steps=30),
)


# ---------------------------------------------------------------- data


def subsample(task: Task, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SUBSAMPLE_SEED) -> Task:
    """A seeded random subset of the task's fixed splits (all of a split when it is smaller)."""
    rng = random.Random(f"{seed}/{task.name}")  # str seeds are hashed deterministically (not salted)
    train = rng.sample(task.train, min(n_train, len(task.train)))
    test = rng.sample(task.test, min(n_test, len(task.test)))
    return dataclasses.replace(task, train=tuple(train), test=tuple(test))


def load_tasks(names: Sequence[str]) -> dict[str, Task]:
    tasks = {name: subsample(get_task(name)) for name in names}
    for task in tasks.values():
        if task.kind != "classify":
            raise ValueError(f"{task.name}: the encoder evaluation scores classification tasks only")
    return tasks


def encoder_text(example: Example) -> str:
    """The prompt without its trailing "Answer:" (a causal-LM cue); the task line stays, naming the task."""
    return example.prompt.removesuffix("Answer:").rstrip()


def label_index(task: Task, examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([task.labels.index(example.answer) for example in examples])


# ---------------------------------------------------------------- model


def embed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised sentence embeddings, as sentence-transformers does."""
    inputs = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def prototype_logits(texts: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled cosine similarity of normalised text and label embeddings."""
    return TEMPERATURE * texts @ prototypes.T


@torch.inference_mode()
def task_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task) -> torch.Tensor:
    """Logits [n_test, n_labels] of the task's test set, in test-set order.

    The prototypes are the bare label words: descriptions written by hand ("a question about sports") were
    tried and made the base encoder's chat_topic accuracy worse (0.215 vs 0.685), and they would be one more
    choice tuned by looking at test scores.
    """
    prototypes = embed(model, tokenizer, task.labels)
    texts = [encoder_text(example) for example in task.test]
    # Batches of similar length waste less compute on padding; results go back to test-set order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = torch.empty(len(texts), len(task.labels))
    for start in range(0, len(order), SCORE_BATCH):
        rows = order[start : start + SCORE_BATCH]
        logits[rows] = prototype_logits(embed(model, tokenizer, [texts[i] for i in rows]), prototypes)
    return logits


def accuracy(logits: torch.Tensor, task: Task) -> float:
    return (logits.argmax(-1) == label_index(task, task.test)).float().mean().item()


def train_lora(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, spec: LoraSpec) -> PeftModel:
    """Train a LoRA on a copy of ``base`` with cross-entropy over the prototype logits; seeded.

    The model stays in eval mode (no dropout): a few dozen steps do not overfit, and without dropout the run
    depends on the seed only.
    """
    torch.manual_seed(spec.seed)  # LoRA A's initialisation
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(TARGETS), lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config)
    model.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    targets = label_index(task, task.train)
    texts = [encoder_text(example) for example in task.train]
    rng = random.Random(spec.seed)
    order: list[int] = []
    for _ in range(spec.steps):
        if len(order) < BATCH_SIZE:  # seeded epochs; a small task cycles
            fresh = list(range(len(texts)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        logits = prototype_logits(
            embed(model, tokenizer, [texts[i] for i in batch]), embed(model, tokenizer, task.labels)
        )
        loss = F.cross_entropy(logits, targets[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def load_adapted(base: PreTrainedModel, folder: Path) -> PeftModel:
    """A PEFT folder on a fresh copy of the base (``from_pretrained`` injects layers into the model it gets)."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.eval()
    return model


# ---------------------------------------------------------------- merges


def pool_size(specs: Sequence[LoraSpec]) -> int:
    """Rank-1 units per module across the task LoRAs (all target the same modules)."""
    return sum(spec.r for spec in specs)


def lora_row(spec: LoraSpec) -> str:
    return f"lora {spec.task} r={spec.r}"


def single_lego_row(spec: LoraSpec) -> str:
    return f"lego({spec.task}) k={spec.r}"


def merge_rows(specs: Sequence[LoraSpec]) -> dict[str, dict[str, object]]:
    """Row name -> merge options over all task LoRAs; k = r is the largest input rank (the default)."""
    r = max(spec.r for spec in specs)
    pool = pool_size(specs)
    return {
        "cat": {"method": "cat"},
        f"ties k={r}": {"method": "ties"},
        f"svd k={r}": {"method": "svd"},
        f"lego k={r}": {"method": "lego", "rank": r, "seed": 0},
        f"lego k={pool} no-reweight": {
            "method": "lego",
            "rank": pool,
            "param_reweight": False,
            "output_reweight": False,
        },
    }


def merge_with_cli(folders: Sequence[Path], out: Path, method: str) -> None:
    """One merge through the command users run (in-process), so the CLI path is part of the check."""
    code = loralego.cli.main(["merge", *map(str, folders), "--out", str(out), "--method", method, "--quiet"])
    if code != 0:
        raise RuntimeError(f"loralego merge --method {method} exited with {code}")


# ---------------------------------------------------------------- the run


@dataclass
class EvalRun:
    """What a run produced: test logits per scored row and task, the adapter folders, and step times."""

    tasks: dict[str, Task]
    specs: tuple[LoraSpec, ...]
    folders: dict[str, Path]  # row name -> PEFT folder (task LoRAs and merges)
    logits: dict[str, dict[str, torch.Tensor]]  # row name -> task -> [n_test, n_labels]
    seconds: dict[str, float]

    def score(self, row: str, task: str) -> float:
        return accuracy(self.logits[row][task], self.tasks[task])

    def table(self) -> str:
        """Accuracy per task; "/own" is the mean of accuracy divided by the task's own LoRA (issue 4's metric).
        A task LoRA is scored on its own task only."""
        names = list(self.tasks)
        own = {spec.task: self.score(lora_row(spec), spec.task) for spec in self.specs}
        width = max(len(row) for row in self.logits)
        header = f"{'':{width}s} " + " ".join(f"{name:>15s}" for name in names) + "     mean     /own"
        lines = [header, f"{'(test examples)':{width}s} " + " ".join(f"{len(self.tasks[n].test):15d}" for n in names)]
        for row, per_task in self.logits.items():
            cells = " ".join(f"{self.score(row, n):15.3f}" if n in per_task else f"{'-':>15s}" for n in names)
            if len(per_task) == len(names):
                scores = [self.score(row, n) for n in names]
                mean = sum(scores) / len(scores)
                normalised = sum(s / own[n] for s, n in zip(scores, names, strict=True)) / len(names)
                cells += f" {mean:8.3f} {normalised:8.3f}"
            lines.append(f"{row:{width}s} {cells}")
        return "\n".join(lines)


def run(workdir: Path, specs: Sequence[LoraSpec] = DEFAULT_SPECS, log: Callable[[str], None] = print) -> EvalRun:
    """Train, save, merge, reload and score; the PEFT folders go under ``workdir``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(workdir, specs, log)
    finally:
        torch.set_num_threads(previous)  # leave the rest of a test session as it was


def _run(workdir: Path, specs: Sequence[LoraSpec], log: Callable[[str], None]) -> EvalRun:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    tasks = load_tasks([spec.task for spec in specs])
    base, tokenizer = load_minilm()
    seconds["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    folders: dict[str, Path] = {}
    for spec in specs:
        model = train_lora(base, tokenizer, tasks[spec.task], spec)
        folders[lora_row(spec)] = workdir / "lora" / spec.task
        model.save_pretrained(folders[lora_row(spec)])
        log(f"trained {spec.task}: r={spec.r} alpha={spec.alpha} steps={spec.steps} seed={spec.seed}")
    seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    lora_folders = [folders[lora_row(spec)] for spec in specs]
    adapters = [loralego.load(folder) for folder in lora_folders]
    for row, options in merge_rows(specs).items():
        folders[row] = workdir / "merged" / row.replace(" ", "_").replace("=", "")
        if row == "cat":
            merge_with_cli(lora_folders, folders[row], "cat")
        else:
            loralego.merge_to_folder(adapters, folders[row], **options)
    # One adapter alone at k = its rank (the default): every unit is its own cluster, both reweightings are 1.
    single = specs[1]
    folders[single_lego_row(single)] = workdir / "merged" / f"lego_single_{single.task}"
    loralego.merge_to_folder([adapters[1]], folders[single_lego_row(single)], method="lego")
    seconds["merge"] = time.perf_counter() - clock

    clock = time.perf_counter()
    logits = {"base": {name: task_logits(base, tokenizer, task) for name, task in tasks.items()}}
    own_task = {lora_row(spec): spec.task for spec in specs} | {single_lego_row(single): single.task}
    for row, folder in folders.items():
        model = load_adapted(base, folder)
        scored = [own_task[row]] if row in own_task else list(tasks)  # a task LoRA: its own task only
        logits[row] = {name: task_logits(model, tokenizer, tasks[name]) for name in scored}
    seconds["score"] = time.perf_counter() - clock
    return EvalRun(tasks, tuple(specs), folders, logits, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="keep the adapters here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.out or Path(tmp))
    print(result.table())
    print("seconds:", {step: round(value, 1) for step, value in result.seconds.items()})


if __name__ == "__main__":
    main()
