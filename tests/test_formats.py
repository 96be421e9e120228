"""Kohya and diffusers single-file LoRAs (SD 1.5 / SDXL / Flux names, conv 1x1 and 3x3, alpha != r), format
round trips, metadata, vLLM-ready output and Hugging Face ids from the local hub cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_updates_close, dense_updates, summed_updates
from lora_files import (
    FLUX_KOHYA,
    SD15_KOHYA,
    SD_DIFFUSERS,
    SDXL_KOHYA,
    canonical,
    make_diffusers,
    make_kohya,
)
from safetensors import safe_open
from safetensors.torch import save_file

import loralego
from loralego.cli import main
from loralego.methods import METHODS
from loralego.vllm import VLLM_RANKS, check_vllm, check_vllm_folder

KOHYA_CONV_3X3 = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV_1X1 = "unet.down_blocks.0.attentions.0.proj_in"
CONV_3X3 = "unet.down_blocks.0.resnets.0.conv1"
LINEAR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


@pytest.fixture
def kohya_pair(tmp_path: Path) -> list[Path]:
    """Two SD 1.5 kohya LoRAs: ranks 4 and 6, alphas 3 and 12, one module without an alpha."""
    return [
        make_kohya(tmp_path / "in" / "style_a.safetensors", rank=4, alpha=3.0, seed=1, no_alpha=(KOHYA_CONV_3X3,)),
        make_kohya(tmp_path / "in" / "style_b.safetensors", rank=6, alpha=12.0, seed=2),
    ]


@pytest.fixture
def diffusers_pair(tmp_path: Path) -> list[Path]:
    """Two diffusers LoRAs: alphas from .alpha tensors, and from diffusers' lora_adapter_metadata."""
    return [
        make_diffusers(tmp_path / "in" / "d_a.safetensors", rank=4, seed=3, alphas=dict.fromkeys(SD_DIFFUSERS, 2.0)),
        make_diffusers(
            tmp_path / "in" / "d_b.safetensors",
            rank=8,
            seed=4,
            adapter_metadata={
                "unet.r": 8,
                "unet.lora_alpha": 5,
                "unet.alpha_pattern": {"attn1.to_q": 16},
                "text_encoder.r": 8,
                "text_encoder.lora_alpha": 4,
            },
        ),
    ]


def test_kohya_reader_keeps_names_shapes_and_alphas(kohya_pair):
    adapter = loralego.load(kohya_pair[0])
    assert adapter.format == "kohya" and adapter.name == "style_a"
    assert sorted(adapter.modules) == canonical(SD15_KOHYA)  # canonical (diffusers) names
    conv3 = adapter.modules[CONV_3X3]
    assert conv3.a_shape == (4, 16, 3, 3) and conv3.b_shape == (32, 4, 1, 1) and conv3.d_in == 16 * 9
    assert adapter.modules[CONV_1X1].a_shape == (4, 32, 1, 1)
    assert adapter.scale(LINEAR) == pytest.approx(3.0 / 4)
    assert adapter.scale(CONV_3X3) == pytest.approx(1.0)  # no alpha tensor: alpha = rank
    assert adapter.base_model == "stable-diffusion-v1/lora"  # modelspec.architecture guards mixing models
    lora_a, lora_b = adapter.factors(CONV_3X3)
    assert lora_a.shape == (4, 144) and lora_b.shape == (32, 4)


@pytest.mark.parametrize("modules", [SDXL_KOHYA, FLUX_KOHYA], ids=["sdxl", "flux"])
def test_kohya_sdxl_and_flux_prefixes_merge_exactly(tmp_path, modules):
    paths = [
        make_kohya(tmp_path / f"{i}.safetensors", modules=modules, rank=4, alpha=a, seed=i, metadata={})
        for i, a in ((1, 2.0), (2, 8.0))
    ]
    adapters = [loralego.load(p) for p in paths]
    assert sorted(adapters[0].modules) == canonical(modules)
    merged = loralego.merge(adapters, method="cat")
    assert merged.format == ("kohya-sgm" if modules is SDXL_KOHYA else "kohya")  # SDXL's sgm UNet names kept
    assert_updates_close(dense_updates(merged), summed_updates(adapters))


def test_diffusers_reader_alpha_sources(diffusers_pair):
    with_tensors, with_metadata = (loralego.load(p) for p in diffusers_pair)
    assert with_tensors.format == with_metadata.format == "diffusers"
    assert sorted(with_tensors.modules) == sorted(SD_DIFFUSERS)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert with_tensors.modules[conv].a_shape == (4, 16, 3, 3)
    assert with_tensors.scale(conv) == pytest.approx(2.0 / 4)  # .alpha tensor
    assert with_metadata.scale(conv) == pytest.approx(5 / 8)  # unet.lora_alpha
    assert with_metadata.scale("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == pytest.approx(2)
    assert with_metadata.scale("text_encoder.text_model.encoder.layers.0.mlp.fc1") == pytest.approx(4 / 8)
    plain = loralego.load(make_diffusers(diffusers_pair[0].parent / "plain.safetensors", rank=4, seed=9))
    assert plain.scale(conv) == pytest.approx(1.0)  # nothing says otherwise: alpha = rank


def _exact_merges(k: int) -> list[dict]:
    return [{"method": "cat"}, {"method": "lego", "rank": k, "param_reweight": False, "output_reweight": False}]


@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
@pytest.mark.parametrize("exact", [0, 1], ids=["cat", "lego-k>=N"])
def test_round_trip_through_each_format_is_exact(fmt, exact, tmp_path, request):
    """Read format X, merge exactly (cat, or lego with k >= pool and no reweighting), write X, read it back:
    the written update is the exact weighted sum of the inputs', conv shapes included."""
    paths = request.getfixturevalue(
        {"peft": "mixed_adapters", "kohya": "kohya_pair", "diffusers": "diffusers_pair"}[fmt]
    )
    adapters = [loralego.load(p) for p in paths]
    weights = [0.5, -1.5, 2.0][: len(adapters)]
    out = tmp_path / ("merged" if fmt == "peft" else "merged.safetensors")
    options = _exact_merges(k=40)[exact]
    loralego.merge_to_folder(adapters, out, weights=weights, **options)
    merged = loralego.load(out)
    assert merged.format == fmt
    assert_updates_close(dense_updates(merged), summed_updates(adapters, weights))
    for module, info in merged.modules.items():  # stored shapes restored (4-D conv factors)
        source = next(a.modules[module] for a in adapters if module in a.modules)
        assert info.a_shape[1:] == source.a_shape[1:] and info.b_shape[2:] == source.b_shape[2:]


def test_kohya_output_keeps_input_metadata_and_records_the_merge(kohya_pair, tmp_path):
    out = tmp_path / "merged.safetensors"
    loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], out, rank=4, seed=3)
    meta = _metadata(out)
    assert meta["ss_output_name"] == "style_a" and meta["modelspec.title"] == "style a"  # the first input's
    assert meta["modelspec.merged_from"] == "style_a, style_b"
    assert meta["loralego.method"] == "lego+" and json.loads(meta["loralego.options"])["seed"] == 3  # the default
    assert [i["name"] for i in json.loads(meta["loralego.inputs"])] == ["style_a", "style_b"]
    assert "sshs_model_hash" not in meta  # a hash of the input's weights would be wrong here
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "4"
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())
        assert float(handle.get_tensor(f"{KOHYA_CONV_3X3}.alpha")) == 4.0  # scale 1: alpha = rank
        assert tuple(handle.get_tensor(f"{KOHYA_CONV_3X3}.lora_down.weight").shape) == (4, 16, 3, 3)
    assert keys == {f"{m}.{s}" for m in SD15_KOHYA for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    before = out.read_bytes()
    loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], out, rank=4, seed=3, force=True)
    assert out.read_bytes() == before  # deterministic
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_kohya_files(method, tmp_path):
    """Every registered method works on kohya inputs (flattened factors; conv shapes restored on write)."""
    paths = [make_kohya(tmp_path / f"{i}.safetensors", rank=4, alpha=2.0 + i, seed=i) for i in (1, 2)]
    out = tmp_path / "out.safetensors"
    loralego.merge_to_folder([loralego.load(p) for p in paths], out, method=method, rank=4)
    merged = loralego.load(out)
    assert merged.format == "kohya" and sorted(merged.modules) == canonical(SD15_KOHYA)
    assert len(merged.modules[CONV_3X3].a_shape) == 4
    assert all(bool(torch.isfinite(t).all()) for m in merged.modules for t in merged.stored(m))


def test_saving_a_loaded_kohya_adapter_keeps_its_scales(kohya_pair, tmp_path):
    adapter = loralego.load(kohya_pair[0])
    out = adapter.save(tmp_path / "copy.safetensors")
    copy = loralego.load(out)
    assert copy.format == "kohya"
    assert {m: copy.scale(m) for m in copy.modules} == pytest.approx({m: adapter.scale(m) for m in adapter.modules})
    assert_updates_close(dense_updates(copy), dense_updates(adapter))


def test_peft_to_diffusers_and_back_is_exact(mixed_adapters, tmp_path):
    adapters = [loralego.load(p) for p in mixed_adapters]
    file = tmp_path / "merged.safetensors"
    loralego.merge_to_folder(adapters, file, method="cat", format="diffusers")
    as_diffusers = loralego.load(file)
    assert as_diffusers.format == "diffusers"
    assert any(m.startswith("model.layers.0.") for m in as_diffusers.modules)  # no base_model.model. prefix
    folder = tmp_path / "back"
    loralego.merge_to_folder([as_diffusers], folder, method="cat", format="peft")
    back = loralego.load(folder)
    assert back.format == "peft"
    assert_updates_close(dense_updates(back), summed_updates(adapters))


def test_conversions_without_names_are_refused(kohya_pair, mixed_adapters, tmp_path):
    """A language model's modules have no kohya names; kohya SD modules convert (canonical names)."""
    with pytest.raises(loralego.LoraLegoError, match="has no name in the kohya layout"):
        loralego.merge_to_folder([loralego.load(mixed_adapters[0])], tmp_path / "o.safetensors", format="kohya")
    with pytest.raises(loralego.LoraLegoError, match=r"ending in \.safetensors"):
        loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], tmp_path / "folder-out")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "folder-out").exists()
    loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], tmp_path / "as-peft", method="cat", format="peft")
    assert sorted(loralego.load(tmp_path / "as-peft").modules) == canonical(SD15_KOHYA)


@pytest.mark.parametrize(
    ("key", "feature"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("lora_unet_x.diff", "full weight differences"),
        ("lora_unet_x.lora_up.bias", "bias"),
        ("lora_unet_x.something", "not a LoRA tensor"),
    ],
)
def test_non_lora_kohya_tensors_are_refused(tmp_path, key, feature):
    path = make_kohya(tmp_path / "bad.safetensors", extra={key: torch.zeros(2)})
    with pytest.raises(loralego.LoraLegoError, match=feature) as error:
        loralego.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_single_file_write_is_all_or_nothing(kohya_pair, tmp_path):
    from safetensors.torch import save_file

    from loralego.adapters.kohya import write_kohya_file

    out = tmp_path / "out.safetensors"
    save_file({"old": torch.ones(2)}, str(out))  # an earlier safetensors file: --force may replace it
    kept = out.read_bytes()
    with pytest.raises(loralego.LoraLegoError, match="already exists"):
        loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], out)
    assert out.read_bytes() == kept

    def failing():
        yield "unet.m", torch.zeros(2, 3), torch.zeros(4, 2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_kohya_file(out, tensors=failing(), force=True)
    assert out.read_bytes() == kept  # the old file is untouched, no half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.safetensors"]


def test_cli_merges_and_inspects_kohya_files(kohya_pair, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    args = ["merge", *map(str, kohya_pair), "--out", str(out), "--rank", "5", "--weights", "1", "0.5"]
    assert main(args) == 0
    assert "merged 2 adapters with lego+ (rank 5)" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kohya" in printed and "stable-diffusion-v1/lora" in printed


# --- vLLM ---


def test_vllm_target_pads_to_one_allowed_rank_and_passes_the_rules(mixed_adapters, tmp_path, capsys):
    adapters = [loralego.load(p) for p in mixed_adapters]
    out = tmp_path / "vllm"
    args = ["merge", *map(str, mixed_adapters), "--out", str(out), "--rank", "12", "--n-init", "1", "--target", "vllm"]
    assert main(args) == 0
    assert "--max-lora-rank 16 (rank 12 padded with zero units to 16)" in capsys.readouterr().out
    assert check_vllm_folder(out) == 16
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16 and not config["rank_pattern"] and not config["alpha_pattern"]
    assert config["modules_to_save"] is None and config["use_rslora"] is False
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert all(s[0] == 16 for k, s in shapes.items() if "lora_A" in k)
    assert all(s[1] == 16 for k, s in shapes.items() if "lora_B" in k)
    # Zero units change nothing: the served update is the plain rank-12 merge's.
    plain = loralego.merge(adapters, rank=12, n_init=1)
    assert_updates_close(dense_updates(loralego.load(out)), dense_updates(plain))
    in_memory = loralego.merge(adapters, rank=12, n_init=1, target="vllm")
    assert {info.rank for info in in_memory.modules.values()} == {16} and in_memory.config["r"] == 16


def test_vllm_target_of_an_exact_merge_rounds_the_rank_up(mixed_adapters, tmp_path):
    out = tmp_path / "cat-vllm"
    loralego.merge_to_folder([loralego.load(p) for p in mixed_adapters], out, method="cat", target="vllm")
    assert check_vllm_folder(out) == 32  # pool 4 + 8 + 16 = 28 -> 32


def test_vllm_target_refusals(kohya_pair, adapter_factory, tmp_path):
    with pytest.raises(loralego.LoraLegoError, match="--target vllm writes a PEFT folder"):
        loralego.merge_to_folder([loralego.load(p) for p in kohya_pair], tmp_path / "o.safetensors", target="vllm")
    big = [loralego.load(adapter_factory(r=300, alpha=300, seed=s, targets=("q_proj",))) for s in (1, 2)]
    with pytest.raises(loralego.LoraLegoError, match="exceeds vLLM's largest --max-lora-rank"):
        loralego.merge_to_folder(big, tmp_path / "big", method="cat", target="vllm")
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))


def _good_vllm() -> tuple[dict, dict]:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 8),
    }
    return config, tensors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 12, "lora_alpha": 12}, "not a --max-lora-rank value"),
        ({"lora_alpha": 16}, "lora_alpha must equal r"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
        ({"tensor": ("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(8, 32))}, "expected 'base_model"),
        ({"tensor": ("base_model.model.x.lora_A.weight", torch.zeros(8, 32, 1, 1))}, "no lora_B"),
        ({"tensor": ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 32))}, "rank"),
    ],
)
def test_check_vllm_names_the_broken_rule(change, message):
    config, tensors = _good_vllm()
    assert check_vllm(config, tensors) == 8 and 8 in VLLM_RANKS
    if "tensor" in change:
        key, value = change.pop("tensor")
        tensors[key] = value
    config.update(change)
    with pytest.raises(loralego.LoraLegoError, match=message):
        check_vllm(config, tensors)


# --- Hugging Face ids from the local hub cache ---


def _fake_cache(hub: Path, repo_id: str, files: list[Path]) -> None:
    """The hub cache layout huggingface_hub writes: refs/main -> commit, snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)


def test_hub_ids_resolve_from_the_local_cache_only(mixed_adapters, kohya_pair, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hf-home" / "hub"
    _fake_cache(hub, "acme/task-lora", sorted(mixed_adapters[0].iterdir()))
    _fake_cache(hub, "acme/style-lora", [kohya_pair[0]])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder of that name

    peft_adapter = loralego.load("acme/task-lora")
    assert peft_adapter.format == "peft" and peft_adapter.name == "acme/task-lora"
    assert peft_adapter.sha256 == loralego.load(mixed_adapters[0]).sha256
    kohya_adapter = loralego.load("acme/style-lora")  # a snapshot holding one .safetensors file
    assert kohya_adapter.format == "kohya" and sorted(kohya_adapter.modules) == canonical(SD15_KOHYA)

    assert main(["inspect", "acme/task-lora"]) == 0
    assert "tiny-llama-for-tests" in capsys.readouterr().out
    out = tmp_path / "from-hub"
    assert main(["merge", "acme/task-lora", str(mixed_adapters[1]), "--out", str(out), "--method", "cat"]) == 0
    assert json.loads(_metadata(out / "adapter_model.safetensors")["loralego.inputs"])[0]["name"] == "acme/task-lora"

    with pytest.raises(loralego.LoraLegoError, match="nor a model id in the local hub cache"):
        loralego.load("acme/not-downloaded")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(loralego.LoraLegoError, match="no such file or folder"):
        loralego.load("acme/task-lora")


def test_diffusers_folder_with_one_weights_file_loads(diffusers_pair, tmp_path):
    folder = tmp_path / "pipeline_lora"
    folder.mkdir()
    shutil.copy(diffusers_pair[0], folder / "pytorch_lora_weights.safetensors")
    adapter = loralego.load(folder)
    assert adapter.format == "diffusers" and adapter.name == "pipeline_lora"
    save_file({"x": torch.zeros(1)}, str(folder / "other.safetensors"))
    with pytest.raises(loralego.LoraLegoError, match=r"several \.safetensors files"):
        loralego.load(folder)
