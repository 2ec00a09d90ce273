"""Notebook hygiene (one policy, enforced) and a headless papermill run of the chain in its small setting.

Policy: every ``notebooks/NN_*.ipynb`` is paired with a py:percent twin (jupytext) holding the same
cells, the ``.ipynb`` is stored with the outputs of a reference run of the main command (made from its
current sources: ``scripts/store_notebook_outputs.py``), its first code cell installs the kit on Colab
or a bare kernel (and does nothing here), and its second code cell is the only one tagged ``parameters``.
"""
import json
import subprocess
import sys

import jupytext
import nbformat
import pytest

from tests.support.chain import chain_cmd, copy_run


def _notebooks(root):
    nbs = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert nbs, "no notebooks found"
    return nbs


def test_notebooks_are_paired_parameterised_and_show_current_outputs(root):
    """Each stored notebook shows the outputs of a reference run (the main command; 05 the comparison over
    worlds; 00_real_data its run on the shipped LLaVA-layout sample), made from its current sources: after an edit, the recorded digest differs and
    `python scripts/store_notebook_outputs.py` must be run again. No machine path in any output."""
    from realign_lib.run import nbstore
    from realign_lib.run.config import load_config

    main_stages = set(load_config(root / "configs" / "tiny_world.yaml").stages)
    import re
    repo_url = re.search(r'^Repository = "([^"]+)"', (root / "pyproject.toml").read_text(), re.M).group(1)
    readme = (root / "README.md").read_text()
    for path in _notebooks(root):
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["language"] == "python", path
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        tagged = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])]
        assert tagged == [1], f"{path}: exactly one parameters cell, the second code cell (found {tagged})"
        assert "REALIGN_KIT_REPO" in "".join(code[0]["source"]), f"{path}: the first code cell is the setup cell"
        assert f'REPO_URL = "{repo_url}"' in "".join(code[0]["source"]), f"{path}: the setup cell's URL is not pyproject's"
        assert f"colab.research.google.com/github/{repo_url.split('github.com/')[1]}/blob/main/notebooks/{path.name}" \
            in readme, f"README: no Open-in-Colab badge for {path.name}"
        twin = path.with_suffix(".py")
        assert twin.is_file(), f"{path}: py:percent twin missing"
        paired = jupytext.read(twin)
        assert [c.source for c in paired.cells] == ["".join(c["source"]) for c in nb["cells"]], \
            f"{path} and {twin.name} differ: run `jupytext --sync {twin}`"
        nbformat.validate(nbformat.from_dict(nb))  # opens in any Jupyter (and nbconvert renders it)
        recorded = nb["metadata"].get("realign", {}).get("source_sha256")
        assert recorded == nbstore.source_digest(nb), \
            f"{path}: its stored outputs were made from other sources: run `python scripts/store_notebook_outputs.py`"
        assert nbstore.machine_paths(nb) == [], f"{path}: machine paths in the outputs"
        noise = [o for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"
                 or any(k in "".join(o.get("text", "")) for k in ("it/s]", "Warning:", ".venv/", "site-packages"))]
        assert not noise, f"{path}: warnings, progress bars or environment paths in the stored outputs: {noise[:1]}"
        figures = nbstore.figure_cells(nb)
        assert all(shown for _, shown in figures), (path, figures)
        assert path.stem not in main_stages or figures, f"{path}: no figure"
        assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, f"{path}: most code cells without outputs"


def test_stored_notebooks_show_the_settings_that_produced_them(root):
    """The first output of each stored notebook lists the settings that differ from its parameters cell's
    defaults, and they are exactly those of the config that made the outputs (run_dir aside: a machine
    path); notebook 05 is stored from the comparison over worlds, with several models per condition."""
    import ast

    from realign_lib.run.config import load_config
    from realign_lib.run.stages import stage_class

    for path in _notebooks(root):
        nb = json.loads(path.read_text())
        made_by = nb["metadata"]["realign"].get("outputs_from")
        if not made_by:
            continue
        cfg = load_config(root / made_by.split(" ")[0])
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        text = lambda o: "".join(o.get("text", ""))  # noqa: E731  (stored notebooks keep text as a list of lines)
        printed = "".join(text(o) for o in code[2]["outputs"] if o.get("name") == "stdout")
        assert f"{path.stem} runs with" in printed, (path, printed[:300])
        shown = {}
        for line in printed.splitlines():
            if line.startswith("  ") and " = " in line:
                k, v = line.strip().split(" = ", 1)
                shown[k] = ast.literal_eval(v)
        settings = stage_class(path.stem)(**{k: v for k, v in cfg.parameters(path.stem).items()})
        defaults = stage_class(path.stem).defaults()
        expected = {k: getattr(settings, k) for k in defaults if getattr(settings, k) != defaults[k] and k != "run_dir"}
        shown.pop("run_dir", None)
        assert shown == expected, (path, shown, expected)
        if path.stem == "05_evaluation":
            assert len(cfg.worlds) >= 3 and shown.get("worlds") == [f"world{w}" for w in cfg.worlds]
            models = "".join(text(o) for c in code for o in c.get("outputs", []) if o.get("name") == "stdout")
            for w in shown["worlds"]:
                for cond in ("base", "dpo_seed0", "rdpo_seed0", "dpo_seed2", "rdpo_seed2"):
                    assert f"{w}/{cond} " in models, (w, cond)


@pytest.mark.slow
def test_chain_runs_headless_and_resumes(root, smoke_chain, tmp_path):
    """`realign run` on the smoke config (stages 00-05, two stage-04 variants): every stage's outputs, a
    tiny model loadable by path, and a rerun that skips every finished stage."""
    run_dir = smoke_chain
    cmd = chain_cmd(run_dir)
    stage = run_dir / "00_tiny_world"
    executed = json.loads((stage / "00_tiny_world.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    # figures render inline in the executed notebooks (no forced non-interactive backend)
    for nb, n_figures in (("00_tiny_world/00_tiny_world.ipynb", 4), ("01_retrieval/01_retrieval.ipynb", 1),
                          ("04_training/rdpo_seed0/04_training.ipynb", 1), ("05_evaluation/05_evaluation.ipynb", 1)):
        cells = json.loads((run_dir / nb).read_text())["cells"]
        images = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert len(images) >= n_figures, (nb, len(images))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["world"]["n_train"] == 1500 and metrics["health"]["checked"] is False  # the smoke sizes
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

    from realign_lib.models import vlm
    model_dir = metrics["model_path"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    proc = AutoProcessor.from_pretrained(model_dir)
    q = json.loads(open(metrics["world"]["pope"]["random"]).readline())
    answer = vlm.generate(model, proc, [f"{metrics['world']['root']}/test_images/{q['image']}"], [q["text"]],
                          max_new_tokens=4)[0]
    assert answer.split()[0] in ("yes", "no"), answer

    # stage 02: every masked text is its chosen response with spans replaced by [MASK]
    masked = [json.loads(x) for x in open(run_dir / "02_masking" / "masked.jsonl")]
    by_id = {s["id"]: s for s in samples}
    assert masked and all(by_id[m["id"]]["chosen"][sp["start"]:sp["end"]] == sp["text"]
                          for m in masked for sp in m["spans"])
    # stage 03: TRL columns, loadable by datasets, rejected differs from chosen, rank within top-k
    from datasets import load_dataset
    prefs = load_dataset("json", data_files=str(run_dir / "03_induction" / "preferences.jsonl"), split="train",
                         cache_dir=str(tmp_path / "hf"))
    assert len(prefs) > 10 and {"prompt", "chosen", "rejected", "images", "retrieved_image"} <= set(prefs.column_names)
    m3 = json.loads((run_dir / "03_induction" / "metrics.json").read_text())
    assert all(r["chosen"] != r["rejected"] and 1 <= r["rank"] <= m3["top_k"] and r["similarity"] < m3["tau"]
               for r in prefs)
    # stage 04: two variants of one notebook, each with its adapter, log and executed notebook
    for name, loss in (("rdpo_seed0", "rdpo"), ("dpo_seed0", "dpo")):
        out = run_dir / "04_training" / name
        assert (out / "adapter_model.safetensors").is_file() and (out / "04_training.ipynb").is_file()
        log = [json.loads(x) for x in open(out / "train_log.jsonl")]
        assert len(log) == 10 and all("loss_dpo" in r and "learning_rate" in r for r in log)
        assert ("loss_vdpo" in log[0]) == (loss == "rdpo")
    # stage 05: every model answered every question; MME result files in the official layout
    m5 = json.loads((run_dir / "05_evaluation" / "metrics.json").read_text())
    assert m5["models"] == ["base", "dpo_seed0", "rdpo_seed0"]
    for name in m5["models"]:
        r = m5["per_model"][name]
        assert set(r["pope"]) == {"random", "popular", "adversarial"} and r["pope"]["random"]["n"] == 40
        assert set(r["mme"]["tasks"]) == {"existence", "count", "position", "color"}
        for task in r["mme"]["tasks"]:
            lines = (run_dir / "05_evaluation" / name / "mme" / f"{task}.txt").read_text().splitlines()
            assert len(lines) == 8 and all(len(x.split("\t")) == 4 for x in lines)
        assert 0 <= r["chair"]["chair_i"] <= 1
    assert "rdpo - dpo" in m5["paired_differences"] and (run_dir / "05_evaluation" / "comparison.md").is_file()

    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") == 7, again.stdout + again.stderr


def _comparable(run_dir):
    """What must not depend on interruptions or on the process: pairs, training curves, every score."""
    import hashlib
    m5 = json.loads((run_dir / "05_evaluation" / "metrics.json").read_text())
    logs = {n: [(r["step"], round(r["loss"], 5)) for r in map(json.loads, open(run_dir / "04_training" / n / "train_log.jsonl"))]
            for n in ("rdpo_seed0", "dpo_seed0")}
    return {"samples": hashlib.sha256((run_dir / "data" / "samples.jsonl").read_bytes()).hexdigest(),
            "masked": (run_dir / "02_masking" / "masked.jsonl").read_text(),
            "preferences": (run_dir / "03_induction" / "preferences.jsonl").read_text(),
            "logs": logs,
            "scores": {n: {k: r[k] for k in ("pope", "pope_partner", "mme", "chair")} for n, r in m5["per_model"].items()}}


@pytest.mark.slow
def test_chain_killed_mid_evaluation_resumes_to_the_same_results(root, smoke_chain, tmp_path):
    """SIGKILL the whole chain (papermill, kernel and all) while stage 05 is answering; rerun it. The
    finished stages are skipped, stage 05 continues from its answer files, and every score equals the
    uninterrupted run's. (Stages 00-04 are the smoke run's, copied: this test is about stage 05.)"""
    import os
    import signal
    import time

    run_dir = copy_run(smoke_chain, tmp_path / "run",
                        only={"data", "model", "config.json", "00_tiny_world", "01_retrieval", "02_masking",
                              "03_induction", "04_training"})
    proc = subprocess.Popen(chain_cmd(run_dir), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    probe = run_dir / "05_evaluation" / "dpo_seed0" / "pope_random_answers.jsonl"
    deadline = time.time() + 900
    while not probe.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert probe.exists() and not (run_dir / "05_evaluation" / ".done.json").exists(), "killed at the wrong moment"
    res = subprocess.run(chain_cmd(run_dir), cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("skipped") == 6 and "[05_evaluation] running" in res.stdout
    for split in ("random", "popular", "adversarial"):  # no duplicated or missing answers after the resume
        for name in ("base", "dpo_seed0"):
            ids = [json.loads(x)["question_id"]
                   for x in open(run_dir / "05_evaluation" / name / f"pope_{split}_answers.jsonl")]
            assert len(ids) == len(set(ids)) == 40
    assert _comparable(run_dir) == _comparable(smoke_chain)


@pytest.mark.slow
def test_a_starved_base_model_fails_its_health_check_and_stops_the_chain(root, smoke_chain, tmp_path):
    """The smoke budget (a minute of training) cannot learn yes/no answers: with the health check on and
    one short warm restart allowed, stage 00 checks the model, restarts instruction tuning once from the
    saved model, checks again, then fails with the figures and the settings to raise, rc != 0, and no
    later stage runs."""
    run_dir = tmp_path / "run"
    copy_run(smoke_chain, run_dir, only=["00_tiny_world", "data", "model"])  # world and model reused
    res = subprocess.run(chain_cmd(run_dir) + ["--set", "00_tiny_world.health_check=true",
                                               "--set", "00_tiny_world.sft_restarts=1",
                                               "--set", "00_tiny_world.sft_restart_steps=10"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "UnhealthyBaseModel" in out and "failed its health check on the validation images" in out, out[-3000:]
    assert "sft_steps=150" in out and "sft_restarts=1" in out and "Raise sft_steps, sft_restarts" in out, out[-3000:]
    assert "health_check=false" in out, out[-3000:]
    assert "[01_retrieval] running" not in out and not (run_dir / "01_retrieval").exists()
    summary = json.loads((run_dir / "model" / "tiny_vlm" / "tiny_vlm.json").read_text())
    assert [r["cycle"] for r in summary["restarts"]] == [1] and [c["restarts"] for c in summary["checks"]] == [0, 1]
    assert all(c["missed"] for c in summary["checks"])
    m = json.loads((smoke_chain / "00_tiny_world" / "metrics.json").read_text())  # the smoke run: checked, let through
    assert m["health"]["checked"] is False and m["health"]["problems"], m["health"]


@pytest.mark.slow
def test_stage_05_over_worlds_pairs_within_each_world(root, smoke_chain, tmp_path):
    """A config with `worlds`: stage 05 runs once in run_dir over the world folders, every world's models
    answer in 05_evaluation/<world>/<model>/, and the comparison pairs on (world, seed) — two copies of the
    smoke run as two worlds give two pairs per comparison, each pair equal to the one-world run's."""
    import shutil
    run = tmp_path / "run"
    for w in (0, 1):
        shutil.copytree(smoke_chain, run / f"world{w}", ignore=shutil.ignore_patterns("05_evaluation", ".realign.lock"))
    cfg = tmp_path / "worlds.yaml"
    cfg.write_text(f"base: {root / 'configs' / 'tiny_world_smoke.yaml'}\nrun_dir: {run}\nworlds: [0, 1]\n")
    res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", str(cfg), "--stage", "5"],
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.loads((run / "05_evaluation" / "metrics.json").read_text())
    one = json.loads((smoke_chain / "05_evaluation" / "metrics.json").read_text())
    assert m["worlds"] == ["world0", "world1"]
    assert m["models"] == [f"world{w}/{n}" for w in (0, 1) for n in ("base", "dpo_seed0", "rdpo_seed0")]
    for w in (0, 1):
        assert (run / "05_evaluation" / f"world{w}" / "rdpo_seed0" / "pope_random_answers.jsonl").is_file()
    d = m["paired_differences"]["rdpo - base"]["pope/adversarial/accuracy"]
    d1 = one["paired_differences"]["rdpo - base"]["pope/adversarial/accuracy"]
    assert d["n"] == 2 and d["groups"] == ["world0", "world1"] and d["diffs"] == pytest.approx(d1["diffs"] * 2)
    assert set(m["per_world_differences"]) == {f"world{w}: {c}" for w in (0, 1)
                                               for c in ("dpo - base", "rdpo - base", "rdpo - dpo")}
    assert "(world, seed) pairs" in m["reading"]


def test_cli_refuses_a_bad_config_clearly(root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: r\nstages:\n  '00_tiny_world':\n    n_train: lots\n")
    res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", str(bad)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "n_train='lots': must be an integer" in res.stderr and "Traceback" not in res.stderr


def test_real_data_notebook_reads_llava_instruct(root, small_world, tmp_path):
    """00_real_data on a LLaVA-Instruct-150K-layout file: samples.jsonl in the shape stages 01-03 read."""
    import papermill as pm

    run = tmp_path / "run"
    pm.execute_notebook(str(root / "notebooks" / "00_real_data.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"run_dir": str(run), "llava_json": small_world["train_json"],
                                    "image_folder": small_world["train_images"], "n_samples": 25},
                        kernel_name="python3", language="python", cwd=str(root), progress_bar=False)
    samples = [json.loads(x) for x in open(run / "data" / "samples.jsonl")]
    assert len(samples) == 25 and len({s["id"] for s in samples}) == 25
    from pathlib import Path
    assert all((Path(s["image_root"]) / s["image"]).is_file() and s["chosen"] and "<image>" not in s["prompt"]
               for s in samples)
    m = json.loads((run / "00_real_data" / "metrics.json").read_text())
    assert m["n_samples"] == 25 and m["loader_counts"]["kept"] >= 25
    with pytest.raises(pm.PapermillExecutionError, match="set llava_json"):
        pm.execute_notebook(str(root / "notebooks" / "00_real_data.ipynb"), str(tmp_path / "out2.ipynb"),
                            parameters={"run_dir": str(run), "llava_json": ""}, kernel_name="python3", language="python",
                            cwd=str(root), progress_bar=False)


# what may differ between two runs that made the same results: timings, what one run did (counts of
# resumed work), executed notebooks (timings in outputs), markers, pickled arguments, caches
_RUN_ONLY_KEYS = {"seconds", "this_run", "texts_per_second", "images_per_second", "finished"}
_NOT_RESULTS = (".ipynb", ".done.json", "training_args.bin", "reference_logps.jsonl")


def _results(run_dir, under=("",)):
    """``relative path → content`` of every result file under ``run_dir`` (JSON without its run-only keys,
    the run folder's path replaced), to compare two runs."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _RUN_ONLY_KEYS}
        return [strip(v) for v in x] if isinstance(x, list) else x

    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if not p.is_file() or rel.endswith(_NOT_RESULTS) or "embedding_parts/" in rel or not rel.startswith(under):
            continue
        data = p.read_bytes().replace(str(run_dir).encode(), b"<run>")
        if p.suffix == ".json" and not rel.startswith(("data/tiny_world/pope/", "data/tiny_world/pope_val/")):
            data = strip(json.loads(data))  # (POPE's question files are JSON lines under .json: compared as bytes)
        out[rel] = data
    return out


def _same_results(rerun, clean, under=("",)):
    a, b = _results(rerun, under), _results(clean, under)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_a_rerun_with_settings_changed_gives_the_files_of_a_clean_run(root, smoke_chain, tmp_path):
    """Rerunning a finished chain's folder with a setting of each of stages 02-04 changed writes the same
    results as a clean run with those settings (stages 00-04; the stages after them would run again too,
    as every stage after a re-run one does); then the same for settings of stage 00 (the world's seed and
    size: every image, sample and the tiny VLM change, mostly under the same file names) over stages
    00-01. Caches that outlive a rerun (maskings, embeddings, reference log-probs) may keep old entries,
    never use them. (Stage 05's answer cache under a changed prompt: tests/test_evaluation.py.)"""
    changes = ["--set", "02_masking.max_mask_words=5",         # 02: resumed maskings were checked under 10
               "--set", "03_induction.stop_margin=0.0",        # 03: other fills, other pairs
               "--set", "04_training.beta=0.5",                # 04: same pairs' reference log-probs, other loss
               "--set", "02_masking.max_samples=100",          # (smaller than the smoke run, in both runs)
               "--set", "03_induction.max_samples=60", "--set", "04_training.max_steps=6",
               "--set", "04_training.n_chair=16",
               "--stage", "0", "--stage", "1", "--stage", "2", "--stage", "3", "--stage", "4"]
    rerun = copy_run(smoke_chain, tmp_path / "rerun")
    clean = copy_run(smoke_chain, tmp_path / "clean", only={"data", "model", "00_tiny_world", "01_retrieval",
                                                            "config.json"})
    for run_dir in (rerun, clean):
        res = subprocess.run(chain_cmd(run_dir) + changes, cwd=root, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "[01_retrieval] complete" in res.stdout and "[04_training/dpo_seed0] done" in res.stdout
    _same_results(rerun, clean, under=("data/", "model/", "00_tiny_world/", "01_retrieval/", "02_masking/",
                                       "03_induction/", "04_training/"))
    # the changes did change the results (the smoke model may answer every POPE question alike, so the pairs
    # and the training curves are what must differ)
    assert (rerun / "03_induction" / "preferences.jsonl").read_text() != \
        (smoke_chain / "03_induction" / "preferences.jsonl").read_text()
    assert (rerun / "04_training" / "rdpo_seed0" / "train_log.jsonl").read_text() != \
        (smoke_chain / "04_training" / "rdpo_seed0" / "train_log.jsonl").read_text()
    # the rerun's reference cache holds the clean run's values (keys name the model's folder: they differ)
    def values(path):
        return {(r["id"], r["loss"], *(round(r[k], 4) for k in ("chosen", "rejected", "retrieved") if k in r))
                for r in map(json.loads, open(path))}

    for name in ("rdpo_seed0", "dpo_seed0"):
        fresh = values(clean / "04_training" / name / "reference_logps.jsonl")
        assert fresh and fresh <= values(rerun / "04_training" / name / "reference_logps.jsonl")

    # (a smaller world than the smoke run's, in both runs: what is compared is the rerun against the clean run)
    world = ["--set", "00_tiny_world.seed=1", "--set", "00_tiny_world.n_train=300", "--set", "00_tiny_world.n_samples=150",
             "--set", "00_tiny_world.tower_steps=20", "--set", "00_tiny_world.sft_steps=20", "--stage", "0", "--stage", "1"]
    rerun_world, clean_world = copy_run(smoke_chain, tmp_path / "rerun_world"), tmp_path / "clean_world"
    for run_dir in (rerun_world, clean_world):
        res = subprocess.run(chain_cmd(run_dir) + world, cwd=root, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _same_results(rerun_world, clean_world, under=("data/", "model/", "00_tiny_world/", "01_retrieval/"))
    old = (smoke_chain / "data" / "tiny_world" / "train_images" / "train_000000.png").read_bytes()
    assert (rerun_world / "data" / "tiny_world" / "train_images" / "train_000000.png").read_bytes() != old


FAKE_KEY = "sk-realign-FAKE-KEY-0f9e8d7c6b5a4d3c2b1a"  # recognisable, never a real key


def _files_holding(folder, secret: bytes) -> list[str]:
    """Every file under ``folder`` (any type, hidden ones too) whose bytes contain ``secret``."""
    from pathlib import Path

    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and secret in p.read_bytes())


@pytest.mark.slow
def test_chain_with_an_api_key_writes_it_nowhere(root, smoke_chain, tmp_path):
    """Stages 02-05 run again with masking and induction's fills through a local OpenAI-compatible
    server that demands a recognisable fake key (read from the environment only). Some requests are
    refused with an error body that quotes the key back, as real APIs do. Afterwards no file in the
    run folder — executed notebooks, metrics, configs, markers, failure records, logs — nor the
    runner's output holds the key; the server saw it on every request. Only stages 02-03 run (04-05
    never see a key; that the stages after a re-run stage run again is test_a_rerun_...'s to check);
    stage 03 runs again because stage 02 did, stages 00-01 are skipped."""
    import os
    import re

    from chat_server import ChatServer, Reply

    from realign_lib.masking.rule import RuleMasker
    from realign_lib.prompts import MASK_PROMPT

    rule = RuleMasker()
    refused = set()

    def respond(req):
        if req.image is None:  # a masking request: the paper's prompt, a blank line, the text
            text = req.text.split(MASK_PROMPT + "\n\n", 1)[1]
            if len(refused) < 3 and text not in refused:  # the first three texts asked for
                refused.add(text)  # a client error that quotes the key, as real APIs do
                return Reply(status=400, body=json.dumps({"error": {"message": f"bad request for key "
                                                                               f"{req.authorization[7:]}"}}))
            return Reply(content=rule.mask_batch([text])[0])
        masked = req.text.split("\n", 1)[1]  # a fill: completion prompt, newline, masked sentence
        return Reply(content=re.sub(r"\[MASK\]", "red cat", masked))

    # the smoke chain's folder as a starting point (stages 00 and 01 are reused, not rerun)
    run_dir = copy_run(smoke_chain, smoke_chain.parent / "run_with_key")
    env = {**os.environ, "REALIGN_TEST_KEY": FAKE_KEY}
    with ChatServer(respond, key=FAKE_KEY) as srv:
        cmd = chain_cmd(run_dir) + [
            "--set", "02_masking.backend=openai", "--set", f"02_masking.api_base_url={srv.url}",
            "--set", "02_masking.api_model=fake-masker", "--set", "02_masking.api_key_env=REALIGN_TEST_KEY",
            "--set", "03_induction.fill_backend=openai", "--set", "03_induction.fill_mode=instruction",
            "--set", f"03_induction.api_base_url={srv.url}", "--set", "03_induction.api_model=fake-vlm",
            "--set", "03_induction.api_key_env=REALIGN_TEST_KEY", "--stage", "0", "--stage", "1", "--stage", "2",
            "--stage", "3"]
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir / "runner_stdout.log").write_text(res.stdout)
    (run_dir / "runner_stderr.log").write_text(res.stderr)

    assert srv.requests and all(r.authorization == f"Bearer {FAKE_KEY}" for r in srv.requests)
    assert {r.image is None for r in srv.requests} == {True, False}  # masking and fills both went through it
    assert "[00_tiny_world] complete" in res.stdout and "[01_retrieval] complete" in res.stdout
    assert "[03_induction] an earlier stage ran again since: running again" in res.stdout
    failures = [json.loads(x) for x in open(run_dir / "02_masking" / "masking_failures.jsonl")]
    quoted = [f for f in failures if f["reason"] == "api_error"]
    assert len(quoted) == len(refused) > 0 and all("***" in f["detail"] for f in quoted)  # the key, scrubbed
    assert json.loads((run_dir / "03_induction" / "metrics.json").read_text())["fill_backend"] == "openai"

    assert _files_holding(run_dir, FAKE_KEY.encode()) == []
    assert FAKE_KEY not in res.stdout + res.stderr
    # the scan can fail: a file holding the key is found
    (tmp_path / "leak").mkdir()
    (tmp_path / "leak" / ".hidden.json").write_text(json.dumps({"k": FAKE_KEY}))
    assert _files_holding(tmp_path / "leak", FAKE_KEY.encode()) == [str(tmp_path / "leak" / ".hidden.json")]


@pytest.mark.slow
def test_notebooks_opened_from_their_folder_find_the_run_and_show_their_figures(root, smoke_chain, tmp_path,
                                                                                 monkeypatch):
    """A student's path: the kernel starts in notebooks/, run_dir is relative. Each stage notebook, run by
    hand (not under `realign run`), finds the run under $REALIGN_HOME (else the repository root) and its
    executed copy holds an image for every figure cell. Notebook 03 is the one opened on a run that has
    only stage 00: it builds the missing stages 01-02 in the small setting (one `realign run` call), goes
    on, and shows its figures too."""
    import papermill as pm

    from realign_lib.run import nbstore
    from realign_lib.run.config import load_config
    from realign_lib.run.workspace import CHAIN_ENV

    cfg = load_config(root / "configs" / "tiny_world_smoke.yaml")
    home = tmp_path / "home"
    copy_run(smoke_chain, home / "runs" / "student")
    monkeypatch.setenv("REALIGN_HOME", str(home))
    monkeypatch.delenv(CHAIN_ENV, raising=False)
    for name in ("00_tiny_world", "01_retrieval", "02_masking", "04_training", "05_evaluation"):  # 03: below
        out = tmp_path / f"{name}.ipynb"
        # the run's own settings (so each stage resumes its finished work), with a relative run_dir
        params = dict(cfg.parameters("04_training/rdpo_seed0" if name == "04_training" else name), run_dir="runs/student")
        pm.execute_notebook(str(root / "notebooks" / f"{name}.ipynb"), str(out), kernel_name="python3",
                            parameters=params, cwd=str(root / "notebooks"), progress_bar=False)
        figures = nbstore.figure_cells(json.loads(out.read_text()))
        assert figures and all(shown for _, shown in figures), (name, [f for f, shown in figures if not shown])
    assert not (root / "notebooks" / "runs").exists(), "a relative run_dir was resolved against the kernel's folder"
    assert (home / "runs" / "student" / "05_evaluation" / "metrics.json").is_file()

    partial = copy_run(smoke_chain, home / "runs" / "partial", only=["data", "model", "00_tiny_world"])
    marker_00 = (partial / "00_tiny_world" / ".done.json").read_bytes()
    out = tmp_path / "03_alone.ipynb"
    pm.execute_notebook(str(root / "notebooks" / "03_induction.ipynb"), str(out), kernel_name="python3",
                        parameters=dict(cfg.parameters("03_induction"), run_dir="runs/partial"),
                        cwd=str(root / "notebooks"), progress_bar=False)
    assert (partial / "01_retrieval" / ".done.json").is_file() and (partial / "02_masking" / ".done.json").is_file()
    assert (partial / "00_tiny_world" / ".done.json").read_bytes() == marker_00  # stage 00 was there: not rebuilt
    assert sum(1 for _ in open(partial / "03_induction" / "preferences.jsonl")) > 10
    text = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert "building stages 01, 02 in the small setting" in text
    figures = nbstore.figure_cells(json.loads(out.read_text()))
    assert figures and all(shown for _, shown in figures), [f for f, shown in figures if not shown]
