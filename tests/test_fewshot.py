"""tune and route on a tiny Llama and a tiny BERT built from configs (seconds, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fewshot_toys import (
    other_examples,
    random_adapter,
    save_base,
    save_encoder,
    solver_examples,
    train_solver,
    word_tokenizer,
    write_jsonl,
)

import loralego
from loralego.cli import main
from loralego.errors import LoraLegoError
from loralego.examples import read_examples, split_holdout

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fewshot")
    base = save_base(root / "base")
    return {
        "root": root,
        "base": base,
        "solver": train_solver(root / "solver", base),
        "noise": random_adapter(root / "noise", base, seed=3),
        "examples": write_jsonl(root / "examples.jsonl", solver_examples(20, 1)),
    }


def _tune(toy: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["tune", str(toy["solver"]), str(toy["noise"]), "--base-model", str(toy["base"]),
                 "--examples", str(toy["examples"]), "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("strategy", [["--strategy", "search"], ["--strategy", "gradient", "--steps", "30",
                                                                   "--lr", "0.05"]])
def test_weights_move_toward_the_adapter_that_solves_the_task(toy, tmp_path, strategy):
    out = tmp_path / "tuned"
    assert _tune(toy, out, *strategy) == 0
    record = json.loads((out / "tune.json").read_text())
    weights = torch.tensor(record["weights"])  # groups x adapters; adapter 0 is the solver
    solver, noise = weights[:, 0].mean().item(), weights[:, 1].mean().item()
    assert solver > 0.5 + 0.1  # started at 1/2 each
    assert solver > noise + 0.3
    assert record["loss_after"]["train"] < 0.5 * record["loss_before"]["train"]
    assert record["loss_after"]["heldout"] < record["loss_before"]["heldout"]
    # cat writes the learned ensemble exactly: the written adapter's loss is the tuned one
    assert record["written_loss"]["train"] == pytest.approx(record["loss_after"]["train"], abs=1e-4)


def _dense_model(base: Path, adapters: list[loralego.Adapter], weights: dict[str, list[float]]):
    """The base model with W += sum_j w_(m, j) * scale_j * B_j A_j added to every adapted weight (float64 sum)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, row in weights.items():
            layer = model.get_submodule(module)
            update = torch.zeros_like(layer.weight, dtype=torch.float64)
            for adapter, w in zip(adapters, row, strict=True):
                if module in adapter.modules:
                    a, b = adapter.factors(module)
                    update += w * adapter.scale(module) * (b.double() @ a.double())
            layer.weight += update.float()
    return model


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_tuned_output_loads_in_peft_and_equals_base_plus_weighted_update(toy, tmp_path, granularity):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tuned"
    assert _tune(toy, out, "--strategy", "gradient", "--granularity", granularity, "--steps", "10",
                 "--lr", "0.1") == 0
    record = json.loads((out / "tune.json").read_text())
    adapters = [loralego.load(toy["solver"]), loralego.load(toy["noise"])]
    modules = sorted(adapters[0].modules)
    group = {m: (m if granularity == "module" else m.split(".")[2]) for m in modules}
    per_module = {m: record["weights"][record["groups"].index(group[m])] for m in modules}
    assert len({tuple(row) for row in per_module.values()}) > 1  # the weights differ across groups
    expected = _dense_model(toy["base"], adapters, per_module)
    base = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([word_tokenizer()("p1 p2 -> c1 p3 q4 ->")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # the per-module weights are recorded as weight overrides: verify re-reads them and finds the exact sum
    from loralego.diagnostics import verify

    report = verify(loralego.load(out), adapters)
    assert report.error_norm <= 1e-5 * report.target_norm


def test_same_seed_same_bytes_and_rank_wise_methods(toy, tmp_path):
    for name in ("a", "b"):
        assert _tune(toy, tmp_path / name, "--method", "lego", "--rank", "4", "--budget", "12") == 0
    for file in ("adapter_model.safetensors", "tune.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    record = json.loads((tmp_path / "a" / "tune.json").read_text())
    assert record["method"] == "lego" and record["written_loss"] is not None
    assert {info.rank for info in loralego.load(tmp_path / "a").modules.values()} == {4}
    assert _tune(toy, tmp_path / "c", "--method", "lego", "--rank", "4", "--budget", "12", "--seed", "1") == 0
    assert (tmp_path / "c" / "tune.json").read_bytes() != (tmp_path / "a" / "tune.json").read_bytes()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x"}', "missing 'completion'"),
        ('{"prompt": "x", "completion": 3}', "must be a string"),
        ('{"prompt": "x", "completion": "y", "extra": 1}', "unknown key 'extra'"),
        ('{"prompt": "x", "completion": "y", "task": "nobody"}', "names no adapter"),
    ],
)
def test_bad_examples_are_refused_in_one_line(toy, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p1 ->", "completion": " c1"}\n' + line + "\n")
    out = tmp_path / "never"
    rc = main(["tune", str(toy["solver"]), str(toy["noise"]), "--base-model", str(toy["base"]),
               "--examples", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_inputs_are_refused_before_anything_is_written(toy, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--base-model", str(tmp_path / "missing")], "not a folder"),
        (["--base-model", str(toy["base"]), "--weights", "1", "1"], "learns the weights"),
        (["--base-model", str(toy["base"]), "--density", "0.3"], "density"),  # cat takes no density
        (["--base-model", str(toy["base"]), "--strategy", "search", "--granularity", "layer"], "gradient"),
        (["--base-model", str(toy["base"]), "--holdout", "1.5"], "--holdout"),
    ]
    for extra, message in cases:
        try:
            rc = main(["tune", str(toy["solver"]), str(toy["noise"]), "--examples", str(toy["examples"]),
                       "--out", str(out), *extra])
        except SystemExit as exit_:  # argparse refuses unknown flags itself
            rc = exit_.code
        assert rc == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists()


def test_holdout_split_is_seeded_and_stratified():
    examples = solver_examples(10, 0) + other_examples(10, 0)
    train, held = split_holdout(examples, 0.2, seed=5)
    assert split_holdout(examples, 0.2, seed=5) == (train, held)
    assert sorted(e.task for e in held) == ["noise", "noise", "solver", "solver"]
    assert len(train) == 16


# ---------------------------------------------------------------- routing


@pytest.fixture(scope="module")
def routed(toy) -> dict[str, Path]:
    encoder = save_encoder(toy["root"] / "encoder")
    examples = write_jsonl(toy["root"] / "route.jsonl", solver_examples(15, 2) + other_examples(15, 2))
    out = toy["root"] / "router"
    assert main(["route", str(toy["solver"]), str(toy["noise"]), "--encoder", str(encoder),
                 "--examples", str(examples), "--out", str(out)]) == 0
    return {"encoder": encoder, "router": out, "examples": examples}


def test_router_sends_examples_to_their_own_adapter(routed):
    from loralego.routing import Router

    router = Router.load(routed["router"])
    assert router.names == ["solver", "noise"]
    assert router.heldout_accuracy == 1.0
    fresh = solver_examples(10, 99) + other_examples(10, 99)
    best = router.top_k([e.prompt for e in fresh], 1)
    assert [router.names[b[0]] for b in best] == [e.task for e in fresh]


def test_routed_model_serves_each_row_with_its_adapter_or_a_cached_fusion(toy, routed, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralego.routing import RoutedModel, Router

    router = Router.load(routed["router"])
    base = AutoModelForCausalLM.from_pretrained(toy["base"], dtype=torch.float32)
    routed_model = RoutedModel.from_router(base, router)
    tokenizer = word_tokenizer()
    texts = ["p1 p2 ->", "q3 q4 ->"]
    ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts])
    with torch.no_grad():
        mixed = routed_model(texts, input_ids=ids).logits
        singles = {}
        for name in ("solver", "noise"):
            routed_model.model.set_adapter(name)
            singles[name] = routed_model.model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], singles["solver"][0])
    torch.testing.assert_close(mixed[1], singles["noise"][1])
    assert not torch.allclose(singles["solver"][1], singles["noise"][1])

    # top-2: both rows get the same fused set, merged once (cat of the two at 1/2 each)
    with torch.no_grad():
        fused = routed_model(texts, input_ids=ids, top_k=2).logits
        routed_model(texts[::-1], input_ids=ids.flip(0), top_k=2)
    assert list(routed_model._fused) == [(0, 1)]
    merged = loralego.merge([loralego.load(toy["solver"]), loralego.load(toy["noise"])], method="cat",
                            weights=[0.5, 0.5], dtype="float32")
    merged.save(tmp_path / "fused")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy["base"]), str(tmp_path / "fused"))
    with torch.no_grad():
        torch.testing.assert_close(fused, reference.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_route_refuses_examples_without_task(toy, routed, tmp_path, capsys):
    examples = write_jsonl(tmp_path / "x.jsonl", solver_examples(3, 0, task=None))
    rc = main(["route", str(toy["solver"]), str(toy["noise"]), "--encoder", str(routed["encoder"]),
               "--examples", str(examples), "--out", str(tmp_path / "r")])
    assert rc == 2 and "has no \"task\"" in capsys.readouterr().err
    assert read_examples(examples)[0].task is None
    with pytest.raises(LoraLegoError, match="not a router folder"):
        from loralego.routing import Router

        Router.load(tmp_path)
