"""The merged tensors of 30 fixed merges equal the ones recorded before the plan refactor (bench/golden_outputs.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import golden_outputs  # noqa: E402

RECORDED = json.loads(golden_outputs.RECORD.read_text())


@pytest.mark.parametrize("case", sorted(golden_outputs.CASES))
def test_merged_output_unchanged(case: str, tmp_path: Path) -> None:
    assert golden_outputs.run_case(case, tmp_path) == RECORDED[case]
