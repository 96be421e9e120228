"""The merged tensors of 30 fixed merges equal the ones recorded before the plan refactor (bench/golden_outputs.py)."""

from __future__ import annotations

import json
import os
import subprocess
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


@pytest.mark.parametrize("kernels", ["AVX2", "COMPATIBLE"])
def test_dense_merges_do_not_depend_on_the_cpu_kernels(kernels: str, tmp_path: Path) -> None:
    """MKL picks its kernels by CPU (AVX-512, AVX2, ...), and a float32 product's last bit differs between them;
    ``MKL_CBWR`` forces another code path, as another machine would. The dense merges must give the same bytes."""
    cases = ["ties_k8", "magnitude_prune_k8", "dare_ties_k8"]
    script = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT / 'bench')!r}); import golden_outputs; "
        f"print(*(golden_outputs.run_case(c, Path({str(tmp_path)!r})) for c in {cases!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "MKL_CBWR": kernels}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [RECORDED[case] for case in cases]
