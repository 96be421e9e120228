"""Bad input, faults and untrusted files (issue 5): every refusal is a one-line LoraLegoError, nothing is lost.

Each case runs twice, through the API (``merge_to_folder`` raises :class:`LoraLegoError` naming the file,
tensor or key) and through the CLI (``main`` returns 2 with exactly one ``loralego: error:`` line on stderr,
no traceback). After every failing run: no output folder, no temporary files beside it, and every input
file byte-identical with its mtime unchanged.

Set ``LORALEGO_RECORD=path`` to append ``case<TAB>message`` for each CLI refusal (used for
docs/robustness.md).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_peft_adapter
from safetensors.torch import load_file, save_file

import loralego
from loralego import LoraLegoError
from loralego.adapters import safetensors_stream
from loralego.cli import main

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
Q_MODULE = "model.layers.0.self_attn.q_proj"


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters made once per module with PEFT; tests work on copies."""
    root = tmp_path_factory.mktemp("pristine")
    make_peft_adapter(root / "a", r=4, alpha=8, seed=1)
    make_peft_adapter(root / "b", r=8, alpha=16, seed=2)
    make_peft_adapter(root / "other_base", r=4, alpha=8, seed=3, base_name="other-model")
    make_peft_adapter(root / "half", r=4, alpha=16, seed=4, dtype=torch.float16)
    return root


@pytest.fixture
def inputs(pristine: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copy a pristine adapter into this test's folder ``in/`` (mtimes preserved by copytree)."""

    def copy(name: str = "a", as_name: str | None = None) -> Path:
        target = tmp_path / "in" / (as_name or name)
        shutil.copytree(pristine / name, target)
        return target

    return copy


# ---------------------------------------------------------------------------------------------------- helpers


def snapshot(paths: Iterable[Path]) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every file's and folder's mtime under the given paths."""
    state: dict[str, tuple[bytes | None, int]] = {}
    for root in paths:
        if not os.path.lexists(root):  # os.path: tests may monkeypatch Path methods
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            data = path.read_bytes() if path.is_file() else None
            state[str(path)] = (data, path.stat().st_mtime_ns)
    return state


def _cli_args(options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def _record(case: str, line: str) -> None:
    target = os.environ.get("LORALEGO_RECORD")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(f"{case}\t{line}\n")


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect ``code`` and exactly one ``loralego: error:`` line on stderr."""
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loralego: error: "), err
    assert "Traceback" not in err
    return lines[0]


def no_leftovers(out: Path, before: set[str] | None = None) -> None:
    """No output folder and nothing new beside it (temporary folders included)."""
    assert not out.exists()
    if out.parent.exists():
        left = set(os.listdir(out.parent)) - (before or set())
        assert not left, left


def check_refused(
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    adapters: list[Path],
    match: str | list[str],
    *,
    out: Path | None = None,
    options: dict[str, Any] | None = None,
    protect: Iterable[Path] = (),
    expect_out: bool = False,
) -> str:
    """The same refusal through the API and the CLI; inputs untouched, no output and no temp files left.

    ``match``: text(s) the message must contain (the file, tensor or key, and the problem).
    ``expect_out``: ``out`` exists before and must be left exactly as it was.
    """
    matches = [match] if isinstance(match, str) else match
    options = options or {}
    out = out if out is not None else adapters[0].parent.parent / "out"
    watched = [*adapters, *protect, *([out] if expect_out else [])]
    before = snapshot(watched)
    beside = set(os.listdir(out.parent)) if out.parent.exists() else None

    with pytest.raises(LoraLegoError) as info:
        loaded = [loralego.load(path) for path in adapters]
        loralego.merge_to_folder(loaded, out, command="test", **options)
    message = str(info.value)
    assert "\n" not in message
    for text in matches:
        assert text in message, message

    line = one_error_line(capsys, ["merge", *adapters, "--out", out, *_cli_args(options)])
    for text in matches:
        assert text in line, line
    _record(request.node.name, line)

    assert snapshot(watched) == before, "an input (or the existing output) was modified"
    if expect_out:
        assert out.exists()
    elif beside is not None:
        no_leftovers(out, beside)
    else:
        assert not out.exists() and not out.parent.exists()
    return line


def edit_config(folder: Path, **changes: Any) -> Path:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


_DELETE = object()


def rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    path = folder / WEIGHTS
    tensors = change(load_file(str(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def header(raw: bytes) -> tuple[int, dict[str, Any]]:
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8 : 8 + length])


def with_header(raw: bytes, new_header: dict[str, Any]) -> bytes:
    length, _ = header(raw)
    encoded = json.dumps(new_header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :]


# ------------------------------------------------------------------------------------- folders and files


def test_missing_adapter_folder(request, capsys, inputs, tmp_path):
    good = inputs("b")
    check_refused(request, capsys, [tmp_path / "in" / "nope", good], [str(tmp_path / "in" / "nope"), "no such"])


def test_adapter_path_is_a_file(request, capsys, inputs):
    good = inputs("b")
    a_file = good / CONFIG
    check_refused(request, capsys, [a_file, good], [str(a_file), "expected a PEFT adapter folder"])


def test_config_missing(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / CONFIG).unlink()
    _to_bin(bad, lambda state: state)  # a folder holding only a legacy .bin: nothing but PEFT can read it
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), "missing"])


def test_empty_folder(request, capsys, inputs, tmp_path):
    empty = tmp_path / "in" / "empty"
    empty.mkdir(parents=True)
    check_refused(request, capsys, [empty, inputs("b")], [str(empty / CONFIG), "missing"])


def test_config_missing_beside_peft_safetensors(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / CONFIG).unlink()
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), "missing"])


def test_config_is_a_folder_so_unreadable(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / CONFIG).unlink()
    (bad / CONFIG).mkdir()
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), "cannot read"])


def test_config_permission_denied(request, capsys, inputs, monkeypatch):
    bad, good = inputs("a"), inputs("b")
    real = os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path) == bad / CONFIG:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), "cannot read: Permission denied"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_weights_unreadable_by_mode(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / WEIGHTS).chmod(0)
    try:
        check_refused(request, capsys, [bad, good], [str(bad / WEIGHTS)])
    finally:
        (bad / WEIGHTS).chmod(0o644)


def test_weights_permission_denied(request, capsys, inputs, monkeypatch):
    bad, good = inputs("a"), inputs("b")
    from loralego.adapters import safetensors_read

    real = safetensors_read.parse_header

    def denied(path: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(path) == bad / WEIGHTS:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors_read, "parse_header", denied)
    check_refused(request, capsys, [bad, good], [str(bad / WEIGHTS), "Permission denied"])


def test_adapter_folder_not_searchable(request, capsys, inputs, monkeypatch):
    bad, good = inputs("a"), inputs("b")
    real = Path.exists

    def denied(self: Path, *args: Any, **kwargs: Any) -> bool:
        if self == bad:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", denied)
    check_refused(request, capsys, [bad, good], [str(bad), "cannot open: Permission denied"])


def test_weights_missing(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / WEIGHTS).unlink()
    check_refused(request, capsys, [bad, good], [str(bad), "no adapter_model.safetensors or adapter_model.bin"])


def test_weights_is_a_folder(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / WEIGHTS).unlink()
    (bad / WEIGHTS).mkdir()
    check_refused(request, capsys, [bad, good], [str(bad / WEIGHTS), "expected a file, found a folder"])


# ------------------------------------------------------------------------------------------ adapter_config.json


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('["r", 4]', "expected a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["garbage", "empty", "list", "deeply-nested"],
)
def test_config_not_a_json_object(request, capsys, inputs, text, problem):
    bad, good = inputs("a"), inputs("b")
    (bad / CONFIG).write_text(text)
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), problem])


def test_config_not_utf8(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    (bad / CONFIG).write_bytes(b'{"r": 4, "lora_alpha": \xff}')
    check_refused(request, capsys, [bad, good], [str(bad / CONFIG), "not UTF-8"])


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"r": _DELETE}, "missing key 'r'"),
        ({"lora_alpha": _DELETE}, "missing key 'lora_alpha'"),
        ({"r": "4"}, "key 'r' must be an integer, got '4'"),
        ({"r": 4.5}, "key 'r' must be an integer, got 4.5"),
        ({"r": True}, "key 'r' must be an integer, got True"),
        ({"r": None}, "key 'r' must be an integer, got None"),
        ({"r": 0}, "key 'r' must be >= 1, got 0"),
        ({"r": -3}, "key 'r' must be >= 1, got -3"),
        ({"r": 5}, f"tensor {Q_A}: rank 4 disagrees with the config's r = 5"),
        ({"lora_alpha": "eight"}, "key 'lora_alpha' must be a number, got 'eight'"),
        ({"lora_alpha": [8] * 100}, "key 'lora_alpha' must be a number, got [8, 8, 8"),
        ({"lora_alpha": 0}, "lora_alpha of model.layers.0.self_attn.q_proj must be a finite non-zero number"),
        ({"lora_alpha": float("inf")}, "must be a finite non-zero number"),
        ({"use_rslora": "yes"}, "key 'use_rslora' must be true or false"),
        ({"fan_in_fan_out": 1}, "key 'fan_in_fan_out' must be true or false"),
        ({"rank_pattern": [4]}, "key 'rank_pattern' must map module patterns to numbers"),
        ({"alpha_pattern": {"q_proj": "x"}}, "key 'alpha_pattern' must map module patterns to numbers"),
        ({"rank_pattern": {"q_proj(": 4}}, "key 'rank_pattern': pattern 'q_proj(' is not a valid regular expression"),
        ({"rank_pattern": {"q_proj": 2}}, f"tensor {Q_A}: rank 4 disagrees with the config's r = 2"),
        ({"target_modules": [1, 2]}, "key 'target_modules' must be a string or a list of strings"),
        ({"base_model_name_or_path": ["x"]}, "key 'base_model_name_or_path' must be a string"),
        ({"peft_type": "PROMPT_TUNING"}, "peft_type 'PROMPT_TUNING' is not supported"),
    ],
    ids=[
        "r-missing",
        "alpha-missing",
        "r-string",
        "r-float",
        "r-bool",
        "r-null",
        "r-zero",
        "r-negative",
        "r-disagrees",
        "alpha-string",
        "alpha-huge-list",
        "alpha-zero",
        "alpha-inf",
        "rslora-string",
        "fan-in-fan-out-int",
        "rank-pattern-list",
        "alpha-pattern-string",
        "rank-pattern-bad-regex",
        "rank-pattern-disagrees",
        "target-modules-ints",
        "base-model-list",
        "peft-type",
    ],
)
def test_config_bad_keys_and_types(request, capsys, inputs, changes, problem):
    bad, good = inputs("a"), inputs("b")
    edit_config(bad, **changes)
    where = str(bad / WEIGHTS) if "disagrees" in problem else str(bad / CONFIG)
    check_refused(request, capsys, [bad, good], [where, problem])


# ------------------------------------------------------------------------------------------- safetensors file


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (lambda raw: raw[:-100], "file not fully covered"),
        (lambda raw: raw[:20], "invalid header length"),
        (lambda raw: b"", "header too small"),
        (lambda raw: struct.pack("<Q", 2**62) + raw[8:], "header too large"),
        (lambda raw: struct.pack("<Q", 16) + raw[8:], "invalid JSON in header"),
        (lambda raw: raw[:30] + bytes([raw[30] ^ 0xFF]) + raw[31:], "invalid UTF-8 in header"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "invalid JSON in header"),
    ],
    ids=[
        "truncated",
        "truncated-in-header",
        "empty",
        "header-length-huge",
        "header-length-short",
        "header-byte",
        "header-not-object",
    ],
)
def test_safetensors_truncated_or_corrupt(request, capsys, inputs, corrupt, problem):
    bad, good = inputs("a"), inputs("b")
    path = bad / WEIGHTS
    path.write_bytes(corrupt(path.read_bytes()))
    check_refused(request, capsys, [bad, good], [str(path), "not a readable safetensors file", problem])


def _edit_entry(raw: bytes, key: str, **fields: Any) -> bytes:
    _, entries = header(raw)
    entries[key].update(fields)
    return with_header(raw, entries)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"shape": [4, 33]}, "invalid shape, data type, or offset"),
        ({"shape": [8, 16]}, f"module {Q_MODULE}: lora_A has rank 8 but lora_B has rank 4"),
        ({"dtype": "I32"}, f"tensor {Q_A}: not a floating-point tensor"),
        ({"dtype": "F16", "shape": [8, 32]}, f"module {Q_MODULE}: lora_A has rank 8 but lora_B has rank 4"),
        ({"data_offsets": [0, 10**12]}, "invalid shape, data type, or offset"),
    ],
    ids=["shape-vs-bytes", "shape-same-size", "int-dtype", "dtype-and-shape", "offsets"],
)
def test_safetensors_header_edited(request, capsys, inputs, fields, problem):
    bad, good = inputs("a"), inputs("b")
    path = bad / WEIGHTS
    path.write_bytes(_edit_entry(path.read_bytes(), Q_A, **fields))
    check_refused(request, capsys, [bad, good], [str(path), problem])


def test_a_and_b_ranks_do_not_match(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    path = rewrite_tensors(bad, lambda t: {**t, Q_B: torch.randn(32, 6)})
    check_refused(
        request, capsys, [bad, good], [str(path), f"module {Q_MODULE}: lora_A has rank 4 but lora_B has rank 6"]
    )


def test_factor_of_wrong_dimension(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    path = rewrite_tensors(bad, lambda t: {**t, Q_A: torch.randn(4, 32, 2)})
    check_refused(request, capsys, [bad, good], [str(path), f"module {Q_MODULE}: lora_A [4, 32, 2]", "not LoRA factor"])


def test_factor_missing(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    path = rewrite_tensors(bad, lambda t: {k: v for k, v in t.items() if k != Q_B})
    check_refused(request, capsys, [bad, good], [str(path), f"module {Q_MODULE} has no lora_B tensor"])


def test_no_lora_tensors(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    path = bad / WEIGHTS
    save_file({}, str(path))
    check_refused(request, capsys, [bad, good], [str(path), "holds no LoRA tensors"])


def test_unknown_tensor_name(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    path = rewrite_tensors(bad, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(96, 32)})
    check_refused(request, capsys, [bad, good], [str(path), "tensor base_model.model.lm_head.weight: a full weight"])


def test_rank_zero_module(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    edit_config(bad, rank_pattern={"q_proj": 0})
    path = rewrite_tensors(bad, lambda t: {**t, Q_A: torch.zeros(0, 32), Q_B: torch.zeros(32, 0)})
    check_refused(request, capsys, [bad, good], [str(path), f"module {Q_MODULE}: rank 0"])


def test_same_module_different_shapes_across_adapters(request, capsys, inputs):
    good, bad = inputs("a"), inputs("b", "b_wide")
    rewrite_tensors(bad, lambda t: {**t, Q_A: torch.randn(8, 40)})
    check_refused(request, capsys, [good, bad], [f"module {Q_MODULE}: a adapts a 32x32 weight but b_wide a 32x40 one"])


def test_tensor_name_with_control_characters_stays_one_line(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    evil = "x\n\x1b[31mred.lora_A.weight.extra"
    rewrite_tensors(bad, lambda t: {**t, evil: torch.zeros(1, 1)})
    line = check_refused(request, capsys, [bad, good], ["not a LoRA factor"])
    assert "\\n\\x1b[31mred" in line and "\x1b" not in line


# ------------------------------------------------------------------------------------------ values in tensors


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_in_a_weight(request, capsys, inputs, value):
    bad, good = inputs("a"), inputs("b")

    def poison(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[Q_B][3, 1] = value
        return tensors

    path = rewrite_tensors(bad, poison)
    check_refused(request, capsys, [good, bad], [str(path), f"tensor {Q_B}: contains NaN or Inf"])


def test_finite_but_absurd_weights(request, capsys, inputs):
    bad, good = inputs("a"), inputs("b")
    rewrite_tensors(bad, lambda t: {k: torch.full_like(v, 3e38) for k, v in t.items()})
    check_refused(request, capsys, [bad, good], [str(bad), f"module {Q_MODULE}: lora_A is too large to merge"])


def test_float16_output_overflow(request, capsys, inputs):
    bad = inputs("half")
    rewrite_tensors(bad, lambda t: {k: torch.full_like(v, 60000.0) for k, v in t.items()})
    check_refused(request, capsys, [bad], "the merged weights overflow float16; use --dtype float32")


def test_all_zero_adapter_merges(inputs, tmp_path):
    """A freshly initialised LoRA (B = 0) is valid input, not an error."""
    zero, good = inputs("a"), inputs("b")
    rewrite_tensors(zero, lambda t: {k: torch.zeros_like(v) for k, v in t.items()})
    for method in ("lego", "svd", "cat"):
        out = tmp_path / f"out-{method}"
        loralego.merge_to_folder([loralego.load(zero), loralego.load(good)], out, method=method, rank=4)
        assert loralego.load(out).modules


def test_negative_alpha_merges_with_its_sign(inputs):
    """PEFT accepts a negative lora_alpha (a negated update); found by the fuzzer as a crash in fold_scale."""
    from helpers import assert_updates_close, dense_updates, summed_updates

    negative, good = inputs("a"), inputs("b")
    edit_config(negative, lora_alpha=-8)
    adapters = [loralego.load(negative), loralego.load(good)]
    assert adapters[0].scale(Q_MODULE) == -2.0
    assert_updates_close(dense_updates(loralego.merge(adapters, method="cat")), summed_updates(adapters))
    assert loralego.merge(adapters, method="lego", rank=4).modules


# ------------------------------------------------------------------------------------------- options and plan


def test_different_base_models_refused_then_warned_with_force(request, capsys, inputs, tmp_path):
    first, second = inputs("a"), inputs("other_base")
    check_refused(request, capsys, [first, second], ["different base models", "other-model", "--force"])
    out = tmp_path / "forced"
    assert main(["merge", str(first), str(second), "--out", str(out), "--force", "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("loralego: warning: adapters name different base models")
    _record(request.node.name + "[--force]", err[0])
    assert loralego.load(out).modules


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"rank": 0}, "option rank: must be >= 1"),
        ({"rank": -2}, "option rank: must be >= 1"),
        ({"weights": [1.0]}, "--weights: got 1 weights for 2 adapters"),
        ({"weights": [1.0, 2.0, 3.0]}, "--weights: got 3 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "option weights: must be finite numbers"),
        ({"method": "linear"}, "method linear needs equal ranks"),
        ({"method": "ties", "density": 0}, "option density: must be in (0, 1]"),
    ],
    ids=["rank0", "rank-negative", "weights-short", "weights-long", "weights-nan", "linear-mixed-ranks", "density"],
)
def test_bad_options(request, capsys, inputs, options, problem):
    check_refused(request, capsys, [inputs("a"), inputs("b")], problem, options=options)


def test_output_equal_to_an_input(request, capsys, inputs):
    first, second = inputs("a"), inputs("b")
    for force in ({}, {"force": True}):
        check_refused(
            request, capsys, [first, second], [str(first), "overlaps input"], out=first, options=force, expect_out=True
        )


def test_output_inside_an_input(request, capsys, inputs):
    first, second = inputs("a"), inputs("b")
    out = first / "merged"
    check_refused(request, capsys, [first, second], ["overlaps input"], out=out, options={"force": True})


def test_input_inside_the_output_with_force(request, capsys, inputs, tmp_path):
    first, second = inputs("a"), inputs("b")
    out = tmp_path / "in"  # the folder holding both inputs
    check_refused(
        request,
        capsys,
        [first, second],
        [str(out), "overlaps input"],
        out=out,
        options={"force": True},
        expect_out=True,
    )


def test_input_reached_through_a_symlink(request, capsys, inputs, tmp_path):
    first, second = inputs("a"), inputs("b")
    link = tmp_path / "link"
    link.symlink_to(first)
    check_refused(
        request, capsys, [first, second], ["overlaps input"], out=link, options={"force": True}, expect_out=True
    )


def test_existing_output_without_force(request, capsys, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    check_refused(
        request, capsys, [inputs("a"), inputs("b")], [str(out), "already exists", "--force"], out=out, expect_out=True
    )


def test_output_is_a_file(request, capsys, inputs, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    check_refused(
        request,
        capsys,
        [inputs("a"), inputs("b")],
        [str(out), "not a folder"],
        out=out,
        options={"force": True},
        expect_out=True,
    )


def test_output_below_a_file(request, capsys, inputs, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    check_refused(
        request,
        capsys,
        [inputs("a"), inputs("b")],
        ["cannot create the output folder"],
        out=blocker / "sub" / "out",
        protect=[blocker],
    )


def test_saving_an_adapter_over_its_own_folder(inputs):
    first = inputs("a")
    before = snapshot([first])
    with pytest.raises(LoraLegoError, match="overlaps this adapter's own folder"):
        loralego.load(first).save(first, force=True)
    assert snapshot([first]) == before


# ------------------------------------------------------------------------------ failed writes and Ctrl-C


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, after: int, error: BaseException) -> None:
    """Make ``owner.name`` raise ``error`` on call number ``after + 1`` (the first ``after`` calls work)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


_ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
_FAST = {"method": "cat"}  # fault injection does not depend on the method; cat is the quickest


@pytest.mark.parametrize(
    ("owner", "name", "after"),
    [
        (safetensors_stream.SafetensorsStreamWriter, "add", 3),  # while streaming tensors
        (safetensors_stream.SafetensorsStreamWriter, "close", 0),  # while writing the header into its gap
        (Path, "write_text", 0),  # the config
        (os, "fsync", 0),  # flushing to disk
    ],
    ids=["stream", "assemble", "config", "fsync"],
)
def test_disk_full_leaves_no_output(request, capsys, inputs, monkeypatch, owner, name, after):
    first, second = inputs("a"), inputs("b")
    _fail_on_call(monkeypatch, owner, name, after, _ENOSPC)
    check_refused(
        request, capsys, [first, second], ["writing the output failed: No space left on device"], options=_FAST
    )


def test_disk_full_while_replacing_keeps_the_old_output(request, capsys, inputs, monkeypatch, tmp_path):
    first, second = inputs("a"), inputs("b")
    out = tmp_path / "out"
    loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, **_FAST)
    _fail_on_call(monkeypatch, safetensors_stream.SafetensorsStreamWriter, "add", 2, _ENOSPC)
    check_refused(
        request,
        capsys,
        [first, second],
        "No space left on device",
        out=out,
        options={"force": True, **_FAST},
        expect_out=True,
    )


def test_failed_rename_restores_the_old_output(inputs, monkeypatch, tmp_path):
    first, second = inputs("a"), inputs("b")
    out = tmp_path / "out"
    loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, **_FAST)
    before = snapshot([out])
    real = Path.rename

    def rename(self: Path, target: Any) -> Path:
        # moving the new output into place fails (the old one is aside)
        if self.name.startswith(".loralego-tmp-") and not self.name.endswith("-old-out"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(LoraLegoError, match="writing the output failed"):
        loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, force=True, method="svd", rank=2)
    assert snapshot([out]) == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_created_parent_folders_are_removed_on_failure(inputs, monkeypatch, tmp_path):
    first, second = inputs("a"), inputs("b")
    _fail_on_call(monkeypatch, safetensors_stream.SafetensorsStreamWriter, "add", 1, _ENOSPC)
    with pytest.raises(LoraLegoError):
        loralego.merge_to_folder(
            [loralego.load(first), loralego.load(second)], tmp_path / "new" / "deep" / "out", **_FAST
        )
    assert sorted(os.listdir(tmp_path)) == ["in"]


def _interrupt_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, after: int, how: str) -> None:
    """Ctrl-C on call ``after + 1`` of ``owner.name``: a raised KeyboardInterrupt, or a real SIGINT sent to
    this process (Python's default handler turns it into KeyboardInterrupt at the next bytecode)."""
    if how == "exception":
        _fail_on_call(monkeypatch, owner, name, after, KeyboardInterrupt())
        return
    real = getattr(owner, name)
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the caller restores the previous handler


@pytest.mark.parametrize("how", ["exception", "sigint"])
@pytest.mark.parametrize("replace", [False, True], ids=["new-output", "replacing-with-force"])
def test_ctrl_c_during_a_merge(request, capsys, inputs, monkeypatch, tmp_path, replace, how):
    from loralego import pipeline

    first, second = inputs("a"), inputs("b")
    out = tmp_path / "out"
    options = {"force": True, **_FAST} if replace else _FAST
    if replace:
        loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, **_FAST)
    before = snapshot([first, second, out])
    previous = signal.getsignal(signal.SIGINT)
    try:
        _interrupt_on_call(monkeypatch, pipeline, "merge_module", 1, how)
        with pytest.raises(KeyboardInterrupt):
            loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, **options)
        assert snapshot([first, second, out]) == before
        assert sorted(os.listdir(tmp_path)) == (["in", "out"] if replace else ["in"])

        _interrupt_on_call(monkeypatch, pipeline, "merge_module", 1, how)
        assert main(["merge", str(first), str(second), "--out", str(out), *_cli_args(options)]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err.splitlines()
    assert err == ["loralego: interrupted; nothing was written"]
    _record(request.node.name, err[0])
    assert snapshot([first, second, out]) == before
    assert sorted(os.listdir(tmp_path)) == (["in", "out"] if replace else ["in"])


@pytest.mark.parametrize("fault", ["disk-full", "ctrl-c"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_single_file_outputs_fail_cleanly(inputs, monkeypatch, tmp_path, fmt, fault):
    """The single-file writers (kohya, diffusers) obey the same rule: no file, no temp file."""
    from fuzzing import _to_kohya

    source = inputs("a")
    single = tmp_path / "in" / fmt / "lora.safetensors"
    if fmt == "kohya":
        _to_kohya(source, single)
    else:
        single.parent.mkdir()
        shutil.copy(source / WEIGHTS, single)
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    before = snapshot([single])
    error = _ENOSPC if fault == "disk-full" else KeyboardInterrupt()
    _fail_on_call(monkeypatch, safetensors_stream.SafetensorsStreamWriter, "add", 2, error)
    with pytest.raises(LoraLegoError if fault == "disk-full" else KeyboardInterrupt):
        loralego.merge_to_folder([loralego.load(single)], out_dir / "merged.safetensors", **_FAST)
    assert os.listdir(out_dir) == []
    assert snapshot([single]) == before


# -------------------------------------------------------------------------------------------- legacy .bin files


def _marker_callable(path: str) -> int:
    """What a malicious pickle would run: creates a marker file (module-level so pickle can reference it)."""
    Path(path).write_text("code ran")
    return 0


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_marker_callable, (self.marker,))


def _to_bin(folder: Path, payload: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    state = load_file(str(folder / WEIGHTS))
    (folder / WEIGHTS).unlink()
    path = folder / "adapter_model.bin"
    torch.save(payload(state), path)
    return path


def test_legacy_bin_with_plain_tensors_merges(inputs, tmp_path):
    first, second = inputs("a"), inputs("b")
    _to_bin(first, lambda state: state)
    out = tmp_path / "out"
    loralego.merge_to_folder([loralego.load(first), loralego.load(second)], out, method="cat")
    assert loralego.load(out).modules


def test_legacy_bin_pickle_code_is_never_run(request, capsys, inputs, tmp_path):
    bad, good = inputs("a"), inputs("b")
    marker = tmp_path / "code-ran"
    path = _to_bin(bad, lambda state: {**state, "extra": _RunsCodeWhenUnpickled(marker)})
    # Positive control on a copy: an unrestricted load of this file really does run its code.
    control = tmp_path / "control.bin"
    shutil.copy(path, control)
    torch.load(control, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()

    check_refused(request, capsys, [bad, good], [str(path), "refused", "unsupported GLOBAL", "_marker_callable"])
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (lambda state: {**state, "extra": os.getcwd}, "unsupported GLOBAL"),
        (lambda state: {**state, "extra": 3}, "expected a mapping of names to dense tensors"),
        (lambda state: list(state.values()), "expected a mapping of names to dense tensors"),
        (lambda state: {"state_dict": state}, "expected a mapping of names to dense tensors"),
        (lambda state: {k: v.to_sparse() for k, v in state.items()}, "expected a mapping of names to dense tensors"),
        (lambda state: {k: v.long() for k, v in state.items()}, "not a floating-point tensor"),
    ],
    ids=["function-reference", "non-tensor-value", "list", "nested", "sparse", "integer"],
)
def test_legacy_bin_holding_other_objects(request, capsys, inputs, payload, problem):
    bad, good = inputs("a"), inputs("b")
    path = _to_bin(bad, payload)
    check_refused(request, capsys, [bad, good], [str(path), problem])


@pytest.mark.parametrize(
    "corrupt",
    [lambda raw: raw[: len(raw) // 2], lambda raw: b"garbage" * 10, lambda raw: raw[:-10]],
    ids=["truncated", "garbage", "truncated-tail"],
)
def test_legacy_bin_corrupt(request, capsys, inputs, corrupt):
    bad, good = inputs("a"), inputs("b")
    path = _to_bin(bad, lambda state: state)
    path.write_bytes(corrupt(path.read_bytes()))
    check_refused(request, capsys, [bad, good], [str(path), "refused: not a plain tensor checkpoint"])


# --------------------------------------------------------------------------------------- unsupported kinds


def _peft_kinds() -> dict[str, Any]:
    import peft

    return {
        "dora": peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        "adalora": peft.AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10),
        "ia3": peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=["q_proj"]),
        "lokr": peft.LoKrConfig(r=4, target_modules=["q_proj"]),
        "lora_bias": peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True),
        "embedding": peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
        "modules_to_save": peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }


@pytest.fixture(scope="module")
def peft_kinds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter of each unsupported kind, saved by PEFT itself on the tiny Llama."""
    import warnings

    from conftest import tiny_llama
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("kinds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, config in _peft_kinds().items():
            get_peft_model(tiny_llama(), config).save_pretrained(str(root / name))
    return root


# What the refusal names, by config and (config rewritten to plain LoRA) by tensor names.
_KINDS = {
    "dora": ("DoRA (use_dora)", "lora_magnitude_vector: DoRA"),
    "adalora": ("peft_type 'ADALORA'", "lora_E: AdaLoRA"),
    "ia3": ("peft_type 'IA3'", "ia3_l: IA3"),
    "loha": ("peft_type 'LOHA'", "hada_w1_a: LoHa"),
    "lokr": ("peft_type 'LOKR'", "lokr_w1: LoKr"),
    "lora_bias": ("LoRA with bias (lora_bias)", "lora_B.bias: LoRA with bias"),
    "embedding": ("LoRA on embedding layers", "lora_embedding_A: LoRA on embedding layers"),
    "modules_to_save": ("modules_to_save", "lm_head.weight: a full weight"),
}


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_unsupported_kind_by_config(request, capsys, peft_kinds, tmp_path, kind):
    bad = tmp_path / "in" / kind
    shutil.copytree(peft_kinds / kind, bad)
    where = CONFIG if kind != "embedding" else WEIGHTS  # PEFT writes no config flag for embedding LoRA
    check_refused(request, capsys, [bad], [str(bad / where), _KINDS[kind][0], "not supported"])


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_unsupported_kind_by_tensor_names(request, capsys, peft_kinds, tmp_path, kind):
    """The config claims plain LoRA; the tensors give the adapter away."""
    bad = tmp_path / "in" / kind
    shutil.copytree(peft_kinds / kind, bad)
    plain = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (bad / CONFIG).write_text(json.dumps(plain))
    check_refused(request, capsys, [bad], [str(bad / WEIGHTS), _KINDS[kind][1]])


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"bias": "all"}, "LoRA with bias is not supported"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices is not supported"),
        ({"use_qalora": True}, "QA-LoRA is not supported"),
        ({"alora_invocation_tokens": [5, 6]}, "Activated LoRA (alora_invocation_tokens) is not supported"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "LoRA on parameters (target_parameters)"),
        ({"kasa_config": {"x": 1}}, "KaSA (kasa_config) is not supported"),
        ({"arrow_config": {"top_k": 2}}, "Arrow routing (arrow_config) is not supported"),
    ],
    ids=["bias-all", "trainable-tokens", "qalora", "alora", "target-parameters", "kasa", "arrow"],
)
def test_unsupported_lora_variants_by_config(request, capsys, inputs, changes, problem):
    bad = inputs("a")
    edit_config(bad, **changes)
    check_refused(request, capsys, [bad, inputs("b")], [str(bad / CONFIG), problem])


# ------------------------------------------------------------------------------------------ inputs read-only

_OPENS: list[tuple[str, Any, Any]] | None = None  # filled by the audit hook while a test listens


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENS is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENS.append((os.fsdecode(args[0]), args[1], args[2]))


_HOOKED = False


def test_inputs_are_only_opened_for_reading(inputs, tmp_path):
    """Every open of an input file from Python (config, .bin, hashing) is read-only, seen by an audit hook.
    (safetensors opens its file from Rust, read-only and memory-mapped, which the hook cannot see.)"""
    global _OPENS, _HOOKED
    import sys

    if not _HOOKED:
        sys.addaudithook(_audit)  # hooks cannot be removed; this one does nothing while _OPENS is None
        _HOOKED = True
    first, second = inputs("a"), inputs("b")
    _to_bin(second, lambda state: state)
    _OPENS = []
    try:
        loralego.merge_to_folder([loralego.load(first), loralego.load(second)], tmp_path / "out", method="cat")
        seen = list(_OPENS)
    finally:
        _OPENS = None
    inputs_root = str(tmp_path / "in")
    opened = [(path, mode, flags) for path, mode, flags in seen if path.startswith(inputs_root)]
    assert {Path(path).name for path, _, _ in opened} >= {CONFIG, "adapter_model.bin"}
    for path, mode, flags in opened:
        if mode is not None:
            assert set(str(mode)) <= set("rbt"), (path, mode)
        else:
            assert flags & os.O_ACCMODE == os.O_RDONLY, (path, flags)


# ---------------------------------------------------------------------------------------- CLI odds and ends


def test_inspect_refusal_is_one_line(capsys, inputs):
    bad = inputs("a")
    (bad / CONFIG).write_text("{")
    line = one_error_line(capsys, ["inspect", bad])
    assert str(bad / CONFIG) in line


def test_debug_shows_the_traceback(inputs, tmp_path):
    with pytest.raises(LoraLegoError, match="no such file or folder"):
        main(["--debug", "merge", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
