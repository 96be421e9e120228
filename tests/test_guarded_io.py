"""Issue 12: every write guarded, every read bounded, nothing lost, no debris, no hang.

One test per case of the issue. Each failing case checks the refusal is one ``loralego: error:`` line (exit 2),
that the inputs' bytes are unchanged and that no ``.loralego-tmp-`` temporary is left. Set
``LORALEGO_RECORD=path`` to append ``case<TAB>line`` for docs/robustness.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_peft_adapter
from lora_files import make_diffusers
from safetensors.torch import load_file, save_file

import loralego
from loralego import LoraLegoError
from loralego.adapters import safetensors_stream
from loralego.cli import main
from loralego.safeio import TMP_PREFIX

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SLOW = r"(\w|\.|[a-z])*[0-9]{2}"  # overlapping alternatives under a repeat: exponential on a 30-character name


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    make_peft_adapter(root / "a", r=4, alpha=8, seed=1)
    make_peft_adapter(root / "b", r=4, alpha=8, seed=2)
    return root


@pytest.fixture
def pair(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    for name in ("a", "b"):
        shutil.copytree(pristine / name, tmp_path / "in" / name)
    return tmp_path / "in" / "a", tmp_path / "in" / "b"


def hashes(*roots: Path) -> dict[str, str]:
    found = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def refused(capsys: pytest.CaptureFixture[str], argv: list[Any], *texts: str, record: str = "") -> str:
    start = time.monotonic()
    code = main([str(a) for a in argv])
    assert time.monotonic() - start < 30, "took too long: a hang?"
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("loralego: error: "), captured.err
    assert "internal error" not in lines[0]
    for text in texts:
        assert text in lines[0], lines[0]
    target = os.environ.get("LORALEGO_RECORD")
    if target and record:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(f"{record}\t{lines[0]}\n")
    return lines[0]


# ------------------------------------------------------------------------------ writes over inputs


def test_verify_json_onto_an_input_is_refused(capsys, pair, tmp_path):
    a, b = pair
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat", "-q"]) == 0
    before = hashes(a, b, out)
    refused(
        capsys,
        ["verify", out, a, b, "--json", a / WEIGHTS],
        "overlaps input",
        record="verify --json onto an input's weights",
    )
    refused(
        capsys,
        ["verify", out, a, b, "--json", out / WEIGHTS],
        "overlaps input",
        record="verify --json onto the merged adapter",
    )
    assert hashes(a, b, out) == before


def test_verify_json_into_a_missing_folder_and_over_other_files(capsys, pair, tmp_path):
    a, b = pair
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat", "-q"]) == 0
    target = tmp_path / "new" / "deep" / "v.json"
    assert main(["verify", str(out), str(a), str(b), "--json", str(target)]) == 0  # parents are created
    assert json.loads(target.read_text())["inputs"]
    capsys.readouterr()
    refused(
        capsys,
        ["verify", out, a, b, "--json", target],
        "already exists (use --force",
        record="verify --json onto an existing file",
    )
    assert main(["verify", str(out), str(a), str(b), "--json", str(target), "--force"]) == 0
    notes = tmp_path / "notes.json"
    notes.write_text("my notes, not JSON")
    refused(
        capsys,
        ["verify", out, a, b, "--json", notes, "--force"],
        "replaces only a JSON file",
        record="verify --json --force onto a non-JSON file",
    )
    assert notes.read_text() == "my notes, not JSON"


@pytest.mark.parametrize("command", ["merge", "run", "report"])
def test_report_onto_an_input_is_refused(capsys, pair, tmp_path, command):
    a, b = pair
    before = hashes(a, b)
    if command == "merge":
        argv = ["merge", a, b, "--out", tmp_path / "o", "--report", a / WEIGHTS, "--force"]
    elif command == "run":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"inputs: [{a}, {b}]\noutput: o\nreport: {a / WEIGHTS}\nmethod: cat\n")
        argv = ["run", recipe, "--force"]
    else:
        out = tmp_path / "merged"
        assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat", "-q"]) == 0
        before = hashes(a, b, out)
        argv = ["report", out, a, b, "--out", out / WEIGHTS, "--force"]
    refused(capsys, argv, "overlaps input", record=f"{command}: report path is an input's weights (with --force)")
    assert hashes(a, b, *([tmp_path / "merged"] if command == "report" else [])) == before
    assert not (tmp_path / "o").exists()


def test_recipe_cannot_grant_force(capsys, pair, tmp_path):
    a, b = pair
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: [{a}, {b}]\noutput: {documents}\nforce: true\nmethod: cat\n")
    refused(capsys, ["run", recipe], "force: not allowed in a recipe", record="recipe with force: true")
    # --force on the command line still does not delete a folder lora-lego did not write
    recipe.write_text(f"inputs: [{a}, {b}]\noutput: {documents}\nmethod: cat\n")
    refused(
        capsys, ["run", recipe, "--force"], "no lora-lego provenance", record="run --force onto a folder of documents"
    )
    assert (documents / "thesis.txt").read_text() == "years of work"


def test_recipe_paths_are_relative_to_its_folder(pair, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.yaml").write_text("inputs: [../in/a, ../in/b]\noutput: out/merged\nmethod: cat\n")
    monkeypatch.chdir(tmp_path / "in")
    assert main(["run", str(folder / "r.yaml"), "-q"]) == 0
    assert (folder / "out" / "merged" / WEIGHTS).is_file()


def test_force_replaces_only_own_outputs_or_empty_folders(capsys, pair, tmp_path):
    a, b = pair
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    refused(
        capsys,
        ["merge", a, b, "--out", unrelated, "--force", "--method", "cat"],
        "no lora-lego provenance",
        record="merge --force onto a folder of unrelated files",
    )
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(a), str(b), "--out", str(empty), "--force", "--method", "cat", "-q"]) == 0
    first = hashes(empty)
    assert main(["merge", str(a), str(b), "--out", str(empty), "--force", "--method", "svd", "--rank", "2", "-q"]) == 0
    assert hashes(empty) != first  # its own earlier output was replaced

    (empty / "my_notes.txt").write_text("mine")
    refused(
        capsys,
        ["merge", a, b, "--out", empty, "--force", "--method", "cat"],
        "my_notes.txt, which lora-lego did not write",
        record="merge --force onto an earlier output holding a user's file",
    )
    assert (empty / "my_notes.txt").read_text() == "mine"

    single = tmp_path / "page.safetensors"
    single.write_text("not safetensors")
    src = make_diffusers(tmp_path / "in" / "d.safetensors")
    refused(
        capsys,
        ["merge", src, "--out", single, "--force", "--method", "cat"],
        "replaces only a safetensors file",
        record="merge --force onto a .safetensors path holding something else",
    )
    assert single.read_text() == "not safetensors"


def test_hub_cache_symlinks_are_followed(capsys, pair, tmp_path):
    """snapshots/<rev>/ holds links into blobs/: an output at blobs/ must not delete the real weights."""
    a, _ = pair
    repo = tmp_path / "hub" / "models--me--lora"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in (CONFIG, WEIGHTS):
        digest = hashlib.sha256((a / name).read_bytes()).hexdigest()
        shutil.copy(a / name, blobs / digest)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)
    before = hashes(blobs)
    refused(
        capsys,
        ["merge", snapshot, "--out", blobs, "--force", "--method", "cat"],
        "overlaps input",
        record="output at the hub cache's blobs/ folder behind a snapshot's links (--force)",
    )
    weights_blob = (snapshot / WEIGHTS).resolve()
    refused(capsys, ["merge", snapshot, "--out", weights_blob, "--force"], "overlaps input")
    assert hashes(blobs) == before


# ----------------------------------------------------------------------------------- bounded reads


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("which", ["weights", "config", "recipe"])
def test_fifo_inputs_are_refused_at_once(capsys, pair, tmp_path, which):
    a, b = pair
    if which == "recipe":
        fifo = tmp_path / "r.yaml"
        os.mkfifo(fifo)
        refused(capsys, ["run", fifo], "found a FIFO", record="recipe is a FIFO")
        return
    name = WEIGHTS if which == "weights" else CONFIG
    (a / name).unlink()
    os.mkfifo(a / name)
    refused(capsys, ["merge", a, b, "--out", tmp_path / "o"], "found a FIFO", record=f"{which} file is a FIFO")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("which", ["config", "recipe", "weights"])
def test_links_to_dev_zero_are_refused(capsys, pair, tmp_path, which):
    a, b = pair
    if which == "recipe":
        (tmp_path / "r.yaml").symlink_to("/dev/zero")
        refused(capsys, ["run", tmp_path / "r.yaml"], "found a device", record="recipe is a link to /dev/zero")
        return
    name = CONFIG if which == "config" else WEIGHTS
    (a / name).unlink()
    (a / name).symlink_to("/dev/zero")
    refused(
        capsys, ["merge", a, b, "--out", tmp_path / "o"], "found a device", record=f"{which} is a link to /dev/zero"
    )


def test_oversized_config_and_recipe(capsys, pair, tmp_path):
    a, b = pair
    config = json.loads((a / CONFIG).read_text())
    config["padding"] = "x" * (17 << 20)
    (a / CONFIG).write_text(json.dumps(config))
    refused(capsys, ["merge", a, b, "--out", tmp_path / "o"], "limit", record="config of 17 MB")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: [{b}]\noutput: o\n# " + "x" * (2 << 20) + "\n")
    refused(capsys, ["run", recipe], "limit", record="recipe of 2 MB")


def test_yaml_alias_bomb(capsys, pair, tmp_path):
    _, b = pair
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(lines) + f"\ninputs: [{b}]\noutput: o\nrank_overrides: *a9\n")
    refused(capsys, ["run", recipe], "aliases are expanded", record="recipe: YAML alias bomb (10^9 values)")
    recipe.write_text(f"inputs: [{b}]\noutput: o\nweights: &w [*w]\n")
    refused(capsys, ["run", recipe], "nested more than", record="recipe: recursive YAML alias")


def test_catastrophic_pattern_in_config_is_refused_quickly(capsys, pair, tmp_path):
    a, b = pair
    config = json.loads((a / CONFIG).read_text())
    config["rank_pattern"] = {SLOW: 4}
    (a / CONFIG).write_text(json.dumps(config))
    refused(
        capsys,
        ["merge", a, b, "--out", tmp_path / "o"],
        "catastrophic backtracking",
        "rank_pattern",
        record="rank_pattern with a catastrophic regex",
    )


def test_catastrophic_pattern_in_file_metadata_is_refused_quickly(capsys, tmp_path):
    modules = {"unet.down_blocks.0.attentions.0.proj_in": ("linear", 8, 8)}
    path = make_diffusers(
        tmp_path / "d.safetensors", modules=modules, adapter_metadata={"lora_alpha": 4, "alpha_pattern": {SLOW: 2}}
    )
    refused(
        capsys,
        ["inspect", path],
        "catastrophic backtracking",
        record="alpha_pattern in a file's metadata with a catastrophic regex",
    )


def test_catastrophic_rank_override_is_refused_quickly(capsys, pair, tmp_path):
    a, b = pair
    refused(
        capsys,
        ["merge", a, b, "--out", tmp_path / "o", "--rank-override", "(\\w|\\.|[a-z])*[0-9]{2}=2"],
        "catastrophic backtracking",
        record="--rank-override with a catastrophic regex",
    )


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--n-init", "1000000000"], "option n_init: must be >= 1 and <= 1000"),
        (["--max-iter", "1000000000"], "option max_iter: must be >= 1 and <= 100000"),
        (["--rank", "1000000000"], "option rank: must be >= 1 and <= 65536"),
        (["--method", "lego", "--r-ref", "0"], "option r_ref: must be a finite number > 0"),
        (["--method", "lego", "--r-ref", "-4"], "option r_ref: must be a finite number > 0"),
        (["--rank-override", "mlp=1000000000"], "k must be an integer from 1 to 65536"),
    ],
    ids=["n-init", "max-iter", "rank", "r-ref-0", "r-ref-negative", "override"],
)
def test_counts_have_limits(capsys, pair, tmp_path, flags, problem):
    a, b = pair
    refused(capsys, ["merge", a, b, "--out", tmp_path / "o", *flags], problem, record=f"merge {' '.join(flags)}")


def test_report_validates_tampered_metadata(capsys, pair, tmp_path):
    a, b = pair
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat", "-q"]) == 0
    tensors = load_file(str(out / WEIGHTS))
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        meta = dict(handle.metadata())
    refusals = {
        "options nested 100 000 deep": {"loralego.options": "[" * 100_000 + "]" * 100_000},
        "options not JSON": {"loralego.options": "{not json"},
    }
    notes = {  # readable records of the wrong shape: a note in the report, never a traceback
        "n_init of 10^9": {"loralego.method": "lego", "loralego.options": json.dumps({"n_init": 10**9})},
        "inputs of the wrong type": {"loralego.inputs": json.dumps([{"weight": "heavy"}])},
        "inputs nested 100 000 deep": {"loralego.inputs": "[" * 100_000 + "]" * 100_000},
        "options a list": {"loralego.options": "[1, 2]"},
    }
    report = tmp_path / "report.html"
    for case, change in refusals.items():
        save_file(tensors, str(out / WEIGHTS), metadata={**meta, **change})
        refused(
            capsys, ["report", out, a, b, "--out", report], "metadata", record=f"report: tampered metadata ({case})"
        )
        assert not report.exists()
    for change in notes.values():
        save_file(tensors, str(out / WEIGHTS), metadata={**meta, **change})
        assert main(["report", str(out), str(a), str(b), "--out", str(report), "--force"]) == 0
        assert "error" not in capsys.readouterr().err


# --------------------------------------------------------------------------------- strict types


def test_use_rslora_string_in_metadata_is_refused(capsys, tmp_path):
    path = make_diffusers(tmp_path / "d.safetensors", adapter_metadata={"lora_alpha": 4, "use_rslora": "false"})
    refused(
        capsys,
        ["inspect", path],
        "use_rslora must be true or false",
        record='use_rslora: "false" in a file\'s metadata',
    )


def test_metadata_nested_deeply_or_with_a_broken_pattern(capsys, tmp_path):
    deep = make_diffusers(tmp_path / "deep.safetensors")
    tensors = load_file(str(deep))
    save_file(tensors, str(deep), metadata={"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000})
    refused(capsys, ["inspect", deep], "nested", record="metadata nested 100 000 deep")
    broken = make_diffusers(
        tmp_path / "broken.safetensors", adapter_metadata={"lora_alpha": 4, "alpha_pattern": {"(": 2}}
    )
    refused(capsys, ["inspect", broken], "not a valid regular expression", record="broken regex in a file's metadata")
    typed = make_diffusers(tmp_path / "typed.safetensors", adapter_metadata={"lora_alpha": "four"})
    refused(
        capsys, ["inspect", typed], "lora_alpha must be a number", record="lora_alpha a string in a file's metadata"
    )


def test_factors_of_different_adapter_names_are_refused(capsys, pair, tmp_path):
    a, b = pair
    tensors = load_file(str(a / WEIGHTS))
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.other.weight")
        renamed[key] = value
    save_file(renamed, str(a / WEIGHTS))
    refused(
        capsys,
        ["merge", a, b, "--out", tmp_path / "o"],
        "pairs factors of different adapters",
        record="lora_A.default paired with lora_B.other",
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("rank: true", "rank: Input should be a valid integer"),
        ("method: ties\ndensity: '0.3'", "density: Input should be a valid number"),
        ("method: lego\nparam_reweight: 'false'", "param_reweight: Input should be a valid boolean"),
        ("weights: [true]", "weights.0: Input should be a valid number"),
        ("n_init: 100000000", "n_init: must be >= 1 and <= 1000"),
    ],
)
def test_recipe_values_keep_their_kind(capsys, pair, tmp_path, line, problem):
    _, b = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: [{b}]\noutput: o\n{line}\n")
    refused(capsys, ["run", recipe], problem, record=f"recipe {line}")


def test_soft_proj_is_not_oft(tmp_path):
    modules = {"unet.mid_block.attentions.0.to_soft_proj": ("linear", 8, 8)}
    path = make_diffusers(tmp_path / "d.safetensors", modules=modules)
    adapter = loralego.load(path)
    assert list(adapter.modules) == ["unet.mid_block.attentions.0.to_soft_proj"]
    oft = tmp_path / "oft.safetensors"
    plain = load_file(str(path))
    save_file({**plain, "unet.x.oft_blocks": torch.zeros(2, 2)}, str(oft))
    with pytest.raises(LoraLegoError, match="OFT"):
        loralego.load(oft)


def test_names_are_escaped_in_verify_and_inspect(capsys, tmp_path):
    modules = {"unet.a\x1b[31mred": ("linear", 8, 8)}
    path = make_diffusers(tmp_path / "d.safetensors", modules=modules)
    assert main(["verify", str(path), str(path)]) == 0
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr()
    assert "\x1b" not in printed.out + printed.err
    assert "\\x1b[31mred" in printed.out


def test_over_long_output_name(capsys, pair, tmp_path):
    a, b = pair
    refused(
        capsys,
        ["merge", a, b, "--out", tmp_path / ("x" * 300), "--method", "cat"],
        "File name too long",
        record="--out name of 300 characters",
    )


# ------------------------------------------------------------------------ failures, signals, debris


def test_disk_full_during_the_abort_leaves_nothing(monkeypatch, pair, tmp_path):
    """The stream file's close flushes and fails again on a full disk: it is still removed."""
    a, b = pair
    real_open = open

    class FullDisk:
        def __init__(self, handle: Any) -> None:
            self.handle, self.writes = handle, 0

        def write(self, data: bytes) -> int:
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def close(self) -> None:
            self.handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name: str) -> Any:  # seek, flush, fileno: the real file's
            return getattr(self.handle, name)

    def opener(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and str(path).endswith(".safetensors") else handle

    monkeypatch.setattr(safetensors_stream, "open", opener, raising=False)
    for out in (tmp_path / "outs" / "peft", tmp_path / "outs2" / "new" / "d.safetensors"):
        inputs = [a, b] if out.suffix != ".safetensors" else [make_diffusers(tmp_path / "in" / "d.safetensors")]
        with pytest.raises(LoraLegoError, match="No space left on device"):
            loralego.merge_to_folder([loralego.load(p) for p in inputs], out, method="cat")
        assert not out.exists()
        assert not (tmp_path / "outs2" / "new").exists()  # created parents removed again
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_during_a_merge_cleans_up(capsys, monkeypatch, pair, tmp_path, signame):
    from loralego import pipeline

    a, b = pair
    out = tmp_path / "o"
    real = pipeline.merge_module
    calls = {"n": 0}

    def merge_then_signal(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), getattr(signal, signame))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "merge_module", merge_then_signal)
    previous = signal.getsignal(getattr(signal, signame))
    assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat"]) == 143
    assert signal.getsignal(getattr(signal, signame)) == previous  # the handler was restored
    assert capsys.readouterr().err.splitlines() == ["loralego: terminated; nothing was written"]
    assert not out.exists() and not temporaries(tmp_path)


def test_stale_temporaries_of_dead_processes_are_removed(capsys, pair, tmp_path):
    a, b = pair
    out = tmp_path / "outs" / "o"
    out.parent.mkdir()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = out.parent / f"{TMP_PREFIX}{dead}-0badf00d-o"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"half")
    (out.parent / f"{TMP_PREFIX}{os.getppid()}-0badf00d-o").mkdir()  # a living process's: kept
    assert main(["merge", str(a), str(b), "--out", str(out), "--method", "cat", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale}, left by an interrupted run (pid {dead})" in err
    assert not stale.exists()
    assert [p.name for p in temporaries(tmp_path)] == [f"{TMP_PREFIX}{os.getppid()}-0badf00d-o"]
