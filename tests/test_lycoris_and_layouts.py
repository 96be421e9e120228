"""LoCon lora_mid (exact), LoHa / LoKr (truncated SVD on request), DoRA and the old attention-processor
format (refused, saying what they are), diffusers' legacy .lora.down / lora_linear_layer names, Flux's
fused qkv <-> split q/k/v both ways, per-input weight overrides and vLLM's rank 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_updates_close, dense_updates
from safetensors import safe_open
from safetensors.torch import save_file

import loralego
from loralego.cli import main
from loralego.vllm import check_vllm_folder


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_locon_lora_mid_is_composed_exactly(tmp_path):
    """up (out x r x 1 x 1) . mid (r x r x 3 x 3) . down (r x in x 1 x 1): the convolutions' composition."""
    g = torch.Generator().manual_seed(0)
    down, mid, up = (
        torch.randn(3, 5, 1, 1, generator=g),
        torch.randn(3, 3, 3, 3, generator=g),
        torch.randn(7, 3, 1, 1, generator=g),
    )
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = _save(
        tmp_path / "tucker.safetensors",
        {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_mid.weight": mid,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(1.5),
        },
    )
    adapter = loralego.load(path)
    module = "unet.down_blocks.0.resnets.0.conv1"
    assert adapter.modules[module].a_shape == (3, 5, 3, 3)
    x = torch.randn(2, 5, 9, 9, generator=g).double()
    chained = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down.double()), mid.double(), padding=1), up.double()
    ) * (1.5 / 3)
    update = dense_updates(adapter)[module].reshape(7, 5, 3, 3)
    torch.testing.assert_close(
        torch.nn.functional.conv2d(x, update, padding=1), chained, rtol=1e-5, atol=1e-5
    )  # float32 composition
    out = tmp_path / "out.safetensors"
    loralego.merge_to_folder([adapter], out, method="cat")
    assert_updates_close(dense_updates(loralego.load(out)), dense_updates(adapter))


def _loha(tmp_path: Path, rank: int = 2) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w1a, w1b = torch.randn(12, rank, generator=g), torch.randn(rank, 10, generator=g)
    w2a, w2b = torch.randn(12, rank, generator=g), torch.randn(rank, 10, generator=g)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    path = _save(
        tmp_path / "loha.safetensors",
        {
            f"{name}.hada_w1_a": w1a,
            f"{name}.hada_w1_b": w1b,
            f"{name}.hada_w2_a": w2a,
            f"{name}.hada_w2_b": w2b,
            f"{name}.alpha": torch.tensor(1.0),
        },
    )
    return path, ((w1a @ w1b) * (w2a @ w2b)).double() * (1.0 / rank)


def test_loha_is_refused_without_convert_to_lora_and_converted_by_svd_with_it(tmp_path, capsys):
    path, update = _loha(tmp_path)
    with pytest.raises(loralego.LoraLegoError, match="LoHa is not a LoRA; pass --convert-to-lora"):
        loralego.load(path)
    module = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    full = loralego.load(path, convert_to_lora=4)  # LoHa rank 2 x 2: its update has rank <= 4, kept exactly
    assert full.conversions[module] == pytest.approx(1.0)
    torch.testing.assert_close(dense_updates(full)[module], update, rtol=1e-5, atol=1e-6)
    low = loralego.load(path, convert_to_lora=1)
    s = torch.linalg.svdvals(update)
    assert low.conversions[module] == pytest.approx(float(s[0] ** 2 / (s**2).sum()), rel=1e-6)
    u, _, vh = torch.linalg.svd(update)
    torch.testing.assert_close(dense_updates(low)[module], s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-5, atol=1e-6)
    out = tmp_path / "loha-as-lora.safetensors"
    assert main(["merge", str(path), "--out", str(out), "--method", "cat", "--convert-to-lora", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{module}: converted to LoRA rank 1, kept energy {low.conversions[module]:.6f}" in printed


def test_lokr_is_converted_by_svd_of_its_kronecker_update(tmp_path):
    g = torch.Generator().manual_seed(2)
    w1, w2a, w2b = torch.randn(2, 3, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)
    name = "lora_unet_mid_block_attentions_0_proj_out"
    path = _save(
        tmp_path / "lokr.safetensors",
        {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(4.0)},
    )
    expected = torch.kron(w1.double(), (w2a @ w2b).double()) * (4.0 / 2)  # LyCORIS: alpha / rank of w2's factors
    adapter = loralego.load(path, convert_to_lora=64)
    torch.testing.assert_close(
        dense_updates(adapter)["unet.mid_block.attentions.0.proj_out"], expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lora_unet_x.dora_scale", "DoRA"),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
            "old diffusers attention-processor LoRA",
        ),
    ],
)
def test_dora_and_old_processor_files_are_refused_with_what_they_are(tmp_path, key, message):
    tensors = {"lora_unet_y.lora_down.weight": torch.zeros(2, 4), "lora_unet_y.lora_up.weight": torch.zeros(4, 2)}
    if "processor" in key:
        tensors = {}
    path = _save(tmp_path / "bad.safetensors", {**tensors, key: torch.zeros(2, 4)})
    with pytest.raises(loralego.LoraLegoError, match=message) as error:
        loralego.load(path)
    assert "\n" not in str(error.value)


def test_diffusers_legacy_names_read_as_the_peft_layout(tmp_path):
    """``.lora.down`` (UNet) and ``.lora_linear_layer.down`` (text encoders), as diffusers' training scripts
    wrote them before PEFT, are the same modules as ``lora_A`` / ``lora_B`` files."""
    g = torch.Generator().manual_seed(3)
    a1, b1, a2, b2 = (torch.randn(shape, generator=g) for shape in ((2, 8), (8, 2), (2, 6), (6, 2)))
    unet, te = (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    )
    legacy = _save(
        tmp_path / "legacy.safetensors",
        {
            f"{unet}.lora.down.weight": a1,
            f"{unet}.lora.up.weight": b1,
            f"{te}.lora_linear_layer.down.weight": a2,
            f"{te}.lora_linear_layer.up.weight": b2,
        },
    )
    peft = _save(
        tmp_path / "peft.safetensors",
        {
            f"{unet}.lora_A.weight": a1,
            f"{unet}.lora_B.weight": b1,
            f"{te}.lora_A.weight": a2,
            f"{te}.lora_B.weight": b2,
        },
    )
    old, new = loralego.load(legacy), loralego.load(peft)
    assert old.format == new.format == "diffusers" and sorted(old.modules) == sorted([unet, te])
    assert_updates_close(dense_updates(old), dense_updates(new))


def _flux_split(tmp_path: Path, ranks: tuple[int, int, int], alpha: bool) -> Path:
    g = torch.Generator().manual_seed(sum(ranks))
    tensors = {}
    for part, rank in zip("qkv", ranks, strict=True):
        base = f"transformer.transformer_blocks.0.attn.to_{part}"
        tensors[f"{base}.lora_A.weight"] = torch.randn(rank, 16, generator=g)
        tensors[f"{base}.lora_B.weight"] = torch.randn(16, rank, generator=g)
        if alpha:
            tensors[f"{base}.alpha"] = torch.tensor(float(rank + 1))
    return _save(tmp_path / f"split{ranks}.safetensors", tensors)


@pytest.mark.parametrize("alpha", [True, False], ids=["alpha", "no-alpha (ai-toolkit)"])
def test_flux_split_qkv_fuses_exactly_and_splits_back(tmp_path, alpha):
    """Fusing stacks the downs and places the ups block-diagonally: rank 2 + 3 + 4 = 9, exact; reading the
    fused module splits it back into the same three updates (sharing the fused down factor)."""
    split = loralego.load(_flux_split(tmp_path, (2, 3, 4), alpha))
    fused_path = tmp_path / "fused.safetensors"
    loralego.merge_to_folder([split], fused_path, method="cat", format="kohya")
    with safe_open(str(fused_path), "pt") as handle:
        assert sorted(handle.keys()) == [
            f"lora_unet_double_blocks_0_img_attn_qkv.{s}" for s in ("alpha", "lora_down.weight", "lora_up.weight")
        ]
        assert tuple(handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape) == (9, 16)
    fused = loralego.load(fused_path)
    assert sorted(fused.modules) == sorted(split.modules) and {i.rank for i in fused.modules.values()} == {9}
    assert_updates_close(dense_updates(fused), dense_updates(split))


def test_flux_fusing_a_partial_qkv_fills_zero_rows(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = "transformer.transformer_blocks.0.attn.to_k"
    path = _save(
        tmp_path / "k.safetensors",
        {
            f"{base}.lora_A.weight": torch.randn(2, 16, generator=g),
            f"{base}.lora_B.weight": torch.randn(16, 2, generator=g),
        },
    )
    out = tmp_path / "k-fused.safetensors"
    loralego.merge_to_folder([loralego.load(path)], out, method="cat", format="kohya")
    back = dense_updates(loralego.load(out))
    assert torch.count_nonzero(back["transformer.transformer_blocks.0.attn.to_q"]) == 0
    torch.testing.assert_close(back[base], dense_updates(loralego.load(path))[base])


def test_weight_overrides_per_input_and_module_pattern(tmp_path, capsys):
    from lora_files import make_kohya

    paths = [make_kohya(tmp_path / f"{i}.safetensors", rank=2, alpha=2.0, seed=i) for i in (1, 2)]
    adapters = [loralego.load(p) for p in paths]
    merged = loralego.merge(
        adapters,
        method="cat",
        weights=[1.0, 0.5],
        weight_overrides=[{"text_encoder": 0.0}, {"unet.down_blocks.0.resnets.0.conv1": 2.0}],
    )
    updates = dense_updates(merged)
    first, second = dense_updates(adapters[0]), dense_updates(adapters[1])
    for module, update in updates.items():
        w1 = 0.0 if module.startswith("text_encoder.") else 1.0
        w2 = 2.0 if module == "unet.down_blocks.0.resnets.0.conv1" else 0.5
        torch.testing.assert_close(update, w1 * first[module] + w2 * second[module])
    out = tmp_path / "cli.safetensors"
    args = [
        "merge",
        *map(str, paths),
        "--out",
        str(out),
        "--method",
        "cat",
        "--weight-override",
        "1:text_encoder=0",
        "--weight-override",
        "2:unet.down_blocks.0.resnets.0.conv1=2",
        "--weights",
        "1",
        "0.5",
    ]
    assert main(args) == 0
    assert_updates_close(dense_updates(loralego.load(out)), updates)
    with pytest.raises(loralego.LoraLegoError, match="is not I:PATTERN=W"):
        loralego.merge(adapters, weight_overrides=["text_encoder=0"])


def test_vllm_target_serves_rank_one(mixed_adapters, tmp_path):
    out = tmp_path / "r1"
    loralego.merge_to_folder([loralego.load(p) for p in mixed_adapters], out, rank=1, n_init=1, target="vllm")
    assert check_vllm_folder(out) == 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1


def test_recipe_weight_overrides_per_input(tmp_path):
    from lora_files import make_kohya

    from loralego.recipe import load_recipe

    paths = [make_kohya(tmp_path / f"{i}.safetensors", rank=2, alpha=2.0, seed=i) for i in (1, 2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs:\n  - path: {paths[0]}\n    weight_overrides: {{text_encoder: 0}}\n  - {paths[1]}\n"
        "output: out.safetensors\nmethod: cat\n"
    )
    options = load_recipe(recipe).options
    assert options.weight_overrides == [{"text_encoder": 0.0}, {}]
