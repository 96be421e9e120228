"""Streaming merges: bounded memory (no tensor of an earlier module stays alive, no input stays mapped),
the progress line and summary of ``loralego merge``, and ``--device``."""

from __future__ import annotations

import io
import weakref
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import loralego
from loralego.cli import main
from loralego.options import make_options
from loralego.parallel import ordered_map
from loralego.pipeline import iter_merged, plan_merge
from loralego.progress import Progress


def _track_loads(adapters: list[loralego.Adapter]) -> dict[str, list[weakref.ref]]:
    """Wrap each adapter's loader to keep a weak reference to every tensor it returns, by module."""
    loaded: dict[str, list[weakref.ref]] = defaultdict(list)
    for adapter in adapters:
        inner = adapter.loader

        def tracked(module: str, inner=inner) -> tuple[torch.Tensor, torch.Tensor]:
            lora_a, lora_b = inner(module)
            loaded[module] += [weakref.ref(lora_a), weakref.ref(lora_b)]
            return lora_a, lora_b

        adapter.loader = tracked
    return loaded


@pytest.mark.parametrize(("method", "workers"), [("lego", 1), ("svd", 1), ("cat", 1), ("lego", 2)])
def test_iter_merged_keeps_no_tensor_of_an_earlier_module(mixed_adapters, method, workers):
    # Memory is bounded by one module's pool only if everything read or computed for a module is freed once
    # it is written: check with weak references (CPython frees on the last reference, no gc needed).
    adapters = [loralego.load(path) for path in mixed_adapters]
    loaded = _track_loads(adapters)
    results: dict[str, list[weakref.ref]] = {}

    def on_module(module: str, result, stored) -> None:
        results[module] = [weakref.ref(result.lora_a), weakref.ref(result.lora_b)]

    plan = plan_merge(adapters, make_options(None, method=method, rank=4))
    done: list[str] = []
    for module, lora_a, lora_b in iter_merged(plan, on_module, workers=workers):
        del lora_a, lora_b
        for earlier in done:
            alive = [ref for ref in loaded[earlier] + results[earlier] if ref() is not None]
            assert not alive, f"{len(alive)} tensors of {earlier} still alive while merging {module}"
        assert loaded[module], "the loader was not used"
        done.append(module)
    assert done == list(plan.modules) and len(done) > 2


def test_parallel_modules_give_the_same_bytes_in_order(mixed_adapters):
    adapters = [loralego.load(path) for path in mixed_adapters]
    plan = plan_merge(adapters, make_options(None, method="lego", rank=4))
    one = list(iter_merged(plan, workers=1))
    three = list(iter_merged(plan, workers=3))
    assert [m for m, _, _ in three] == list(plan.modules)
    for (_, a1, b1), (_, a3, b3) in zip(one, three, strict=True):
        assert torch.equal(a1, a3) and torch.equal(b1, b3)


def test_ordered_map_keeps_order_bounds_work_ahead_and_raises():
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 7:
            raise ValueError("item 7")
        return item * item

    results = ordered_map(work, range(10), workers=2)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    assert max(started) <= 4  # 3 taken, at most 2 more in progress
    with pytest.raises(ValueError, match="item 7"):
        list(results)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_inputs_are_not_left_memory_mapped(adapter_factory):
    # A long-lived mmap keeps every page read resident in the process: RSS would grow by all inputs' size.
    path = adapter_factory(dtype=torch.bfloat16)
    adapter = loralego.load(path)
    for module in adapter.modules:
        adapter.stored(module)
    file = str((path / "adapter_model.safetensors").resolve())
    assert file not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_read_back_exactly(adapter_factory, dtype):
    path = adapter_factory(dtype=dtype, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    adapter = loralego.load(path)
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        for module in adapter.modules:
            lora_a, lora_b = adapter.stored(module)
            key = f"base_model.model.{module}"
            assert torch.equal(lora_a, handle.get_tensor(f"{key}.lora_A.weight"))
            assert torch.equal(lora_b, handle.get_tensor(f"{key}.lora_B.weight"))
            assert lora_a.dtype == dtype


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal_and_clears_it():
    stream = _Terminal()
    progress = Progress(3, stream, delay=0.0, interval=0.0)
    for module in ("a.q_proj", "a.v_proj", "b.q_proj\x1b[2J"):
        progress(module)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r[") == 3 and "\n" not in text
    assert "3/3 modules" in text and "MB peak" in text
    assert "\x1b[2J" not in text  # a module name from a file cannot drive the terminal
    assert text.endswith("\r\x1b[K")


def test_progress_in_a_log_prints_plain_lines_only_for_long_merges():
    quick = io.StringIO()
    progress = Progress(2, quick)  # not a terminal: a line only every 30 s
    progress("m1")
    progress("m2")
    progress.close()
    assert quick.getvalue() == ""
    slow = io.StringIO()
    progress = Progress(2, slow, log_interval=0.0)
    progress("m1")
    progress("m2")
    progress.close()
    assert slow.getvalue().splitlines()[-1].startswith("[" + "#" * 30 + "] 2/2 modules")


def test_merge_prints_summary_and_quiet_prints_nothing(mixed_adapters, tmp_path, capsys):
    inputs = [str(path) for path in mixed_adapters]
    assert main(["merge", *inputs, "--out", str(tmp_path / "out"), "--rank", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # a short merge in a log: no progress lines
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("merged 3 adapters with lego+ (rank 4)")  # lego+ is the default method
    assert "modules in" in summary and "peak memory" in summary and summary.endswith(" MB")
    assert main(["merge", *inputs, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "quiet" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(mixed_adapters, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", *map(str, mixed_adapters), "--out", str(out), "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "loralego: error: --device cuda: no CUDA device is available\n"
    assert not out.exists()


def test_device_cpu_equals_auto_without_cuda(mixed_adapters):
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    adapters = [loralego.load(path) for path in mixed_adapters]
    on_cpu = loralego.merge(adapters, method="lego", rank=4, device="cpu")
    auto = loralego.merge(adapters, method="lego", rank=4)
    for module in on_cpu.modules:
        assert all(torch.equal(x, y) for x, y in zip(on_cpu.stored(module), auto.stored(module), strict=True))
