"""Thin-factor SVD against a dense SVD, and ``verify`` (API and CLI) against dense computations, mixed ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_mixed_adapters
from helpers import dense_updates, summed_updates

import loralego
from loralego.adapters import memory_adapter
from loralego.cli import main
from loralego.diagnostics import difference_norm, verify
from loralego.lowrank import thin_svd
from loralego.msu import concat

WEIGHTS = [0.5, -1.0, 2.0]


@pytest.fixture(scope="module")
def mixed_adapters(tmp_path_factory) -> list[Path]:
    """conftest's mixed_adapters (ranks 4, 8, 16, alpha != r, rsLoRA, one on more modules), built once here."""
    return make_mixed_adapters(tmp_path_factory.mktemp("mixed"))


def _load(paths) -> list[loralego.Adapter]:
    return [loralego.load(p) for p in paths]


def dense_metrics(merged: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Relative error and energy kept from dense float64 matrices (modules absent from merged count as 0)."""
    out = {}
    for module, t in target.items():
        m = merged.get(module, torch.zeros_like(t))
        out[module] = {
            "relative_error": float((m - t).norm() / t.norm()),
            "energy_kept": float((m * t).sum() / t.norm() ** 2),
            "error_norm": float((m - t).norm()),
        }
    return out


def test_thin_svd_equals_dense_svd_of_the_summed_update(mixed_adapters):
    adapters = _load(mixed_adapters)
    target = summed_updates(adapters, WEIGHTS)
    merged = dense_updates(loralego.merge(adapters, method="svd", rank=5, weights=WEIGHTS))
    for module, dense in target.items():
        folded = [a.folded(module, w) for a, w in zip(adapters, WEIGHTS, strict=True) if module in a.modules]
        _, s, _ = thin_svd(*concat(folded))
        u_d, s_d, vh_d = torch.linalg.svd(dense, full_matrices=False)
        n = min(s.numel(), s_d.numel())
        torch.testing.assert_close(s[:n].double(), s_d[:n], rtol=1e-5, atol=1e-6, msg=module)
        best = u_d[:, :5] * s_d[:5] @ vh_d[:5]
        torch.testing.assert_close(merged[module], best, rtol=1e-4, atol=1e-5, msg=module)


@pytest.mark.parametrize("method", ["lego", "ties"])
def test_verify_agrees_with_dense_computation(method, mixed_adapters):
    adapters = _load(mixed_adapters)
    merged = loralego.merge(adapters, method=method, rank=6, weights=WEIGHTS)
    report = verify(merged, adapters, WEIGHTS)
    target = summed_updates(adapters, WEIGHTS)
    expected = dense_metrics(dense_updates(merged), target)
    assert [m.module for m in report.modules] == sorted(target, key=loralego.adapters.natural_key)
    for check in report.modules:
        reference = expected[check.module]
        assert check.relative_error == pytest.approx(reference["relative_error"], rel=1e-6, abs=1e-9)
        assert check.energy_kept == pytest.approx(reference["energy_kept"], rel=1e-6, abs=1e-9)
        assert check.target_norm == pytest.approx(float(target[check.module].norm()), rel=1e-6)
    total_error = math.sqrt(sum(r["error_norm"] ** 2 for r in expected.values()))
    total_target = math.sqrt(sum(float(t.norm()) ** 2 for t in target.values()))
    assert report.relative_error == pytest.approx(total_error / total_target, rel=1e-6)
    inner = sum(float((dense_updates(merged)[m] * t).sum()) for m, t in target.items())
    assert report.energy_kept == pytest.approx(inner / total_target**2, rel=1e-6)


def test_cat_verifies_exact(mixed_adapters):
    adapters = _load(mixed_adapters)
    report = verify(loralego.merge(adapters, method="cat", weights=WEIGHTS), adapters, WEIGHTS)
    assert report.relative_error < 1e-6
    assert report.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert all(m.relative_error < 1e-6 for m in report.modules)


def test_rank_one_svd_has_the_eckart_young_error(adapter_factory):
    """An adapter with singular values 4, 2, 1 (orthonormal factors): the best rank-1 approximation misses
    sqrt(2^2 + 1^2) of ||(4, 2, 1)|| = sqrt(21), and keeps 16 / 21 of the energy."""
    config = loralego.load(adapter_factory(r=3, alpha=3)).config
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([4.0, 2.0, 1.0])
    tensors = {}
    for module, (d_out, d_in) in {"model.layers.0.self_attn.q_proj": (32, 32), "x.v_proj": (16, 32)}.items():
        q_b, _ = torch.linalg.qr(torch.randn(d_out, 3, generator=generator))
        q_a, _ = torch.linalg.qr(torch.randn(d_in, 3, generator=generator))
        tensors[module] = ((sigma[:, None] * q_a.T).contiguous(), q_b.contiguous())
    known = memory_adapter("known", tensors, config=config, dtype=torch.float32)
    report = verify(loralego.merge([known], method="svd", rank=1), [known])
    for check in report.modules:
        assert check.relative_error == pytest.approx(math.sqrt(5 / 21), rel=1e-5)
        assert check.energy_kept == pytest.approx(16 / 21, rel=1e-5)
        assert check.target_norm == pytest.approx(math.sqrt(21), rel=1e-5)


def test_difference_norm_is_exact_near_zero():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=generator), torch.randn(50, 6, generator=generator)
    assert difference_norm((a, b), (a, b)) < 1e-12 * float((b @ a).norm())
    scaled = (a * 2, b)
    assert difference_norm(scaled, (a, b)) == pytest.approx(float((b.double() @ a.double()).norm()), rel=1e-10)


def test_cli_verify_and_merge_verify_agree_with_api(mixed_adapters, tmp_path, capsys):
    inputs = [str(p) for p in mixed_adapters]
    out = tmp_path / "merged"
    weights = [str(w) for w in WEIGHTS]
    code = main(["merge", *inputs, "--out", str(out), "--method", "svd", "--rank", "4", "--weights", *weights])
    assert code == 0
    capsys.readouterr()
    assert main(["verify", str(out), *inputs, "--weights", *weights, "--json", str(tmp_path / "v.json")]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "v.json").read_text())
    report = verify(loralego.load(out), _load(mixed_adapters), WEIGHTS)
    assert data["total"]["relative_error"] == pytest.approx(report.relative_error, rel=1e-9)
    assert data["total"]["energy_kept"] == pytest.approx(report.energy_kept, rel=1e-9)
    assert len(data["modules"]) == len(report.modules) == 8
    assert f"relative error {report.relative_error:.4g}" in printed
    expected = dense_metrics(dense_updates(loralego.load(out)), summed_updates(_load(mixed_adapters), WEIGHTS))
    for entry in data["modules"]:
        assert entry["relative_error"] == pytest.approx(expected[entry["module"]]["relative_error"], rel=1e-6)

    code = main(["merge", *inputs, "--out", str(tmp_path / "m2"), "--method", "svd", "--rank", "4"])
    code += main(["merge", *inputs, "--out", str(tmp_path / "m3"), "--weights", *weights, "--verify", "--rank", "4"])
    assert code == 0
    assert "energy kept" in capsys.readouterr().out


def test_lost_modules_count_and_foreign_modules_are_refused(mixed_adapters, capsys):
    r4, r8, r16 = _load(mixed_adapters)
    partial = loralego.merge([r4, r16], method="cat")  # lacks r8's k_proj and o_proj
    report = verify(partial, [r4, r8, r16])
    lost = [m for m in report.modules if m.missing]
    assert {m.module.rsplit(".", 1)[-1] for m in lost} == {"k_proj", "o_proj"} and len(lost) == 4
    assert all(m.relative_error == 1.0 and m.energy_kept == 0.0 for m in lost)
    full = loralego.merge([r4, r8, r16], method="cat")
    with pytest.raises(loralego.LoraLegoError, match="is in the merged adapter but in no input"):
        verify(full, [r4])
    with pytest.raises(loralego.LoraLegoError, match="got 2 weights for 3 adapters"):
        verify(full, [r4, r8, r16], [1.0, 2.0])
    assert main(["verify", str(mixed_adapters[1]), str(mixed_adapters[0])]) == 2
    assert "in no input" in capsys.readouterr().err


def test_verify_defaults_to_the_weights_the_merge_recorded(mixed_adapters, tmp_path):
    # The merge records its weights: verify without --weights must compare with that average, not the plain sum.
    inputs = _load(mixed_adapters)
    loralego.merge(inputs, method="cat", weights=[1 / 3] * 3).save(tmp_path / "plus")
    merged = loralego.load(tmp_path / "plus")
    report = verify(merged, inputs)
    assert report.weights == pytest.approx([1 / 3] * 3)
    assert report.relative_error < 1e-5  # k >= pool: the average ensemble, exactly
    # Inputs the merge did not record (here: a subset) fall back to weight 1.
    assert verify(merged, inputs[:2]).weights == [1.0, 1.0]
