"""Diffusion LoRA layouts as the libraries write them, proven in diffusers itself.

Fixtures are written by diffusers (``save_lora_weights``, ``convert_state_dict_to_kohya``) from random PEFT
LoRAs of tiny SD 1.5-, SDXL- and Flux-shaped models built from configs. Every layout reads into canonical
names, every pair merges per layer into the exact sum (``cat``), and every written layout loads through
diffusers' own loaders (its converters for kohya names) with no missing or unexpected keys and the forward
pass of base weights plus the merged update.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusion_models import (
    family,
    forward,
    load_in_diffusers,
    lora_layer_count,
    save_diffusers,
    save_kohya,
    with_updates,
)
from helpers import assert_updates_close, dense_updates, summed_updates

import loralego
from loralego.adapters import memory_adapter
from loralego.adapters.names import flatten, unflatten

FAMILIES = ("sd15", "sdxl", "flux")


@pytest.fixture(scope="module")
def families() -> dict:
    return {name: family(name) for name in FAMILIES}


def _layout_file(fam, layout: str, folder: Path, seed: int, rank: int) -> Path:
    """One input file of ``layout``, written by diffusers where diffusers writes it (diffusers everywhere;
    kohya for SD / SDXL), else by loralego's writer from a diffusers file (kohya-sgm, kohya Flux)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        return save_diffusers(fam, folder, rank=rank, alpha=rank / 2, seed=seed)
    if layout == "kohya" and fam.name != "flux":
        return save_kohya(fam, folder / "kohya.safetensors", rank=rank, seed=seed)
    source = save_diffusers(fam, folder / "src", rank=rank, alpha=2 * rank, seed=seed)
    out = folder / f"{layout}.safetensors"
    loralego.merge_to_folder([loralego.load(source)], out, method="cat", format=layout)
    return out


@pytest.fixture(scope="module")
def layout_files(families, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    files = {}
    for name, fam in families.items():
        for index, layout in enumerate(fam.layouts):
            files[name, layout] = _layout_file(fam, layout, root / name / layout, seed=10 * index + 1, rank=2 + index)
    return files


def test_kohya_names_unflatten_for_every_module_of_the_models(families):
    """The vocabulary of names.unflatten covers every module path of the tiny models (whose part names are
    those of the full-size ones): flatten then unflatten is the identity."""
    for fam in families.values():
        for model in fam.components.values():
            for path, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    assert unflatten(flatten(path)) == path


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layout_reads_into_the_models_own_module_names(name, families, layout_files):
    fam = families[name]
    expected_paths = {
        f"{component}.{path}"
        for component, model in fam.components.items()
        for path, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }
    for layout in fam.layouts:
        adapter = loralego.load(layout_files[name, layout])
        assert adapter.format == layout
        assert set(adapter.modules) <= expected_paths, sorted(set(adapter.modules) - expected_paths)[:3]
        assert len(adapter.modules) > 10


@pytest.mark.parametrize("name", FAMILIES)
def test_every_pair_of_layouts_merges_per_layer_into_the_exact_sum(name, families, layout_files, tmp_path):
    fam = families[name]
    for first, second in itertools.combinations_with_replacement(fam.layouts, 2):
        if first == second:
            continue
        adapters = [loralego.load(layout_files[name, first]), loralego.load(layout_files[name, second])]
        assert set(adapters[0].modules) == set(adapters[1].modules)  # the same layers, whatever the layout
        expected = summed_updates(adapters, [0.7, -1.3])
        for out_format in fam.layouts:
            out = tmp_path / f"{first}+{second}.{out_format}.safetensors"
            loralego.merge_to_folder(adapters, out, method="cat", weights=[0.7, -1.3], format=out_format)
            merged = loralego.load(out)
            assert merged.format == out_format
            assert_updates_close(dense_updates(merged), expected)


def _component_updates(adapter, component: str) -> dict[str, torch.Tensor]:
    return {
        module[len(component) + 1 :]: update
        for module, update in dense_updates(adapter).items()
        if module.startswith(f"{component}.")
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_outputs_load_in_diffusers_with_the_exact_forward_pass(name, families, layout_files, tmp_path):
    """Each written layout, loaded by diffusers (its converters for kohya names): no missing or unexpected
    keys, one LoRA layer per merged module, and every component's output is that of base + merged update."""
    fam = families[name]
    inputs = fam.inputs()
    adapters = [loralego.load(layout_files[name, layout]) for layout in fam.layouts]
    for out_format in fam.layouts:
        out = tmp_path / f"merged.{out_format}.safetensors"
        loralego.merge_to_folder(
            adapters, out, method="cat", weights=[1.0, 0.5, -0.8][: len(adapters)], format=out_format
        )
        merged = loralego.load(out)
        if name == "flux" and out_format == "kohya":
            merged = _diffusers_convertible_flux(merged, tmp_path)
            out = tmp_path / "merged.flux-kohya-convertible.safetensors"
            merged.save(out)
        models, warnings = load_in_diffusers(fam, out)
        assert not [w for w in warnings if "missing" in w or "unexpected" in w], warnings
        for component, model in models.items():
            updates = _component_updates(merged, component)
            assert lora_layer_count(model) == len(updates), (out_format, component)
            expected = forward(fam, component, with_updates(fam.components[component], updates), inputs[component])
            actual = forward(fam, component, model, inputs[component])
            base = forward(fam, component, fam.components[component], inputs[component])
            assert not torch.allclose(actual, base)  # the LoRA changes the output
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"{out_format} {component}")


def _diffusers_convertible_flux(merged, tmp_path):
    """What diffusers' kohya Flux converter (0.42) can load into the tiny model: it hard-codes Flux's widths
    for ``linear1`` (3072 x 3 + 12288), so the tiny single blocks' attention and MLP inputs are left out (the
    full-width split is tested against the converter separately); and it names the modules outside the blocks
    (x_embedder, context_embedder, proj_out, norm_out.linear) without the ``transformer.`` prefix, so
    ``load_lora_into_transformer`` drops them silently; their names are checked against its table in
    test_flux_global_modules_match_diffusers_converter."""
    blocks = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.", "text_encoder.")
    keep = [
        m
        for m in merged.modules
        if m.startswith(blocks) and not (m.startswith(blocks[1]) and (".attn.to_" in m or m.endswith("proj_mlp")))
    ]
    tensors = {m: merged.stored(m) for m in keep}
    adapter = memory_adapter(
        "convertible", {m: (a, b * merged.scale(m)) for m, (a, b) in tensors.items()}, config={}, dtype=torch.float32
    )
    adapter.format = "kohya"
    return adapter


def test_flux_linear1_split_matches_diffusers_converter_at_full_width(tmp_path):
    """A kohya ``single_blocks_0_linear1`` at Flux's real widths (3072 in, 3 x 3072 + 12288 out), rank 2:
    loralego's split equals the update diffusers' converter produces for each of to_q/to_k/to_v/proj_mlp."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 3072, generator=generator), torch.randn(3 * 3072 + 12288, 2, generator=generator)
    name = "lora_unet_single_blocks_0_linear1"
    state = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
    path = tmp_path / "linear1.safetensors"
    save_file(state, str(path))
    ours = dense_updates(loralego.load(path))
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    assert len(ours) == 4
    for module, update in ours.items():
        expected = theirs[f"{module}.lora_B.weight"].double() @ theirs[f"{module}.lora_A.weight"].double()
        torch.testing.assert_close(update, expected)


def test_flux_global_modules_match_diffusers_converter(tmp_path):
    """kohya Flux modules outside the blocks map as diffusers' converter maps them (which omits the
    ``transformer.`` prefix), norm_out's shift/scale halves swapped as it swaps them."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    shapes = {
        "img_in": (16, 4),
        "txt_in": (16, 12),
        "final_layer_linear": (4, 16),
        "final_layer_adaLN_modulation_1": (32, 16),
        "time_in_in_layer": (16, 8),
        "guidance_in_out_layer": (16, 16),
        "vector_in_in_layer": (16, 10),
    }
    state = {}
    for name, (rows, cols) in shapes.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, cols, generator=generator)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, 2, generator=generator)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "globals.safetensors"
    save_file(state, str(path))
    ours = dense_updates(loralego.load(path))
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    assert len(ours) == len(shapes)
    for module, update in ours.items():
        key = module.removeprefix("transformer.")
        key = key if f"{key}.lora_A.weight" in theirs else module
        expected = theirs[f"{key}.lora_B.weight"].double() @ theirs[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(update, expected, msg=module)


@pytest.mark.parametrize("name", FAMILIES)
def test_inputs_read_as_diffusers_reads_them(name, families, layout_files):
    """loralego's reading of each input file (alphas from diffusers' metadata, kohya alphas, sgm names) is
    diffusers' own: the components with the file loaded by diffusers compute base + loralego's update."""
    fam = families[name]
    inputs = fam.inputs()
    for layout in fam.layouts:
        if name == "flux" and layout == "kohya":
            continue  # diffusers' converter needs Flux's real widths for linear1 (see above)
        adapter = loralego.load(layout_files[name, layout])
        models, warnings = load_in_diffusers(fam, layout_files[name, layout])
        assert not [w for w in warnings if "missing" in w or "unexpected" in w], warnings
        for component, model in models.items():
            updates = _component_updates(adapter, component)
            assert lora_layer_count(model) == len(updates), (layout, component)
            expected = forward(fam, component, with_updates(fam.components[component], updates), inputs[component])
            actual = forward(fam, component, model, inputs[component])
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=f"{layout} {component}")
