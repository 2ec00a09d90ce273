"""The benchmark scripts run and write their figures (speed itself is measured, not asserted)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_training_benchmark_writes_ratios(root, tmp_path):
    out = tmp_path / "training.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_training.py"), "--steps", "3",
                          "--warmup", "1", "--configs", "kit_dpo,kit_rdpo,trl_dpo", "--out", str(out),
                          "--model", "", "--preferences", ""],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert set(fig["results"]) == {"kit_dpo", "kit_rdpo", "trl_dpo"}
    for r in fig["results"].values():
        assert r["steps"] == 3 and r["step_seconds_median"] > 0 and r["peak_memory_mb"] > 0
        assert r["final_loss"] is not None
    assert fig["ratios"]["trl_dpo"]["step_time_vs_trl_dpo"] == 1.0
    assert fig["ratios"]["kit_rdpo_vs_kit_dpo"]["step_time"] > 0
