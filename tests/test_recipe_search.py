"""The recipe search (experiments/recipe_search.py) across worlds, on the smoke chain: stages 00-03 come
once into ``_base/world<k>`` (here copied from the finished smoke run, ``base_from``), each candidate runs
from a copy of them on the VALIDATION images, one result line per candidate, paired over (world, seed);
it resumes without redoing finished candidates and writes the table and dose-response plot."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_recipe_search_runs_on_validation_and_resumes(root, smoke_chain, tmp_path):
    import shutil
    source = tmp_path / "finished"  # a finished one-world run in the layout a config with worlds: [0] has
    shutil.copytree(smoke_chain, source / "world0", ignore=shutil.ignore_patterns("05_evaluation", ".realign.lock"))
    config = tmp_path / "search.yaml"
    config.write_text(f"""base: {root / 'configs' / 'tiny_world_smoke.yaml'}
worlds: [0]
stages:
  "04_training/{{condition}}_seed{{seed}}":
    matrix:
      seed: [0]
      condition:
        dpo: {{loss: dpo}}
        rdpo: {{loss: rdpo}}
  "05_evaluation":
    eval_split: validation
    max_questions: 20
    max_mme_questions: 4
    n_chair: 8
""")
    spec = tmp_path / "spec.yaml"
    results = tmp_path / "results" / "search.jsonl"
    spec.write_text(f"""config: {config}
root: {tmp_path / 'runs'}
base_from: {source}
results: {results}
candidates:
  default: {{}}
  steps_5: {{"04_training.max_steps": 5}}
""")
    cmd = [sys.executable, str(root / "experiments" / "recipe_search.py"), "--spec", str(spec)]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["candidate"] for r in recs] == ["default", "steps_5"]
    for r in recs:
        assert r["eval_split"] == "validation" and r["models"] == [
            f"world0/{m}" for m in ("base", "dpo_seed0", "rdpo_seed0")]
        d = r["paired_differences"]["rdpo - base"]["pope/adversarial/f1"]
        assert d["n"] == 1 and d["groups"] == ["world0"] and len(d["diffs"]) == 1  # (one world, one seed here)
        assert r["trained"]["world0/rdpo_seed0"]["steps"] == (5 if r["candidate"] == "steps_5" else 10)
    # the candidates' runs answered the validation questions, never the test ones
    ev = json.loads((tmp_path / "runs" / "steps_5" / "05_evaluation" / "metrics.json").read_text())
    assert list(ev["pope_files"]) == ["world0"] and all("pope_val" in p for p in ev["pope_files"]["world0"].values())
    log = [json.loads(x) for x in
           open(tmp_path / "runs" / "steps_5" / "world0" / "04_training" / "rdpo_seed0" / "train_log.jsonl")]
    assert len(log) == 5
    # stages 00-03 were copied into _base once, not run again, and the candidates' copies skipped them
    assert "copying stages 00-03" in res.stdout
    for stage in ("00_tiny_world", "01_retrieval", "02_masking", "03_induction"):
        made = json.loads((smoke_chain / stage / ".done.json").read_text())["finished"]
        for name in ("_base", "default", "steps_5"):
            assert json.loads((tmp_path / "runs" / name / "world0" / stage / ".done.json").read_text())["finished"] == made

    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(results.read_text().splitlines()) == 2  # nothing redone
    rep = subprocess.run(cmd + ["--report"], cwd=root, capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "| steps_5 |" in results.with_suffix(".md").read_text()
    assert (results.parent / "dose_response.png").stat().st_size > 5000
