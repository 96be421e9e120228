"""A seeded mutation fuzzer for adapter folders, shared by tests/test_fuzz.py and bench/fuzz_report.py.

Each case copies real PEFT adapter folders (made by the test fixtures' ``make_peft_adapter``), corrupts one
of them with one or more mutations (config keys removed, retyped or set to garbage; header bytes flipped;
the header length field changed; the file truncated; tensor bytes overwritten with NaN/Inf/huge patterns;
shapes, dtypes, offsets and names edited in the header; legacy ``.bin`` bytes corrupted), then merges it
into a fresh output folder through the API or the CLI. Every case must end in one of two outcomes:

- ``merged``: the output folder loads with ``loralego.load``, holds the inputs' modules with finite factors
  and, for the exact ``cat`` method in float32, equals the sum of the inputs' updates;
- ``refused``: a ``LoraLegoError`` (CLI: exit 2 and exactly one ``loralego: error:`` line);

and in both: the inputs are byte-identical with unchanged mtimes, and nothing but ``out`` is left beside
the output (no temporary folders). Anything else is a failure outcome: ``crash`` (another exception, or an
internal error on the CLI), ``hang`` (the per-case alarm fired), ``partial`` (output or temp files left by
a refusal), ``modified-input``, ``bad-output`` or ``cli-format``.

Cases are independent and reproducible: case ``i`` of seed ``s`` draws from ``random.Random(f"{s}:{i}")``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BIN = "adapter_model.bin"

GOOD_OUTCOMES = ("merged", "refused")


# ----------------------------------------------------------------------------------------------- seed adapters


def make_seed_adapters(root: Path) -> Path:
    """The uncorrupted adapters every case starts from (PEFT-made, tiny Llama; about a second each)."""
    import warnings

    from conftest import make_peft_adapter
    from safetensors.torch import load_file

    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_peft_adapter(root / "a", r=4, alpha=8, seed=1)
        make_peft_adapter(root / "b", r=8, alpha=16, seed=2, targets=("q_proj", "k_proj", "v_proj"))
        make_peft_adapter(root / "h", r=4, alpha=4, seed=3, dtype=torch.float16)
        make_peft_adapter(root / "p", r=8, alpha=8, seed=4, rank_pattern={"v_proj": 2}, use_rslora=True)
    shutil.copytree(root / "a", root / "a_bin")
    (root / "a_bin" / WEIGHTS).unlink()
    torch.save(load_file(str(root / "a" / WEIGHTS)), root / "a_bin" / BIN)
    # Single-file formats, converted by hand from the PEFT files (not by the library under test).
    for source, target in (("a", "d"), ("b", "db")):  # diffusers style: the bare PEFT state dict
        (root / target).mkdir()
        shutil.copy(root / source / WEIGHTS, root / target / SINGLE_FILE)
    for source, target in (("a", "k"), ("b", "kb")):  # kohya: lora_down / lora_up / alpha
        _to_kohya(root / source, root / target / SINGLE_FILE)
    return root


def _to_kohya(folder: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    alpha = float(json.loads((folder / CONFIG).read_text())["lora_alpha"])
    tensors: dict[str, torch.Tensor] = {}
    for key, value in load_file(str(folder / WEIGHTS)).items():
        module, which = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        name = "lora_te_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight" if which.startswith("A") else f"{name}.lora_up.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    target.parent.mkdir(parents=True)
    save_file(tensors, str(target))


SINGLE_FILE = "lora.safetensors"
# victim: the partners it may be merged with (same format; None: merged alone)
VICTIMS = {
    "a": (None, "a", "b"),
    "b": (None, "a", "b"),
    "h": (None, "a", "b"),
    "p": (None, "a", "b"),
    "a_bin": (None, "a", "b"),
    "d": (None, "db"),
    "k": (None, "kb"),
}


# --------------------------------------------------------------------------------------------------- mutations


def _header(raw: bytes) -> tuple[int, dict[str, Any]]:
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8 : 8 + length])


def _with_header(raw: bytes, header: dict[str, Any]) -> bytes:
    length = struct.unpack("<Q", raw[:8])[0]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :]


def _weights(folder: Path) -> Path:
    for name in (WEIGHTS, BIN, SINGLE_FILE):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(folder)


_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "target_modules",
    "base_model_name_or_path",
    "peft_type",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "task_type",
)


def _garbage_value(rng: random.Random) -> Any:
    pool: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1,
        2,
        3,
        4,
        7,
        8,
        16,
        2**64,
        -(2**40),
        0.5,
        1.5,
        4.0,
        1e308,
        float("nan"),
        float("inf"),
        -float("inf"),
        "",
        "x",
        "LORA",
        "none",
        "all",
        "q_proj",
        "\n\x1b[2J",
        [],
        [1, 2],
        ["q_proj"],
        ["q_proj", 5],
        {},
        {"q_proj": 2},
        {"v_proj": 0},
        {"(": 1},
        {"q_proj": "x"},
        {"nested": {"deep": [1]}},
    ]
    return rng.choice(pool)


def mutate_config_remove(rng: random.Random, folder: Path) -> str:
    config = json.loads((folder / CONFIG).read_text())
    key = rng.choice([k for k in _CONFIG_KEYS if k in config] or list(config))
    config.pop(key, None)
    (folder / CONFIG).write_text(json.dumps(config))
    return f"config: removed {key}"


def mutate_config_retype(rng: random.Random, folder: Path) -> str:
    config = json.loads((folder / CONFIG).read_text())
    key = rng.choice(_CONFIG_KEYS) if rng.random() < 0.85 else rng.choice(list(config))
    value = _garbage_value(rng)
    config[key] = value
    (folder / CONFIG).write_text(json.dumps(config))  # json writes NaN/Infinity, as Python's reader accepts
    return f"config: {key} = {value!r}"[:80]


def mutate_config_bytes(rng: random.Random, folder: Path) -> str:
    path = folder / CONFIG
    raw = bytearray(path.read_bytes())
    choice = rng.randrange(4)
    if choice == 0:
        cut = rng.randrange(len(raw) + 1)
        path.write_bytes(bytes(raw[:cut]))
        return f"config bytes: truncated at {cut}"
    if choice == 1:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        return "config bytes: random bytes"
    if choice == 2:
        path.write_bytes(rng.randbytes(rng.randint(0, 64)))
        return "config bytes: replaced by garbage"
    path.write_text(rng.choice(["[]", "null", "4", '"r"', "{}", "[" * 5000 + "]" * 5000]))
    return "config bytes: not an object"


def mutate_header_bytes(rng: random.Random, folder: Path) -> str:
    path = _weights(folder)
    raw = bytearray(path.read_bytes())
    if path.suffix == ".bin":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        return "bin: flipped bits"
    length = struct.unpack("<Q", raw[:8])[0]
    for _ in range(rng.randint(1, 4)):
        raw[8 + rng.randrange(length)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return "header: flipped bits"


def mutate_header_length(rng: random.Random, folder: Path) -> str:
    path = _weights(folder)
    raw = path.read_bytes()
    if path.suffix == ".bin":
        path.write_bytes(raw + rng.randbytes(rng.randint(1, 64)))
        return "bin: appended garbage"
    length = struct.unpack("<Q", raw[:8])[0]
    new = rng.choice(
        [0, 1, 7, length - 8, length - 1, length + 1, length + 8, len(raw), len(raw) - 8, 2**63, 2**64 - 1]
    )
    new = min(max(new, 0), 2**64 - 1)
    path.write_bytes(struct.pack("<Q", new) + raw[8:])
    return f"header length: {length} -> {new}"


def mutate_truncate(rng: random.Random, folder: Path) -> str:
    path = _weights(folder)
    raw = path.read_bytes()
    cut = rng.choice([rng.randrange(len(raw)), rng.randrange(min(len(raw), 64)), len(raw) - rng.randint(1, 16)])
    path.write_bytes(raw[: max(cut, 0)])
    return f"{path.suffix[1:]}: truncated at {max(cut, 0)} of {len(raw)}"


def _float_pattern(rng: random.Random, dtype: str) -> tuple[bytes, str]:
    value = rng.choice([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 0.0, 65504.0, 1e20])
    if dtype == "F16":
        with contextlib.suppress(OverflowError):
            return struct.pack("<e", value), repr(value)
        return struct.pack("<e", float("inf")), "inf(f16)"
    if dtype == "BF16":
        return struct.pack("<f", value)[2:], repr(value)
    if dtype == "F64":
        return struct.pack("<d", value), repr(value)
    return struct.pack("<f", value), repr(value)


def mutate_tensor_values(rng: random.Random, folder: Path) -> str:
    path = _weights(folder)
    if path.suffix == ".bin":
        state = torch.load(path, weights_only=True)
        key = rng.choice(sorted(state))
        flat = state[key].view(-1)
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 3e38, 0.0])
        flat[rng.randrange(flat.numel())] = value
        torch.save(state, path)
        return f"bin: {value!r} in a tensor"
    raw = bytearray(path.read_bytes())
    length, header = _header(bytes(raw))
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    start, end = entry["data_offsets"]
    base = 8 + length + start
    if rng.random() < 0.2:  # the whole tensor
        pattern, name = _float_pattern(rng, entry["dtype"])
        count = (end - start) // len(pattern)
        raw[base : base + count * len(pattern)] = pattern * count
        path.write_bytes(bytes(raw))
        return f"tensor: all {name}"
    if rng.random() < 0.2:  # random bytes
        size = min(end - start, rng.randint(1, 32))
        offset = rng.randrange(end - start - size + 1)
        raw[base + offset : base + offset + size] = rng.randbytes(size)
        path.write_bytes(bytes(raw))
        return "tensor: random bytes"
    pattern, name = _float_pattern(rng, entry["dtype"])
    slots = (end - start) // len(pattern)
    for _ in range(rng.randint(1, 3)):
        offset = base + rng.randrange(slots) * len(pattern)
        raw[offset : offset + len(pattern)] = pattern
    path.write_bytes(bytes(raw))
    return f"tensor: {name} entries"


def mutate_header_fields(rng: random.Random, folder: Path) -> str:
    path = _weights(folder)
    if path.suffix == ".bin":
        return mutate_truncate(rng, folder)
    raw = path.read_bytes()
    _, header = _header(raw)
    choice = rng.randrange(9)
    # Shape edits (choices 0-3) need a factor; other edits may hit any entry (kohya alphas are 0-d).
    key = rng.choice(sorted(k for k in header if k != "__metadata__" and (choice > 3 or len(header[k]["shape"]) == 2)))
    entry = header[key]
    shape = list(entry["shape"])
    if choice == 0:
        entry["shape"] = shape[::-1]
        what = "shape reversed"
    elif choice == 1:
        axis = rng.randrange(len(shape))
        shape[axis] = max(0, shape[axis] + rng.choice([-3, -1, 1, 2, 8]))
        entry["shape"] = shape
        what = "shape dim changed"
    elif choice == 2:
        entry["shape"] = rng.choice([[*shape, 1], shape[:1], [], [shape[0] * shape[1]], [0, shape[1]], [1, 1, *shape]])
        what = "shape rank changed"
    elif choice == 3:  # the same bytes read as another factorisation: rank disagreements
        entry["shape"] = [shape[0] * 2, shape[1] // 2] if shape[1] % 2 == 0 else [shape[1], shape[0]]
        what = "shape refactored"
    elif choice == 4:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX", 5])
        what = f"dtype {entry['dtype']}"
    elif choice == 5:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[start, end + 4], [start + 4, end], [end, start], [0, 0], [-1, end]])
        what = "offsets changed"
    elif choice == 6:
        del header[key]
        what = "tensor entry removed"
    elif choice == 7:
        header["__metadata__"] = rng.choice([{"format": 5}, {"x": "y"}, [], {"format": "pt" * 1000}, None])
        what = "metadata changed"
    else:
        replacement = rng.choice(
            [
                key.replace("lora_A", "lora_B"),
                key.replace("lora_B", "lora_A"),
                key.replace("lora_A", "lora_E"),
                key.replace(".weight", ""),
                key.replace(".weight", ".bias"),
                key.replace("lora_A", "lora_magnitude_vector"),
                key.replace("lora_A", "hada_w1_a"),
                key.replace("q_proj", "q_proj\n\x1b[31m"),
                key.replace("base_model.model.", ""),
                "lora_A.weight",
                "",
            ]
        )
        header[replacement] = header.pop(key)
        what = "tensor renamed"
    path.write_bytes(_with_header(raw, header))
    return f"header: {what}"


MUTATIONS: dict[str, Callable[[random.Random, Path], str]] = {
    "config-remove-key": mutate_config_remove,
    "config-retype": mutate_config_retype,
    "config-bytes": mutate_config_bytes,
    "header-bytes": mutate_header_bytes,
    "header-length": mutate_header_length,
    "truncate": mutate_truncate,
    "tensor-values": mutate_tensor_values,
    "header-fields": mutate_header_fields,
}


# ------------------------------------------------------------------------------------------------- running


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the library swallows it."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    state = {}
    for path in [root, *sorted(root.rglob("*"))]:
        state[str(path)] = (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
    return state


@dataclass
class CaseResult:
    index: int
    kind: str
    victim: str
    mutations: list[str]
    method: str
    rank: int | None
    via_cli: bool
    outcome: str
    detail: str = ""


def _check_output(out: Path, inputs: list[Path], method: str) -> str:
    """'' if the merged folder is right, else what is wrong with it."""
    from helpers import dense_updates, summed_updates

    import loralego

    merged = loralego.load(out)
    sources = [loralego.load(path) for path in inputs]
    expected_modules = sorted({m for a in sources for m in a.modules})
    if sorted(merged.modules) != expected_modules:
        return "modules differ from the inputs'"
    for module in merged.modules:
        lora_a, lora_b = merged.stored(module)  # the loader refuses NaN/Inf
        if not (bool(torch.isfinite(lora_a).all()) and bool(torch.isfinite(lora_b).all())):
            return f"{module}: non-finite factors"
    if method == "cat" and merged.dtype == torch.float32:
        got, want = dense_updates(merged), summed_updates(sources)
        for module, update in want.items():
            if not torch.allclose(got[module], update, rtol=1e-4, atol=1e-5 * (1 + float(update.abs().max()))):
                return f"{module}: cat output is not the sum of the inputs"
    return ""


def run_case(
    index: int,
    seed: int,
    seeds: Path,
    work: Path,
    *,
    cli_every: int = 4,
    timeout: float = 30.0,
    methods: list[str] | None = None,
) -> CaseResult:
    """Corrupt, merge, classify one case; its folder is removed afterwards."""
    import loralego
    from loralego.cli import main

    rng = random.Random(f"{seed}:{index}")
    case = work / f"case{index}"
    inputs_dir = case / "in"
    victim = inputs_dir / "victim"
    victim_name = rng.choice(sorted(VICTIMS))
    shutil.copytree(seeds / victim_name, victim)
    inputs = [victim]
    partner = rng.choice(VICTIMS[victim_name])
    if partner is not None:
        shutil.copytree(seeds / partner, inputs_dir / "partner")
        inputs.insert(rng.randrange(2), inputs_dir / "partner")
    single_file = (victim / SINGLE_FILE).exists()
    if single_file:  # a single-file adapter is passed as the file itself
        inputs = [path / SINGLE_FILE for path in inputs]
    applicable = sorted(kind for kind in MUTATIONS if not (single_file and kind.startswith("config")))
    count = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    kinds = [rng.choice(applicable) for _ in range(count)]
    mutations = []
    for mutation in kinds:
        try:
            mutations.append(MUTATIONS[mutation](rng, victim))
        except Exception:  # an earlier mutation left nothing this one can parse: keep the earlier damage
            mutations.append(f"{mutation}: not applicable")
    kind = kinds[0] if count == 1 else "multiple"

    all_methods = methods or sorted(loralego.METHODS)
    method = rng.choice(all_methods)
    rank = rng.choice([None, None, 1, 4, 16])
    via_cli = cli_every > 0 and index % cli_every == 0
    out = case / ("out.safetensors" if single_file else "out")
    before = _snapshot(inputs_dir)
    result = CaseResult(index, kind, victim_name, mutations, method, rank, via_cli, "crash")

    try:
        with _alarm(timeout):
            if via_cli:
                argv = ["merge", *map(str, inputs), "--out", str(out), "--method", method, "--quiet"]
                argv += ["--rank", str(rank)] if rank is not None else []
                stderr, stdout = io.StringIO(), io.StringIO()
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
                    code = main(argv)
                lines = stderr.getvalue().splitlines()
                if code == 0:
                    result.outcome = "merged"
                    if any(not line.startswith("loralego: warning: ") for line in lines):
                        result.outcome, result.detail = "cli-format", stderr.getvalue()[:300]
                elif code == 2 and len(lines) == 1 and lines[0].startswith("loralego: error: "):
                    result.outcome, result.detail = "refused", lines[0]
                else:
                    outcome = "crash" if code == 1 else "cli-format"
                    result.outcome, result.detail = outcome, f"exit {code}: {stderr.getvalue()[:300]!r}"
            else:
                try:
                    adapters = [loralego.load(path) for path in inputs]
                    loralego.merge_to_folder(adapters, out, method=method, rank=rank, command="fuzz")
                    result.outcome = "merged"
                except loralego.LoraLegoError as error:
                    message = str(error)
                    result.outcome = "refused" if "\n" not in message else "cli-format"
                    result.detail = message
    except _Timeout:
        result.outcome, result.detail = "hang", f"no result after {timeout} s"
    except Exception as error:  # the fuzz target: anything but LoraLegoError is a failure
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        result.outcome, result.detail = "crash", f"{type(error).__name__}: {error} at {where}"[:400]

    try:
        if result.outcome in GOOD_OUTCOMES:
            left = sorted(set(os.listdir(case)) - {"in", out.name})
            if left or (result.outcome == "refused" and out.exists()):
                result.outcome, result.detail = "partial", f"left behind: {left or ['out']}; {result.detail}"
            elif _snapshot(inputs_dir) != before:
                result.outcome = "modified-input"
            elif result.outcome == "merged":
                problem = _check_output(out, inputs, method)
                if problem:
                    result.outcome, result.detail = "bad-output", problem
    except Exception as error:
        result.outcome, result.detail = "bad-output", f"{type(error).__name__}: {error}"[:400]
    finally:
        shutil.rmtree(case, ignore_errors=True)
    return result


@dataclass
class FuzzReport:
    results: list[CaseResult] = field(default_factory=list)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results)

    def by_kind(self) -> dict[str, Counter[str]]:
        table: dict[str, Counter[str]] = {}
        for r in self.results:
            table.setdefault(r.kind, Counter())[r.outcome] += 1
        return dict(sorted(table.items()))

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.outcome not in GOOD_OUTCOMES]

    def table(self) -> str:
        names = sorted({r.outcome for r in self.results}, key=lambda o: (o not in GOOD_OUTCOMES, o))
        lines = [f"{'mutation':<20}" + "".join(f"{n:>10}" for n in names) + f"{'total':>8}"]
        for kind, counts in self.by_kind().items():
            lines.append(f"{kind:<20}" + "".join(f"{counts[n]:>10}" for n in names) + f"{sum(counts.values()):>8}")
        totals = self.outcomes
        lines.append(f"{'all':<20}" + "".join(f"{totals[n]:>10}" for n in names) + f"{len(self.results):>8}")
        return "\n".join(lines)


def run_fuzz(
    n_cases: int,
    seed: int,
    seeds: Path,
    work: Path,
    *,
    cli_every: int = 4,
    timeout: float = 30.0,
    methods: list[str] | None = None,
    progress: Callable[[CaseResult], None] | None = None,
) -> FuzzReport:
    """Run cases ``0 .. n_cases - 1``. torch runs single-threaded meanwhile: tiny merges are many times
    faster without thread start-up, and the numbers do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report = FuzzReport()
    try:
        for index in range(n_cases):
            result = run_case(index, seed, seeds, work, cli_every=cli_every, timeout=timeout, methods=methods)
            report.results.append(result)
            if progress is not None:
                progress(result)
    finally:
        torch.set_num_threads(threads)
    return report


def summary_line(report: FuzzReport) -> str:
    counts = report.outcomes
    parts = [f"{name} {counts[name]}" for name in sorted(counts, key=lambda o: (o not in GOOD_OUTCOMES, o))]
    return f"{len(report.results)} cases: " + ", ".join(parts)


__all__ = ["MUTATIONS", "CaseResult", "FuzzReport", "make_seed_adapters", "run_case", "run_fuzz", "summary_line"]
