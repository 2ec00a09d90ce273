"""Notebook hygiene (one policy, enforced) and a headless papermill run of the chain in its small setting.

Policy: every ``notebooks/NN_*.ipynb`` is paired with a py:percent twin (jupytext) holding the same
cells, the ``.ipynb`` is committed without outputs, and its first code cell is the only one tagged
``parameters``.
"""
import json
import subprocess
import sys

import jupytext
import pytest


def _notebooks(root):
    nbs = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert nbs, "no notebooks found"
    return nbs


def test_notebooks_are_stripped_paired_and_parameterised(root):
    for path in _notebooks(root):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["language"] == "python", path
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{path}: outputs committed"
        tagged = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])]
        assert tagged == [0], f"{path}: exactly one parameters cell, the first code cell (found {tagged})"
        twin = path.with_suffix(".py")
        assert twin.is_file(), f"{path}: py:percent twin missing"
        paired = jupytext.read(twin)
        assert [c.source for c in paired.cells] == ["".join(c["source"]) for c in nb["cells"]], \
            f"{path} and {twin.name} differ: run `jupytext --sync {twin}`"


@pytest.mark.slow
def test_chain_runs_headless_and_resumes(root, tmp_path):
    """`realign run` on the smoke config: executed notebook, a tiny model loadable by path, metrics."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "realign_lib.cli", "run", "--config", str(root / "configs" / "tiny_world_smoke.yaml"),
           "--set", f"run_dir={run_dir}"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stage = run_dir / "00_tiny_world"
    executed = json.loads((stage / "00_tiny_world.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["small_run"] is True
    for split in ("random", "popular", "adversarial"):
        m = metrics["pope"][split]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["yes_ratio"] <= 1 and m["n"] > 100
        assert (stage / "eval_base" / f"pope_{split}_answers.jsonl").is_file()
    assert 0 <= metrics["chair"]["chair_i"] <= 1
    for fig in ("scenes.png", "training_loss.png", "descriptions.png", "pope_base.png"):
        assert (stage / fig).stat().st_size > 1000, fig
    samples = [json.loads(x) for x in open(run_dir / "data" / "samples.jsonl")]
    assert len(samples) == metrics["world"]["n_samples"] and set(samples[0]) >= {"id", "image", "prompt", "chosen"}

    # stage 01: top-k *other* images for every sample, index and embeddings on disk
    nb = [json.loads(x) for x in open(run_dir / "01_retrieval" / "neighbours.jsonl")]
    m1 = json.loads((run_dir / "01_retrieval" / "metrics.json").read_text())
    assert len(nb) == m1["n_images"] > 0
    assert all(len(r["neighbours"]) == m1["top_k"] and r["id"] not in {n["id"] for n in r["neighbours"]} for r in nb)
    assert all(r["neighbours"][0]["score"] >= r["neighbours"][-1]["score"] for r in nb)
    assert (run_dir / "01_retrieval" / "index.faiss").stat().st_size > 0
    # neighbours share the scene far more often than random pairs do
    assert m1["tiny_world"]["same_scene_not_all_objects"] > m1["tiny_world"]["random_pair_same_scene"]

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from realign_lib import vlm
    model_dir = metrics["model_path"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    proc = AutoProcessor.from_pretrained(model_dir)
    q = json.loads(open(metrics["world"]["pope"]["random"]).readline())
    answer = vlm.generate(model, proc, [f"{metrics['world']['root']}/test_images/{q['image']}"], [q["text"]],
                          max_new_tokens=4)[0]
    assert answer.split()[0] in ("yes", "no"), answer

    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2, again.stdout + again.stderr


def test_cli_refuses_a_bad_config_clearly(root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: r\nstages:\n  '00_tiny_world':\n    n_train: lots\n")
    res = subprocess.run([sys.executable, "-m", "realign_lib.cli", "run", "--config", str(bad)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "n_train must be int" in res.stderr and "Traceback" not in res.stderr
