"""Fuzz the readers and the merge with corrupted real adapters (issue 5).

A seeded mutation loop (tests/fuzzing.py): every case must end in a correct merge or a one-line
LoraLegoError, never another exception, a hang, a partial output, leftover temporary files or a modified
input. ``LORALEGO_FUZZ_CASES`` raises the count; bench/fuzz_report.py runs thousands and tabulates them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzzing import make_seed_adapters, run_fuzz, summary_line

N_CASES = int(os.environ.get("LORALEGO_FUZZ_CASES", "300"))
SEED = int(os.environ.get("LORALEGO_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def seed_adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seed_adapters(tmp_path_factory.mktemp("fuzz-seeds"))


def test_corrupted_adapters_merge_or_are_refused(seed_adapters, tmp_path):
    report = run_fuzz(N_CASES, SEED, seed_adapters, tmp_path, cli_every=4, timeout=60.0)
    print("\n" + summary_line(report) + "\n" + report.table())
    failures = report.failures()
    assert not failures, "\n".join(
        f"case {r.index} ({r.kind}: {'; '.join(r.mutations)}; {r.method} rank {r.rank}, "
        f"{'cli' if r.via_cli else 'api'}): {r.outcome}: {r.detail}"
        for r in failures[:20]
    )
    # The fuzzer must exercise both ends: corruptions that are caught and ones that are harmless.
    assert report.outcomes["refused"] > N_CASES // 4
    assert report.outcomes["merged"] > N_CASES // 20
    assert {r.kind for r in report.results} >= {"config-retype", "header-fields", "tensor-values", "truncate"}
