"""benchmarks/gpu_check.py at its tiny shape on the CPU: the script a lent GPU machine runs (7B
shapes, bf16) must keep working, so it runs here with the same code on tiny shapes."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_check_runs_at_tiny_shape(root, tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                              "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["tiny"] is True and set(fig["shapes"]) == {"llava15_7b", "llava16_mistral_7b"}
    for name, r in fig["shapes"].items():
        assert r["parameters"] > 0 and r["tokens_per_row"] > 16
        off, on = r["train_checkpointing_off"], r["train_checkpointing_on"]
        for run in (off, on):
            assert "error" not in run, (name, run)
            assert run["step1"]["loss_dpo"] == run["step1"]["loss_vdpo"] == 0.6931  # adapters start as the identity
            assert len(run["step_seconds"]) == 2 and run["reference_seconds"] > 0 and run["peak_memory_mb"] > 0
            assert all(w >= s for w, s in zip(run["step_seconds_with_collation"], run["step_seconds"]))
            assert run["tokens_per_step"] > 8 * 3 * 16  # 8 pairs x 3 scored rows, each longer than its image
            assert run["peak_reserved_mb"] is None and run["mfu_bf16"] is None  # CPU: no device memory, no peak
        assert off["step1"] == on["step1"] and off["step2"] == on["step2"]  # checkpointing changes no number
        assert r["generation_pope"]["new_tokens"] == 8 and r["generation_pope"]["tokens_per_second"] > 0
        assert r["generation_fill"]["tokens_per_second"] > 0 and r["image_embeddings"]["images_per_second"] > 0
    # LLaVA-1.6 scores more image tokens per row (anyres tiles + newline tokens) than LLaVA-1.5
    assert fig["shapes"]["llava16_mistral_7b"]["tokens_per_row"] > fig["shapes"]["llava15_7b"]["tokens_per_row"]


def test_gpu_check_refuses_the_cpu_without_tiny(root, tmp_path):
    """Without a GPU the 7B shapes would be built in fp32 on the CPU and run for hours: it refuses at once,
    and it writes only where --out says."""
    env = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "g.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2 and "no CUDA GPU is visible" in res.stderr and "--tiny" in res.stderr
    assert not (tmp_path / "g.json").exists()
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--tiny"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2 and "--out" in res.stderr
