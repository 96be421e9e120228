"""200 merges killed at random moments (SIGINT, SIGTERM, SIGKILL): outputs absent or complete, inputs unchanged,
no temporaries left after the next run. The work is in ``tests/stress_kill.py`` (one forking driver, 4 merges at a
time; about 35 s on the shared 2-core machine, most of it the driver's imports and the checks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks")
def test_merges_killed_at_random_moments(tmp_path: Path) -> None:
    kills = int(os.environ.get("LORALEGO_STRESS_KILLS", "200"))
    script = Path(__file__).with_name("stress_kill.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, str(script), "--kills", str(kills), "--jobs", "4", "--seed", "0", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "hangs 0," in summary and "stray_temporaries 0," in summary and "inputs_changed 0," in summary
    assert "problems 0" in summary
