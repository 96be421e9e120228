"""Recipes (``loralego run recipe.yaml``) and per-module rank overrides: one options model for the CLI, the
YAML and the Python API, so a recipe run writes the same bytes as the same CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lora_files import make_kohya

import loralego
from loralego.cli import main
from loralego.overrides import override_for
from loralego.recipe import load_recipe

Q0 = "model.layers.0.self_attn.q_proj"


def _card_without_command(text: str) -> str:
    """The model card minus the fenced command line (the only line that names how the merge was started)."""
    lines = text.splitlines()
    start = lines.index("Command:")
    return "\n".join(lines[:start] + lines[start + 5 :])


def test_recipe_run_equals_the_same_cli_run_byte_for_byte(mixed_adapters, tmp_path, capsys):
    cli_out, recipe_out = tmp_path / "cli", tmp_path / "recipe-out"
    flags = ["--method", "lego", "--rank", "6", "--seed", "3", "--norm", "2", "--rank-override", "v_proj=3"]
    flags += ["--weights", "0.5", "1", "2"]
    assert main(["merge", *map(str, mixed_adapters), "--out", str(cli_out), *flags]) == 0
    recipe = tmp_path / "recipes" / "merge.yaml"
    recipe.parent.mkdir()
    text = (
        "# three task adapters, weighted\n"
        "inputs:\n"
        f"  - path: {mixed_adapters[0]}\n    weight: 0.5\n"
        f"  - {mixed_adapters[1]}\n"
        f"  - path: {mixed_adapters[2]}\n    weight: 2\n"
        "output: ../recipe-out\n"  # relative to the recipe's folder
        "method: lego\nrank: 6\nseed: 3\nnorm: '2'\n"
        "rank_overrides:\n  v_proj: 3\n"
    )
    recipe.write_text(text)
    assert main(["run", str(recipe)]) == 0
    assert "merged 3 adapters with lego (rank 6)" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (recipe_out / name).read_bytes() == (cli_out / name).read_bytes(), name
    cli_card, recipe_card = ((folder / "README.md").read_text() for folder in (cli_out, recipe_out))
    assert f"loralego run {recipe}" in recipe_card
    assert _card_without_command(recipe_card) == _card_without_command(cli_card)
    assert (recipe_out / "recipe.yaml").read_text() == text  # the recipe travels with the output
    merged = loralego.load(recipe_out)
    assert merged.modules["model.layers.1.self_attn.v_proj"].rank == 3 and merged.modules[Q0].rank == 6


def test_recipe_equals_python_api_and_single_file_recipe_goes_beside(tmp_path):
    inputs = [make_kohya(tmp_path / f"k{i}.safetensors", rank=4, alpha=2.0 * i, seed=i) for i in (1, 2)]
    recipe = tmp_path / "kohya.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"inputs": [p.name for p in inputs], "output": "out/merged.safetensors", "rank": 3, "method": "svd"}
        )
    )
    assert main(["run", str(recipe), "--quiet"]) == 0
    out = tmp_path / "out" / "merged.safetensors"
    assert (tmp_path / "out" / "merged.recipe.yaml").read_text() == recipe.read_text()
    api = tmp_path / "api.safetensors"
    loralego.merge_to_folder([loralego.load(p) for p in inputs], api, method="svd", rank=3)
    assert api.read_bytes() == out.read_bytes()
    assert main(["run", str(recipe), "--quiet"]) == 2  # exists: refused without --force
    assert main(["run", str(recipe), "--quiet", "--force"]) == 0


def test_rank_override_patterns_match_whole_name_parts_most_specific_first():
    overrides = {"mlp": 16, "mlp.down_proj": 4, "q_proj": 2, r"layers\.1\..*": 8}
    assert override_for(overrides, "model.layers.0.mlp.up_proj") == 16
    assert override_for(overrides, "model.layers.0.mlp.down_proj") == 4  # longer match wins
    assert override_for(overrides, Q0) == 2
    assert override_for(overrides, "model.layers.1.self_attn.q_proj") == 8  # covers more of the name than q_proj
    assert override_for(overrides, "model.layers.0.self_attn.k_proj") is None
    assert override_for({"proj": 3}, Q0) is None  # "proj" is not a whole part of "q_proj"
    assert override_for({"to_q": 3}, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == 3
    assert override_for(dict(reversed(overrides.items())), "model.layers.0.mlp.down_proj") == 4  # order-free


def test_rank_overrides_through_api_and_cli_agree(mixed_adapters, tmp_path, capsys):
    adapters = [loralego.load(p) for p in mixed_adapters]
    merged = loralego.merge(adapters, rank=6, n_init=1, rank_overrides={"q_proj": 2, "k_proj": 5, "nothing_here": 1})
    assert merged.modules[Q0].rank == 2 and merged.modules["model.layers.0.self_attn.k_proj"].rank == 5
    assert merged.modules["model.layers.0.self_attn.v_proj"].rank == 6
    config = merged.config
    assert config["r"] == 6 and config["rank_pattern"][Q0] == 2
    out = tmp_path / "cli"
    args = ["merge", *map(str, mixed_adapters), "--out", str(out), "--rank", "6", "--n-init", "1"]
    assert main([*args, "--rank-override", "q_proj=2", "--rank-override", "k_proj=5"]) == 0
    assert loralego.load(out).modules[Q0].rank == 2
    assert json.loads(loralego.load(out).metadata["loralego.options"])["rank_overrides"] == {"k_proj": 5, "q_proj": 2}
    capsys.readouterr()
    assert main([*args, "--force", "--rank-override", "v_proj"]) == 2
    err = capsys.readouterr().err
    assert "rank_overrides" in err and "PATTERN=K" in err and len(err.strip().splitlines()) == 1
    plan = loralego.pipeline.plan_merge(adapters, loralego.MergeOptions(rank_overrides={"nothing_here": 1}))
    assert plan.warnings == ("--rank-override nothing_here: matches no module",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inputs: [a]\noutput: o\nrank: 0\n", "rank: must be >= 1"),
        ("inputs: [a]\noutput: o\nrnak: 4\n", "rnak: unknown key"),
        ("output: o\n", "inputs: Field required"),
        ("inputs: []\noutput: o\n", "inputs: List should have at least 1 item"),
        ("inputs: [{path: a, weight: x}]\noutput: o\n", "inputs.0.weight"),
        ("inputs: [{path: a, weight: 2}]\noutput: o\nweights: [1]\n", "not both"),
        ("inputs: [a]\noutput: o\nrank_overrides: {'(': 2}\n", "rank_overrides: pattern '(' is not a valid"),
        ("inputs: [a]\noutput: o\nmethod: lego\nnorm: 3\n", "norm"),
        ("inputs: [a\noutput: o\n", "not valid YAML at line"),
        ("- a\n- b\n", "a recipe is a YAML mapping"),
    ],
)
def test_recipe_errors_are_one_line_naming_the_key(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(loralego.LoraLegoError) as error:
        load_recipe(recipe)
    assert str(recipe) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_recipe_paths_are_relative_to_the_recipe(tmp_path: Path, mixed_adapters):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "r.yaml").write_text(f"inputs: [{mixed_adapters[0]}, acme/not-local]\noutput: out\nreport: r.html\n")
    recipe = load_recipe(folder / "r.yaml")
    assert recipe.inputs == [str(mixed_adapters[0]), "acme/not-local"]  # a model id is passed on as written
    assert recipe.output == folder / "out" and recipe.report == folder / "r.html"
