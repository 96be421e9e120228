"""The evaluation's paired, clustered bootstrap (bench/quality/report.py), on made-up outcomes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))

from report import Resample, interval


def _outcomes(hits: list[int]) -> str:
    return "".join(str(int(hit)) for hit in hits)


def test_replicate_zero_is_the_observed_accuracy() -> None:
    resample = Resample.from_groups({"t": ["a", "b", "c", "d"]}, replicates=50)
    assert resample.accuracy("t", "1100")[0] == pytest.approx(0.5)


def test_a_run_paired_with_itself_differs_by_exactly_zero() -> None:
    resample = Resample.from_groups({"t": [f"#{i}" for i in range(40)]}, replicates=200)
    acc = resample.accuracy("t", _outcomes([i % 3 == 0 for i in range(40)]))
    assert np.all(acc - acc == 0.0)
    assert np.ptp(acc) > 0  # but the accuracy itself does vary over replicates


def test_groups_are_resampled_whole() -> None:
    # Two groups of 5 questions: every replicate holds 0, 5 or 10 copies of group "x" among its 10 questions,
    # so the accuracy of a run right on "x" only is one of 0, 0.5, 1.
    groups = ["x"] * 5 + ["y"] * 5
    acc = Resample.from_groups({"t": groups}, replicates=300).accuracy("t", "1111100000")
    assert set(np.round(acc[1:], 6)) <= {0.0, 0.5, 1.0}
    assert {0.0, 1.0} <= set(np.round(acc[1:], 6))


def test_interval_brackets_the_resampled_accuracies_and_narrows_with_more_examples() -> None:
    def width(n: int) -> float:
        resample = Resample.from_groups({"t": [f"#{i}" for i in range(n)]}, replicates=1000)
        point, low, high = interval(resample.accuracy("t", _outcomes([i % 2 for i in range(n)])))
        assert low <= point <= high
        return high - low

    assert width(400) < 0.6 * width(50)


def test_paired_difference_is_tighter_than_the_unpaired_spread() -> None:
    # Two runs that agree on 95% of 300 examples: their paired difference varies far less than either score.
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.6
    b = a.copy()
    flip = rng.choice(300, size=15, replace=False)
    b[flip] = ~b[flip]
    resample = Resample.from_groups({"t": [f"#{i}" for i in range(300)]}, replicates=1000)
    acc_a, acc_b = resample.accuracy("t", _outcomes(a.astype(int))), resample.accuracy("t", _outcomes(b.astype(int)))
    assert np.std(acc_a - acc_b) < 0.5 * np.std(acc_a)
