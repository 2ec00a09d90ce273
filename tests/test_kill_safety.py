"""Kill-safety: a real subprocess is SIGKILLed in the middle of tiny-VLM training (stage 00), induction,
rDPO training and evaluation
(masking: tests/test_masking.py::test_run_masking_survives_sigkill; the whole chain mid-stage-05:
tests/test_notebooks.py), then run again; its final outputs must equal an uninterrupted run's with
the same seed: same records, none duplicated, none missing.

Every job here is a real model: a random tiny LLaVA-1.5 saved to disk (so every process loads the
same weights), the packaged all-MiniLM-L6-v2 as judge, `python -m realign_lib.run.cli train` as trainer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realign_lib.files import read_appended, repair_jsonl_tail

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def kill_when(cmd, ready, root, timeout=300.0) -> None:
    """Start ``cmd``, SIGKILL its whole process group as soon as ``ready()`` holds; fail if it ended first."""
    proc = subprocess.Popen(cmd, cwd=root, env={**ENV, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.01)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert not finished_first, f"the job ended before it could be killed (rc {proc.returncode}):\n{out[-2000:]}"
    assert proc.returncode == -signal.SIGKILL


def run(cmd, root) -> str:
    res = subprocess.run(cmd, cwd=root, env={**ENV, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def n_lines(*paths: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths if p.is_file())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny LLaVA-1.5 saved with save_pretrained (safetensors)."""
    from tests.support.tiny_models import tiny_llava

    out = tmp_path_factory.mktemp("tiny_llava")
    model, processor = tiny_llava()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
    return folder


# ------------------------------------------------------------------------------- tiny VLM (stage 00)
TINY_JOB = """
import json, sys
from realign_lib.tinyworld import training as tv
from realign_lib.tinyworld.settings import TinyVLMConfig
world = json.load(open(sys.argv[1]))
cfg = TinyVLMConfig(tower_steps=30, sft_steps=30, tower_batch=16, sft_batch=8, seed=4, cpu_threads=1,
                    sft_restarts=2, sft_restart_steps=20)
# a check the model misses twice: two warm restarts follow instruction tuning
tv.train_tiny_vlm(world, sys.argv[2], cfg, checkpoint_every=5, check=lambda m, p, k: ["forced"] if k < 2 else [])
"""


def _saved(out: Path) -> dict | None:
    meta = out / "resume" / "state.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def test_tiny_vlm_killed_in_each_phase_resumes_to_the_same_weights(root, small_world, tmp_path):
    """Kill points: during vision-tower pre-training, then (rerun) during instruction tuning, then
    during the second warm restart. The last run finishes from the last saved state, with the same
    weights, loss log and record of checks and restarts as an uninterrupted run, and removes its
    resume folder."""
    from safetensors.torch import load_file

    world = tmp_path / "world.json"
    world.write_text(json.dumps(small_world))
    job = tmp_path / "tiny.py"
    job.write_text(TINY_JOB)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run([sys.executable, str(job), str(world), str(ref)], root)
    assert json.loads((ref / "tiny_vlm.json").read_text())["resumed_from"] is None

    cmd = [sys.executable, str(job), str(world), str(killed)]
    kill_when(cmd, lambda: (_saved(killed) or {}).get("step", 0) >= 10, root)
    first = _saved(killed)
    assert first["phase"] == "tower" and 10 <= first["step"] < 30, first
    kill_when(cmd, lambda: (_saved(killed) or {}).get("phase") == "sft" and _saved(killed)["step"] >= 10, root)
    second = _saved(killed)
    assert second["phase"] == "sft" and 10 <= second["step"] < 30, second
    assert not (killed / "tiny_vlm.json").exists() and not (killed / "model.safetensors").exists()
    kill_when(cmd, lambda: (_saved(killed) or {}).get("phase") == "restart2" and _saved(killed)["step"] >= 10, root)
    third = _saved(killed)
    assert third["phase"] == "restart2" and 10 <= third["step"] < 20, third
    assert [r["cycle"] for r in json.loads((killed / "tiny_vlm.json").read_text())["restarts"]] == [1]
    run(cmd, root)

    summary, reference = json.loads((killed / "tiny_vlm.json").read_text()), json.loads((ref / "tiny_vlm.json").read_text())
    assert summary["resumed_from"]["phase"] == "sft" and summary["resumed_from"]["step"] >= second["step"]
    assert [r["cycle"] for r in summary["restarts"]] == [r["cycle"] for r in reference["restarts"]] == [1, 2]
    assert summary["checks"] == reference["checks"] == [{"restarts": k, "missed": ["forced"] * (k < 2)} for k in range(3)]
    assert summary["weights"] == reference["weights"]
    assert not (killed / "resume").exists() and not (killed / ".restart_weights").exists()
    assert (killed / "train_log.jsonl").read_text() == (ref / "train_log.jsonl").read_text()
    a, b = load_file(ref / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_tiny_vlm_resume_state_is_ignored_under_another_config(tmp_path):
    from realign_lib.tinyworld.resume import ResumeState

    saved = ResumeState(tmp_path, {"seed": 0}, every=5)
    saved.save("tower", 5, {"step": 5, "w": torch.ones(3)})
    saved.save("tower", 10, {"step": 10, "w": torch.zeros(3)})
    assert [p.name for p in tmp_path.glob("*.pt")] == ["tower-10.pt"]  # older states are removed
    assert saved.latest()["step"] == 10 and torch.equal(saved.load("tower")["w"], torch.zeros(3))
    assert saved.load("sft") is None
    assert ResumeState(tmp_path, {"seed": 1}, every=5).latest() is None  # another config starts over
    (tmp_path / "tower-10.pt").unlink()
    assert saved.latest() is None  # a state file that is gone is not resumed from


# ------------------------------------------------------------------------------------------ induction
INDUCE_JOB = """
import sys
from pathlib import Path
from realign_lib.induction import loop as ind
from realign_lib.induction.fillers import MaskFiller
from realign_lib.induction.similarity import SentenceEncoder
from realign_lib.models import vlm

model_dir, image_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model, processor = vlm.load_vlm(model_dir, device="cpu")
filler = MaskFiller(model, processor, mode="slot", max_span_tokens=3, stop_margin=0.0, batch_size=4)
texts = ["a [MASK] is on the left of the [MASK] .", "there are [MASK] and one [MASK] in the picture .",
         "the [MASK] is to the right of a [MASK] .", "a [MASK] is on the [MASK] ."]
chosen = ["a red cat is on the left of the blue car .", "there are two dogs and one tree in the picture .",
          "the small house is to the right of a green ball .", "a white cup is on the table ."]
items = []
for i in range(32):
    cands = [ind.Candidate(r + 1, f"img{(i + r + 1) % 8}.png", str(image_dir / f"img{(i + r + 1) % 8}.png"))
             for r in range(3)]
    items.append(ind.Item(f"s{i:02d}", "describe the image in detail .", f"img{i % 8}.png", chosen[i % 4],
                          texts[i % 4], cands))
ind.induce(items, filler, SentenceEncoder(batch_size=8), tau=float(sys.argv[4]), out_path=out / "preferences.jsonl",
           skipped_path=out / "skipped.jsonl", signature={"model": "tiny"}, chunk_size=4, progress=False)
"""


TAU = "0.2"  # the random model's fills: some accepted at rank 1, some at rank 2, some skipped


def test_induction_killed_mid_stage_resumes_to_the_same_pairs(root, model_dir, images, tmp_path):
    """Kill point: after the first chunks of pairs were appended (fill and judge of a later chunk under
    way). The rerun skips the finished samples and ends byte-identical to an uninterrupted run."""
    job = tmp_path / "induce.py"
    job.write_text(INDUCE_JOB)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run([sys.executable, str(job), str(model_dir), str(images), str(ref), TAU], root)
    ref_p, ref_s = (ref / "preferences.jsonl").read_text(), (ref / "skipped.jsonl").read_text()
    assert ref_p.count("\n") + ref_s.count("\n") == 32 and ref_s  # some skipped, accepted at ranks 1 and 2:
    assert {json.loads(x)["rank"] for x in ref_p.splitlines()} == {1, 2}

    kill_when([sys.executable, str(job), str(model_dir), str(images), str(killed), TAU],
              lambda: n_lines(killed / "preferences.jsonl", killed / "skipped.jsonl") >= 8, root)
    done = read_appended(killed / "preferences.jsonl", repair=False) + read_appended(killed / "skipped.jsonl",
                                                                                      repair=False)
    assert 8 <= len(done) < 32
    run([sys.executable, str(job), str(model_dir), str(images), str(killed), TAU], root)
    assert (killed / "preferences.jsonl").read_text() == ref_p
    assert (killed / "skipped.jsonl").read_text() == ref_s


# ------------------------------------------------------------------------------------------- training
def _preferences(folder: Path, images: Path, n: int = 24) -> Path:
    prompts = ["what is in the image ?", "describe the picture", "what colour is the car ?", "is there a dog ?"]
    chosen = ["a red cat on the left .", "two dogs and a tree", "the car is blue .", "yes"]
    rejected = ["a blue dog on the right .", "one cat and a house", "the car is red .", "no there is not"]
    recs = [{"id": f"p{i:02d}", "prompt": prompts[i % 4], "images": [f"img{i % 8}.png"],
             "retrieved_image": f"img{(i + 3) % 8}.png", "chosen": chosen[i % 4], "rejected": rejected[i % 4]}
            for i in range(n)]
    path = folder / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _train_cmd(prefs, images, model_dir, out):
    sets = ["loss=rdpo", "max_steps=16", "save_steps=4", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
            "lora_r=4", "lora_alpha=8", "learning_rate=5e-3", "warmup_steps=0.0", "seed=3", "sft_weight=1.0"]
    return [sys.executable, "-m", "realign_lib.run.cli", "train", "--preferences", str(prefs), "--root", str(images),
            "--model", str(model_dir), "--output-dir", str(out)] + [x for s in sets for x in ("--set", s)]


def _adapter(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(root, model_dir, images, tmp_path):
    """Kill point: mid-training, right after checkpoint 4 of 16 steps was marked complete (the
    reference log-probs all cached, later steps under way). The rerun resumes from the last complete
    checkpoint (optimizer, scheduler, RNG, data position) and ends with the uninterrupted run's
    adapter weights and training log (every step once)."""
    from realign_lib.training.trainer import latest_checkpoint

    prefs = _preferences(tmp_path, images)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run(_train_cmd(prefs, images, model_dir, ref), root)
    assert not (ref / "checkpoints").exists()  # deleted after success

    kill_when(_train_cmd(prefs, images, model_dir, killed),
              lambda: (ck := latest_checkpoint(killed / "checkpoints")) is not None and int(ck.name[11:]) >= 4, root)
    ck = latest_checkpoint(killed / "checkpoints")
    assert ck is not None and 4 <= int(ck.name[11:]) < 16 and not (killed / "train_result.json").exists()
    repair_jsonl_tail(killed / "train_log.jsonl")
    logged_before = [r["step"] for r in read_appended(killed / "train_log.jsonl")]
    assert logged_before and max(logged_before) >= int(ck.name[11:])

    out = run(_train_cmd(prefs, images, model_dir, killed), root)
    assert f"resuming from {ck}" in out
    result = json.loads((killed / "train_result.json").read_text())
    assert result["resumed_from_step"] == int(ck.name[11:]) and result["steps"] == 16
    log_ref = read_appended(ref / "train_log.jsonl")
    log_res = read_appended(killed / "train_log.jsonl")
    assert [r["step"] for r in log_res] == list(range(1, 17)) == [r["step"] for r in log_ref]
    for a, b in zip(log_ref, log_res):
        for k in ("loss", "loss_dpo", "loss_vdpo", "rewards/margins", "rewards/visual_margins", "learning_rate"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    wa, wb = _adapter(ref), _adapter(killed)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not np.allclose(wa[next(k for k in wa if "lora_B" in k)], 0)  # training moved the adapter


def test_training_ignores_an_unfinished_checkpoint_and_a_torn_reference_cache(root, model_dir, images, tmp_path):
    """Kill points simulated on files: a checkpoint folder whose save was cut short (no completion mark)
    and a reference cache whose last line is half written. Neither is read as complete."""
    from realign_lib.training import trainer as preference_trainer
    from realign_lib.training.config import PreferenceConfig

    prefs = _preferences(tmp_path, images, n=8)
    out = tmp_path / "out"
    settings = {"loss": "rdpo", "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "lora_r": 4,
                "lora_alpha": 8, "learning_rate": 5e-3, "warmup_steps": 0.0, "seed": 1}
    cfg = PreferenceConfig(**settings)
    first = preference_trainer.train(prefs, model_dir, out, cfg, root=images, keep_checkpoints=True, log=lambda m: None)
    assert first["resumed_from_step"] is None
    cache = out / "reference_logps.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:5]) + lines[5][:20])  # 5 whole records + a torn one
    ck4 = out / "checkpoints" / "checkpoint-4"
    (ck4 / preference_trainer.CHECKPOINT_DONE).unlink()  # as if killed while checkpoint 4 was being written
    assert preference_trainer.latest_checkpoint(out / "checkpoints").name == "checkpoint-2"
    msgs = []
    again = preference_trainer.train(prefs, model_dir, out, cfg, root=images, log=msgs.append)
    assert again["resumed_from_step"] == 2 and any("checkpoint-2" in m for m in msgs)
    assert len(read_appended(cache)) == 8 and cache.read_text().endswith("\n")  # torn line cut, 3 recomputed
    assert again["final"]["loss"] == pytest.approx(first["final"]["loss"], rel=1e-4)
    # other settings: the checkpoints are not resumed from but discarded
    preference_trainer.train(prefs, model_dir, tmp_path / "out2", cfg, root=images, keep_checkpoints=True, log=lambda m: None)
    cfg2 = PreferenceConfig(**{**settings, "learning_rate": 1e-3})
    msgs = []
    third = preference_trainer.train(prefs, model_dir, tmp_path / "out2", cfg2, root=images, log=msgs.append)
    assert third["resumed_from_step"] is None and any("other settings" in m for m in msgs)


# ----------------------------------------------------------------------------------------- evaluation
EVAL_JOB = """
import json, sys
from pathlib import Path
from realign_lib.evaluation import mme, pope
from realign_lib.models import vlm

model_dir, world, out = Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
model, processor = vlm.load_vlm(model_dir, device="cpu")
metrics = pope.evaluate_pope(model, processor, world["pope"], world["test_images"], out, batch_size=8)
records = mme.load_mme(world["mme_root"])
answered = mme.answer_mme(model, processor, records, out / "mme_answers.jsonl", batch_size=8)
mme.write_mme_results(answered, out / "mme")
(out / "metrics.json").write_text(json.dumps({"pope": metrics, "mme": mme.score_mme_results(out / "mme")}))
"""


def test_evaluation_killed_mid_answering_resumes_to_the_same_answers_and_scores(root, model_dir, small_world,
                                                                                tmp_path):
    """Kill point: POPE answering under way (random split part answered). The rerun answers only the
    missing questions; answer files, MME result files and scores equal an uninterrupted run's."""
    job = tmp_path / "evaluate.py"
    job.write_text(EVAL_JOB)
    world = json.dumps({k: small_world[k] for k in ("pope", "test_images", "mme_root")})
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run([sys.executable, str(job), str(model_dir), world, str(ref)], root)
    probe = killed / "pope_random_answers.jsonl"
    kill_when([sys.executable, str(job), str(model_dir), world, str(killed)], lambda: n_lines(probe) >= 16, root)
    n_before = len(read_appended(probe, repair=False))
    n_questions = sum(1 for _ in open(small_world["pope"]["random"]))
    assert 16 <= n_before < n_questions
    run([sys.executable, str(job), str(model_dir), world, str(killed)], root)
    for name in sorted(p.name for p in ref.glob("*.jsonl")):
        recs = read_appended(killed / name)
        key = "question_id" if name.startswith("pope") else "question"
        assert len(recs) == len({json.dumps([r.get("task"), r.get("image"), r[key]]) for r in recs}), name
        assert sorted(map(json.dumps, recs)) == sorted(map(json.dumps, read_appended(ref / name))), name
    for f in sorted((ref / "mme").glob("*.txt")):
        assert (killed / "mme" / f.name).read_text() == f.read_text()
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
