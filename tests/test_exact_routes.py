"""The cheaper exact routes (issue 16): thin SVD from Gram matrices, k-means from factor Gram matrices."""

from __future__ import annotations

import pytest
import torch

from loralego import lowrank


def _best_rank_k(lora_a: torch.Tensor, lora_b: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(lora_b.double() @ lora_a.double(), full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def test_gram_route_matches_qr_route_and_dense_svd() -> None:
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(24, 70, generator=generator)
    lora_b = torch.randn(90, 24, generator=generator) * 0.01
    assert lowrank._gram_split(lora_a, lora_b) is not None  # well conditioned: the Gram route is taken
    gram = torch.linalg.svdvals(lowrank._gram_split(lora_a, lora_b).core)
    qr = torch.linalg.svdvals(lowrank._qr_split(lora_a, lora_b).core)
    assert torch.allclose(gram, qr, rtol=1e-10, atol=0.0)
    u, s, vh = lowrank.thin_svd(lora_a, lora_b, 6)
    assert u.shape == (90, 6) and vh.shape == (6, 70) and s.shape == (24,)
    assert torch.allclose(u.T @ u, torch.eye(6), atol=1e-5)
    assert torch.allclose(vh @ vh.T, torch.eye(6), atol=1e-5)
    best = _best_rank_k(lora_a, lora_b, 6)
    assert float((u.double() * s[:6].double() @ vh.double() - best).norm() / best.norm()) < 1e-6


def test_singular_stacks_fall_back_to_qr_and_stay_exact() -> None:
    generator = torch.Generator().manual_seed(1)
    half = torch.randn(5, 40, generator=generator)
    lora_a = torch.cat([half, half])  # the same adapter twice: a singular Gram matrix
    lora_b = torch.randn(30, 10, generator=generator)
    assert lowrank._gram_split(lora_a, lora_b) is None
    new_a, new_b = lowrank.truncate(lora_a, lora_b, 3)
    best = _best_rank_k(lora_a, lora_b, 3)
    assert float((new_b.double() @ new_a.double() - best).norm() / best.norm()) < 1e-6
    zero_b = torch.zeros(30, 10)  # a zero update: QR route, zero result
    assert lowrank._gram_split(lora_a, zero_b) is None
    assert float(torch.stack([t.abs().max() for t in lowrank.truncate(lora_a, zero_b, 2)]).max()) == 0.0


def _stream(path, names, count: int = 40):
    from loralego.adapters.safetensors_stream import SafetensorsStreamWriter

    generator = torch.Generator().manual_seed(2)
    tensors = {f"model.layers.{i}.proj.lora_A.weight": torch.randn(3, 5 + i, generator=generator) for i in range(count)}
    tensors["scalar.alpha"] = torch.tensor(4.0)
    with SafetensorsStreamWriter(path, {"format": "pt", "k": "v" * 100}, names) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor.bfloat16() if name.endswith("3.proj.lora_A.weight") else tensor)
    return tensors, writer


def test_stream_writer_writes_each_byte_once_and_loads(tmp_path) -> None:
    from safetensors import safe_open

    path = tmp_path / "out.safetensors"
    names = [f"model.layers.{i}.proj.lora_A.weight" for i in range(40)] + ["scalar.alpha"]
    tensors, writer = _stream(path, list(reversed(names)))
    assert writer.bytes_written == path.stat().st_size  # nothing written twice
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "k": "v" * 100}
        for name, tensor in tensors.items():
            assert torch.equal(
                handle.get_tensor(name).float(),
                tensor.bfloat16().float() if "3.proj" in name and name.endswith("3.proj.lora_A.weight") else tensor,
            )
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_stream_writer_header_past_its_guess_moves_the_data(tmp_path, monkeypatch) -> None:
    from safetensors import safe_open

    from loralego.adapters import safetensors_stream

    monkeypatch.setattr(safetensors_stream, "_GUESS", 16)
    monkeypatch.setattr(safetensors_stream, "_MOVE_CHUNK", 64)  # several chunks, moved last first
    path = tmp_path / "out.safetensors"
    tensors, writer = _stream(path, None)
    assert writer.bytes_written > path.stat().st_size  # the data was moved once
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(
            handle.get_tensor("model.layers.39.proj.lora_A.weight"), tensors["model.layers.39.proj.lora_A.weight"]
        )
        assert float(handle.get_tensor("scalar.alpha")) == 4.0


def test_output_file_bytes_do_not_depend_on_the_worker_count(mixed_adapters, tmp_path) -> None:
    import loralego
    from loralego.pipeline import merge_to_folder

    adapters = [loralego.load(path) for path in mixed_adapters]
    previous = torch.get_num_threads()
    written = {}
    try:
        for workers in (1, 2, 3):
            torch.set_num_threads(workers)  # the default worker count (reader thread included)
            for method in ("lego+", "svd"):
                out = tmp_path / f"{method}-{workers}"
                merge_to_folder(adapters, out, method=method, rank=4, command="test")
                written[method, workers] = (out / "adapter_model.safetensors").read_bytes()
    finally:
        torch.set_num_threads(previous)
    for method in ("lego+", "svd"):
        assert written[method, 1] == written[method, 2] == written[method, 3]


def test_prefetch_reads_ahead_boundedly_and_raises_in_order() -> None:
    from loralego.parallel import prefetch

    produced: list[int] = []

    def items():
        for i in range(10):
            if i == 6:
                raise ValueError("item 6")
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    import time

    time.sleep(0.2)
    assert max(produced) <= 3  # 1 taken, 2 queued, 1 waiting to be queued
    assert [next(stream) for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="item 6"):
        next(stream)
    early = prefetch(iter(range(100)), depth=1)
    assert next(early) == 0
    early.close()  # a consumer that stops early stops the producer
