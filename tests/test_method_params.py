"""Each method declares its own parameters; the CLI, recipes and the Python API take them from there."""

from __future__ import annotations

import pytest

import loralego
from loralego.cli import main
from loralego.methods import METHODS
from loralego.options import make_options
from loralego.recipe import load_recipe


def test_a_parameter_the_method_does_not_take_is_refused_naming_its_parameters(mixed_adapters, tmp_path, capsys):
    # --density used to be accepted by lego and silently unused.
    code = main(["merge", *map(str, mixed_adapters), "--out", str(tmp_path / "m"), "--density", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "density" in err and "method lego" in err and "n_init, max_iter" in err
    assert not (tmp_path / "m").exists()
    with pytest.raises(loralego.LoraLegoError, match="method ties takes no such parameter"):
        make_options(method="ties", n_init=3)


def test_methods_describes_each_method_from_its_declaration(capsys):
    for name, method in METHODS.items():
        assert main(["methods", name]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"{name}: {method.summary}")
        for field in method.params.model_fields:
            assert field.replace("_", "-") in text
    assert main(["methods", "--help", "ties"]) == 0
    assert "--density" in capsys.readouterr().out
    assert main(["methods", "nope"]) == 2
    assert "unknown merge method" in capsys.readouterr().err


def test_parameters_flat_or_as_a_mapping_give_the_same_options():
    flat = make_options(method="ties", rank=4, density=0.3)
    nested = make_options(method="ties", rank=4, parameters={"density": 0.3})
    assert flat == nested and flat.parameters.density == 0.3
    # Switching the method carries over only what was set explicitly, validated against the new method.
    assert make_options(flat, method="dare_ties").parameters.density == 0.3
    with pytest.raises(loralego.LoraLegoError, match="takes no such parameter"):
        make_options(flat, method="lego")


def test_recipe_parameters_block_equals_flat_keys(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("inputs: [a]\noutput: o\nmethod: lego\nn_init: 7\n")
    nested.write_text("inputs: [a]\noutput: o\nmethod: lego\nparameters: {n_init: 7}\n")
    assert load_recipe(flat).options == load_recipe(nested).options
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a]\noutput: o\nmethod: svd\nparameters: {n_init: 7}\n")
    with pytest.raises(loralego.LoraLegoError, match=r"bad\.yaml: n_init: unknown key"):
        load_recipe(bad)


def test_the_plan_decides_each_module_rank_before_reading(mixed_adapters):
    from loralego.pipeline import plan_merge

    adapters = [loralego.load(path) for path in mixed_adapters]
    plan = plan_merge(adapters, make_options(method="lego", rank=4, rank_overrides={"v_proj": 9}))
    for name, module in plan.modules.items():
        assert module.rank == (9 if name.endswith("v_proj") else 4) and module.rank_requested
    merged = loralego.merge(adapters, method="lego", rank=4, rank_overrides={"v_proj": 9})
    assert {name: info.rank for name, info in merged.modules.items()} == {n: m.rank for n, m in plan.modules.items()}
    default = plan_merge(adapters, make_options(method="svd"))
    assert all(not m.rank_requested for m in default.modules.values())
    assert plan_merge(adapters, make_options(method="cat")).rank is None


@pytest.mark.parametrize("command", ["merge", "run", "report", "inspect", "verify", "tune", "route"])
def test_every_help_page_renders(command, capsys):
    # Help strings come from the declarations; one with a bare % once crashed argparse's formatter.
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
