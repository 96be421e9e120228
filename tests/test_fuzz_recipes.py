"""Seeded fuzz of recipes and of file metadata (issue 12): every case ends in a merge whose output loads, or in
one ``loralego: error:`` line (exit 2); never an internal error, a hang, a changed input or a stray temporary.

``LORALEGO_FUZZ_RECIPES`` (default 150) and ``LORALEGO_FUZZ_METADATA`` (default 150) set the counts,
``LORALEGO_FUZZ_SEED`` the seed; ``LORALEGO_FUZZ_SUMMARY=path`` appends the counts (for docs/robustness.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from lora_files import make_diffusers
from safetensors.torch import load_file, save_file

import loralego
from loralego.cli import main
from loralego.safeio import TMP_PREFIX

SEED = int(os.environ.get("LORALEGO_FUZZ_SEED", "0"))
MODULES = {f"unet.blocks.{i}.attn.to_q": ("linear", 8, 8) for i in range(3)}
OPTION_KEYS = [
    "method",
    "rank",
    "seed",
    "weights",
    "rank_overrides",
    "energy",
    "dtype",
    "format",
    "target",
    "n_init",
    "max_iter",
    "param_reweight",
    "output_reweight",
    "norm",
    "r_ref",
    "density",
    "majority_sign",
    "space",
    "force",
    "report",
    "parameters",
    "nonsense",
]
METHODS = ["cat", "linear", "svd", "lego", "lego+", "ties", "dare_linear", "dare_ties", "task_arithmetic", "bogus"]
SLOW_PATTERNS = [r"(\w|\.|[a-z])*[0-9]{2}", r"(a+)+b", r"((\w+\.?)+)+$!", r"(.*){1,1000}x", "(", "[z-a]", "a{99999999}"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    pool: list[Any] = [
        True,
        False,
        None,
        0,
        1,
        -1,
        4,
        2**70,
        -(2**63),
        0.5,
        -0.0,
        1e308,
        "nan",
        "inf",
        float("nan"),
        float("inf"),
        "",
        "false",
        "4",
        "x\x1b[31m\n",
        "é" * 50,
        [],
        {},
        [1, 2],
        {"mlp": 2},
        {"(": 1},
        [True],
        rng.choice(SLOW_PATTERNS),
        rng.choice(METHODS),
    ]
    value = rng.choice(pool)
    if depth < 3 and rng.random() < 0.15:
        value = [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and rng.random() < 0.1:
        value = {str(_value(rng, depth + 1)): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return value


def _yaml_of(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {json.dumps(value, allow_nan=True)}" for key, value in data.items()) + "\n"


def _recipe_text(rng: random.Random, inputs: list[Path], out: Path) -> tuple[str, list[str]]:
    data: dict[str, Any] = {"inputs": [str(p) for p in inputs], "output": str(out), "method": rng.choice(METHODS[:9])}
    for _ in range(rng.randint(0, 3)):
        data[rng.choice(OPTION_KEYS)] = _value(rng)
    kind = rng.random()
    if kind < 0.1:  # outputs or reports aimed at the inputs
        data[rng.choice(["output", "report"])] = str(rng.choice([inputs[0], inputs[0].parent, inputs[1]]))
    elif kind < 0.15:
        data["inputs"] = _value(rng)
    text = _yaml_of(data)
    extra = rng.random()
    if extra < 0.05:  # an alias bomb in a field
        bomb = ['b0: &b0 ["x","x","x","x","x","x","x","x","x"]']
        bomb += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, 9)]
        text = "\n".join(bomb) + "\n" + text + f"{rng.choice(OPTION_KEYS)}: *b8\n"
    elif extra < 0.1:
        text += "evil: !!python/object/apply:os.system ['touch pwned']\n"
    elif extra < 0.15:
        text = text[: rng.randint(0, len(text))] + rng.choice(["\x00", "{[", "\t- :", "\xff", "&a [*a]"])
    elif extra < 0.2:
        text += "nested: " + "[" * 500 + "]" * 500 + "\n"
    argv = ["--force"] if rng.random() < 0.3 else []
    return text, argv


def _hashes(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError("fuzz case hung")


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    return code, err


def _check(code: int, err: str, case: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith(("loralego: warning", "loralego: note"))]
    assert code in (0, 2), f"{case}: exit {code}: {err}"
    assert "internal error" not in err and "Traceback" not in err, f"{case}: {err}"
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("loralego: error: "), f"{case}: {err}"
        return "refused"
    return "merged"


def _summary(name: str, counts: dict[str, int]) -> None:
    line = f"{name} (seed {SEED}): " + ", ".join(f"{key} {value}" for key, value in counts.items())
    print(line)
    target = os.environ.get("LORALEGO_FUZZ_SUMMARY")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def test_fuzz_recipes(capsys, tmp_path):
    rng = random.Random(SEED)
    inputs = [make_diffusers(tmp_path / "in" / f"d{i}.safetensors", modules=MODULES, seed=i) for i in range(2)]
    protected = _hashes(inputs)
    counts = {"cases": 0, "merged": 0, "refused": 0}
    for index in range(int(os.environ.get("LORALEGO_FUZZ_RECIPES", "150"))):
        out = tmp_path / "out" / f"case{index}.safetensors"
        text, extra = _recipe_text(rng, inputs, out)
        recipe = tmp_path / "recipes" / f"case{index}.yaml"
        recipe.parent.mkdir(exist_ok=True)
        recipe.write_text(text, encoding="utf-8", errors="surrogateescape")
        code, err = _run(capsys, ["run", str(recipe), "-q", *extra])
        outcome = _check(code, err, f"recipe case {index}:\n{text}")
        counts["cases"] += 1
        counts[outcome] += 1
        if outcome == "merged":
            assert loralego.load(out).modules
        assert _hashes(inputs) == protected, f"recipe case {index} changed an input:\n{text}"
    assert not (Path.cwd() / "pwned").exists()
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]
    _summary("recipe fuzz", counts)


def _metadata_case(rng: random.Random) -> dict[str, str]:
    choice = rng.random()
    if choice < 0.6:  # diffusers' lora_adapter_metadata with random types, patterns and nesting
        config: dict[str, Any] = {"lora_alpha": rng.choice([4, 8.0, _value(rng)])}
        for key in rng.sample(
            ["use_rslora", "use_dora", "alpha_pattern", "rank_pattern", "r", "target_modules"], rng.randint(0, 3)
        ):
            config[key] = rng.choice([_value(rng), {rng.choice(SLOW_PATTERNS): rng.choice([2, True, "x"])}])
        raw = json.dumps(config, allow_nan=True)
        if rng.random() < 0.1:
            raw = "[" * rng.choice([100, 10_000, 100_000]) + "]" * 3
        elif rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]
        return {"lora_adapter_metadata": raw}
    # a merge record, as `report` and `verify` read back
    record = {"loralego.method": str(rng.choice([*METHODS, _value(rng)]))}
    record["loralego.options"] = rng.choice(
        [
            json.dumps({str(k): _value(rng) for k in rng.sample(OPTION_KEYS, 2)}, allow_nan=True),
            "[" * 50_000,
            "{not json",
            json.dumps({"parameters": _value(rng)}),
        ]
    )
    record["loralego.inputs"] = rng.choice(
        [json.dumps([{"sha256": _value(rng), "weight": _value(rng)}], allow_nan=True), "[" * 50_000, "null", "[]"]
    )
    return record


def test_fuzz_file_metadata(capsys, tmp_path):
    rng = random.Random(SEED + 1)
    good = make_diffusers(tmp_path / "in" / "good.safetensors", modules=MODULES, seed=1)
    template = load_file(str(make_diffusers(tmp_path / "template.safetensors", modules=MODULES, seed=2)))
    protected = _hashes([good])
    counts = {"cases": 0, "merged": 0, "refused": 0}
    for index in range(int(os.environ.get("LORALEGO_FUZZ_METADATA", "150"))):
        victim = tmp_path / "in" / f"victim{index}.safetensors"
        save_file(template, str(victim), metadata={"format": "pt", **_metadata_case(rng)})
        before = _hashes([victim])
        command = rng.choice(["merge", "inspect", "verify", "report"])
        out = tmp_path / "out" / f"case{index}.safetensors"
        if command == "merge":
            argv = ["merge", str(victim), str(good), "--out", str(out), "-q", "--method", rng.choice(METHODS[:9])]
        elif command == "inspect":
            argv = ["inspect", str(victim)]
        elif command == "verify":
            argv = ["verify", str(victim), str(good), "--json", str(tmp_path / "out" / f"v{index}.json")]
        else:
            argv = ["report", str(victim), str(good), "--out", str(tmp_path / "out" / f"r{index}.html")]
        code, err = _run(capsys, argv)
        outcome = _check(code, err, f"metadata case {index} ({command})")
        capsys.readouterr()
        counts["cases"] += 1
        counts[outcome] += 1
        if outcome == "merged" and command == "merge":
            assert loralego.load(out).modules
        assert _hashes([victim]) == before and _hashes([good]) == protected
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")]
    _summary("metadata fuzz", counts)
