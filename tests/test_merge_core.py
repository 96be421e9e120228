"""LoRA-LEGO and the exact methods on real PEFT adapter folders (tiny Llama, mixed ranks, alpha != r)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from helpers import assert_updates_close, dense_updates, summed_updates
from safetensors import safe_open

import loralego
from loralego.cli import main
from loralego.diagnostics import verify
from loralego.lowrank import rank_for_energy
from loralego.msu import concat


def _load_all(paths: list[Path]) -> list[loralego.Adapter]:
    return [loralego.load(path) for path in paths]


def test_load_reads_ranks_scales_and_patterns(adapter_factory):
    path = adapter_factory(
        r=8, alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2}, targets=("q_proj", "v_proj")
    )
    adapter = loralego.load(path)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert adapter.modules[q].rank == 4 and adapter.scale(q) == pytest.approx(2 / 4)
    assert adapter.modules[v].rank == 8 and adapter.scale(v) == pytest.approx(16 / 8)
    rs = loralego.load(adapter_factory(r=16, alpha=12, use_rslora=True))
    assert rs.scale(v) == pytest.approx(12 / 4)


def test_cat_equals_exact_sum_with_mixed_ranks(mixed_adapters):
    adapters = _load_all(mixed_adapters)
    merged = loralego.merge(adapters, method="cat")
    assert_updates_close(dense_updates(merged), summed_updates(adapters))
    # Modules present in only one adapter (k_proj, o_proj) keep that adapter's update alone.
    assert merged.modules["model.layers.1.self_attn.k_proj"].rank == 8
    assert merged.modules["model.layers.1.self_attn.q_proj"].rank == 28


@pytest.mark.parametrize("k", [28, 40])
def test_lego_with_k_at_least_pool_and_no_reweighting_is_exact(mixed_adapters, k):
    adapters = _load_all(mixed_adapters)
    merged = loralego.merge(adapters, method="lego", rank=k, param_reweight=False, output_reweight=False)
    assert_updates_close(dense_updates(merged), summed_updates(adapters))


def test_lego_weights_scale_the_sum(mixed_adapters):
    adapters = _load_all(mixed_adapters)
    weights = [0.5, -1.0, 2.0]
    merged = loralego.merge(
        adapters, method="lego", rank=64, weights=weights, param_reweight=False, output_reweight=False
    )
    assert_updates_close(dense_updates(merged), summed_updates(adapters, weights))


def test_permuting_input_ranks_leaves_exact_merge_unchanged(adapter_factory, tmp_path):
    path = adapter_factory(r=8, alpha=3, seed=5)
    adapter = loralego.load(path)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    permuted = {}
    for module in adapter.modules:
        lora_a, lora_b = adapter.stored(module)
        permuted[module] = (lora_a[perm].clone(), lora_b[:, perm].clone())
    from loralego.adapters import memory_adapter

    shuffled = memory_adapter("perm", permuted, config=adapter.config, dtype=adapter.dtype)
    shuffled.use_rslora = adapter.use_rslora
    shuffled.modules = {
        m: info.__class__(m, 8, 3.0, info.a_shape, info.b_shape) for m, info in shuffled.modules.items()
    }
    assert_updates_close(dense_updates(shuffled), dense_updates(adapter))
    for method in ("cat", "svd"):
        torch.testing.assert_close(
            dense_updates(loralego.merge([shuffled], method=method))["model.layers.0.self_attn.q_proj"],
            dense_updates(loralego.merge([adapter], method=method))["model.layers.0.self_attn.q_proj"],
            rtol=1e-4,
            atol=1e-5,
        )


def test_single_adapter_at_k_equal_r_round_trips_with_default_reweighting(adapter_factory):
    adapter = loralego.load(adapter_factory(r=8, alpha=20, seed=9))
    merged = loralego.merge([adapter], method="lego", rank=8)
    assert_updates_close(dense_updates(merged), dense_updates(adapter))
    module = next(iter(adapter.modules))
    # Same units, same order: the factors themselves come back (folded to scale 1).
    folded_a, folded_b = adapter.folded(module)
    merged_a, merged_b = merged.factors(module)
    torch.testing.assert_close(merged_a, folded_a)
    torch.testing.assert_close(merged_b, folded_b)


def test_lego_prunes_a_single_adapter(adapter_factory):
    adapter = loralego.load(adapter_factory(r=16, alpha=8, seed=4))
    merged = loralego.merge([adapter], method="lego", rank=4)
    assert {info.rank for info in merged.modules.values()} == {4}
    assert merged.config["r"] == 4 and merged.config["lora_alpha"] == 4


def test_lego_clusters_duplicated_units_exactly(adapter_factory):
    # Two identical adapters: with k = r, each cluster should hold the two copies of one unit, so the mean
    # is that unit and (without output reweighting) the merge is one copy: half the exact sum.
    path = adapter_factory(r=4, alpha=8, seed=11)
    adapters = [loralego.load(path, name="a"), loralego.load(path, name="b")]
    merged = loralego.merge(adapters, method="lego", rank=4, output_reweight=False, n_init=8)
    assert_updates_close(dense_updates(merged), dense_updates(adapters[0]), rtol=1e-4, atol=1e-5)


def test_output_reweighting_scales_by_sqrt_rref_over_k(adapter_factory):
    adapter = loralego.load(adapter_factory(r=8, alpha=8, seed=2))
    plain = loralego.merge([adapter], method="lego", rank=8, output_reweight=False)
    doubled = loralego.merge([adapter], method="lego", rank=8, r_ref=32)
    module = next(iter(adapter.modules))
    torch.testing.assert_close(dense_updates(doubled)[module], 2.0 * dense_updates(plain)[module])


def test_parameter_reweighting_restores_member_norms(adapter_factory):
    adapter = loralego.load(adapter_factory(r=16, alpha=16, seed=3))
    for norm in ("inf", "2"):
        merged = loralego.merge([adapter], method="lego", rank=3, output_reweight=False, norm=norm)
        module = next(iter(adapter.modules))
        units = torch.cat([merged.factors(module)[0], merged.factors(module)[1].T], dim=1)
        source = torch.cat([adapter.folded(module)[0], adapter.folded(module)[1].T], dim=1)
        norms = units.abs().amax(1) if norm == "inf" else units.norm(dim=1)
        source_norms = source.abs().amax(1) if norm == "inf" else source.norm(dim=1)
        # Each centroid is scaled to its members' mean norm, so all lie within the source units' range.
        assert float(norms.min()) >= float(source_norms.min()) - 1e-5
        assert float(norms.max()) <= float(source_norms.max()) + 1e-5


def _forward_with_dense_updates(updates: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = tiny_llama()
    with torch.no_grad():
        for module, update in updates.items():
            model.get_submodule(module).weight += update.float()
        return model(ids).logits


def test_merged_adapter_loads_in_peft_and_forward_matches(mixed_adapters, tmp_path):
    from peft import PeftModel

    adapters = _load_all(mixed_adapters)
    out = tmp_path / "merged"
    loralego.merge_to_folder(adapters, out, method="lego", rank=12, seed=3)
    merged = loralego.load(out)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        logits = peft_model(ids).logits
    expected = _forward_with_dense_updates(dense_updates(merged), ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    base_logits = tiny_llama()(ids).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter does something
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama-for-tests"
    # k_proj/o_proj come from the rank-8 adapter only: a pool of 8 < 12 units, recorded in rank_pattern.
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    assert config["alpha_pattern"]["model.layers.0.self_attn.k_proj"] == 8


def test_exact_merge_forward_in_peft_equals_sum_of_inputs(mixed_adapters, tmp_path):
    from peft import PeftModel

    adapters = _load_all(mixed_adapters)
    out = tmp_path / "cat"
    loralego.merge_to_folder(adapters, out, method="cat")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        logits = peft_model(ids).logits
    torch.testing.assert_close(logits, _forward_with_dense_updates(summed_updates(adapters), ids), rtol=1e-4, atol=1e-4)


def test_dora_adapter_is_refused(adapter_factory):
    path = adapter_factory(r=4, alpha=8, use_dora=True)
    with pytest.raises(loralego.LoraLegoError, match="DoRA"):
        loralego.load(path)


def test_output_bytes_are_deterministic_and_provenance_recorded(mixed_adapters, tmp_path):
    adapters = _load_all(mixed_adapters)
    out = tmp_path / "out"
    loralego.merge_to_folder(adapters, out, method="lego", rank=6, seed=1, command="loralego merge ...")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    loralego.merge_to_folder(
        _load_all(mixed_adapters), out, method="lego", rank=6, seed=1, force=True, command="loralego merge ..."
    )
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first == second
    assert sorted(first) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loralego.merge_to_folder(_load_all(mixed_adapters), tmp_path / "other", method="lego", rank=6, seed=2)
    assert (tmp_path / "other" / "adapter_model.safetensors").read_bytes() != first["adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["loralego.method"] == "lego"
    assert json.loads(metadata["loralego.options"])["seed"] == 1
    inputs = json.loads(metadata["loralego.inputs"])
    assert [i["name"] for i in inputs] == ["r4", "r8", "r16"] and all(len(i["sha256"]) == 64 for i in inputs)
    assert "loralego merge ..." in first["README.md"].decode()


def test_output_dtype_follows_inputs(adapter_factory):
    paths = [adapter_factory(r=4, alpha=8, seed=s, dtype=torch.bfloat16) for s in (1, 2)]
    merged = loralego.merge(_load_all(paths), method="lego", rank=4)
    assert merged.dtype == torch.bfloat16
    assert merged.stored(next(iter(merged.modules)))[0].dtype == torch.bfloat16


def test_different_base_models_refused_unless_forced(adapter_factory):
    paths = [adapter_factory(seed=1), adapter_factory(seed=2, base_name="other-model")]
    with pytest.raises(loralego.LoraLegoError, match="different base models"):
        loralego.merge(_load_all(paths))
    merged = loralego.merge(_load_all(paths), force=True)
    assert merged.modules


def test_linear_refuses_mixed_ranks_naming_alternatives(mixed_adapters):
    with pytest.raises(loralego.LoraLegoError, match="cat, svd or lego"):
        loralego.merge(_load_all(mixed_adapters), method="linear")


def test_existing_output_refused_without_force_and_left_intact(mixed_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(loralego.LoraLegoError, match="already exists"):
        loralego.merge_to_folder(_load_all(mixed_adapters), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_merge_and_inspect(mixed_adapters, tmp_path, capsys):
    out = tmp_path / "cli-out"
    flags = ["--method", "lego", "--rank", "8", "--seed", "2", "--norm", "2"]  # --norm is lego's parameter
    args = ["merge", *map(str, mixed_adapters), "--out", str(out), *flags]
    assert main(args) == 0
    assert "merged 3 adapters with lego (rank 8)" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "--rank 8 --seed 2 --norm 2" in card
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ranks" in printed and "tiny-llama-for-tests" in printed
    assert main(["merge", *map(str, mixed_adapters), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralego: error:") and len(err.strip().splitlines()) == 1


def test_inspect_escapes_control_characters_from_the_config(adapter_factory, capsys):
    path = adapter_factory(r=4, alpha=8, seed=5)
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "evil\x1b[2J\nmodel"
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "evil\\x1b[2J\\nmodel" in printed


def test_rank_for_energy_on_a_known_spectrum():
    # Singular values 4, 2, 1: energies 16, 4, 1 of 21.
    q_out, _ = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(0)))
    q_in, _ = torch.linalg.qr(torch.randn(9, 3, generator=torch.Generator().manual_seed(1)))
    lora_a, lora_b = (torch.diag(torch.tensor([4.0, 2.0, 1.0])) @ q_in.T), q_out
    assert [rank_for_energy(lora_a, lora_b, e) for e in (0.5, 16 / 21, 0.8, 0.96, 1.0)] == [1, 1, 2, 3, 3]
    assert rank_for_energy(torch.zeros(3, 9), torch.zeros(7, 3), 0.9) == 1


def test_energy_picks_each_module_rank_and_loads_in_peft(mixed_adapters, tmp_path):
    from peft import PeftModel

    adapters = _load_all(mixed_adapters)
    out = tmp_path / "energy"
    loralego.merge_to_folder(adapters, out, method="svd", energy=0.9)
    merged = loralego.load(out)
    report = verify(merged, adapters)
    for check in report.modules:
        factors = concat([a.folded(check.module) for a in adapters if check.module in a.modules])
        assert merged.modules[check.module].rank == rank_for_energy(*factors, 0.9)
        assert check.energy_kept >= 0.9 - 1e-6
    assert len({info.rank for info in merged.modules.values()}) > 1  # the ranks differ by module
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        logits = peft_model(ids).logits
    torch.testing.assert_close(logits, _forward_with_dense_updates(dense_updates(merged), ids), rtol=1e-4, atol=1e-4)
    # --rank caps the automatic rank; methods without a rank refuse --energy.
    capped = loralego.merge(adapters, method="lego+", energy=0.99, rank=3)
    assert max(info.rank for info in capped.modules.values()) <= 3
    with pytest.raises(loralego.LoraLegoError, match="energy"):
        loralego.merge(adapters, method="cat", energy=0.9)
    # --space factors keeps the input rank: an energy target that asks for another rank is refused, not ignored.
    same_rank = [loralego.load(path) for path in mixed_adapters[:1]] * 2
    with pytest.raises(loralego.LoraLegoError, match="keeps the input rank"):
        loralego.merge(same_rank, method="ties", space="factors", energy=0.5)
