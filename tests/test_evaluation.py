"""MME in its official layout and scoring rule, answer-format compliance, POPE file discovery, and
the seed-paired comparison maths."""
import math

import numpy as np
import pytest
from PIL import Image

from realign_lib.evaluation import pope
from realign_lib.evaluation import runner as ev
from realign_lib.evaluation.mme import clean_prediction, is_compliant, load_mme, parse_mme_answer, score_mme_file
from realign_lib.evaluation.stats import (
    answer_bias,
    better_direction,
    condition_of,
    describe_differences,
    flat_metrics,
    format_differences,
    format_table,
    paired_differences,
    summarize_conditions,
)

PREDICTIONS = ["Yes", "No", "yes.", "no .", "Yes, there is.", "No, there is not.", "Not sure", "nothing",
               "There is a dog.", "", "I think yes", "Nope", "YES!", "n", "yeah", "no\tway"]


def oracle_label(raw_line_prediction: str) -> str:
    """MME's rule applied as its calculation.py applies it: to the 4th field of a line read with
    ``readlines()`` (so it still ends in a newline), lower-cased, exact yes/no, else the first 4 chars."""
    p = raw_line_prediction.lower()
    if p in ("yes", "no"):
        return p
    if "yes" in p[:4]:
        return "yes"
    if "no" in p[:4]:
        return "no"
    return "other"


def oracle_scores(path):
    """acc·100 + acc+·100 computed the official way: readlines(), pairs of lines, split on tabs."""
    lines = open(path).readlines()
    correct = both = 0
    for i in range(0, len(lines), 2):
        ok = 0
        for ln in lines[i:i + 2]:
            _, _, gt, pred = ln.split("\t")
            ok += oracle_label(pred) == gt.lower()
        correct += ok
        both += ok == 2
    return 100 * correct / len(lines) + 100 * both / (len(lines) / 2)


def test_answer_parsing_matches_the_official_rule_on_raw_lines():
    for p in PREDICTIONS:
        clean = clean_prediction(p)
        assert parse_mme_answer(clean) == oracle_label(clean + "\n"), p
    assert [parse_mme_answer(p) for p in ("Not sure", "nothing", "", "n", "yeah", "I think yes")] == \
        ["no", "no", "other", "other", "other", "other"]


def test_compliance_counts_bare_yes_no_only():
    assert [is_compliant(p) for p in ("Yes", "no.", "yes .", " No ", "Yes, there is.", "yeah", "")] == \
        [True, True, True, True, False, False, False]


def _image(path):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


@pytest.fixture
def mme_side_by_side(tmp_path):
    """MME's first layout: <task>/<img>.png + <img>.txt (as the tiny world and e.g. MME/existence)."""
    root = tmp_path / "MME"
    for task in ("existence", "count"):
        (root / task).mkdir(parents=True)
        for k in range(3):
            _image(root / task / f"{task}_{k}.png")
            (root / task / f"{task}_{k}.txt").write_text(
                "Is there a cat in this image? Please answer yes or no.\tYes\n"
                "Is there a dog in this image? Please answer yes or no.\tNo\n")
    return root


def test_load_mme_reads_both_official_layouts(mme_side_by_side, tmp_path):
    recs = load_mme(mme_side_by_side)
    assert list(recs) == ["existence", "count"]  # MME's order, not alphabetical
    assert len(recs["existence"]) == 6 and [r["answer"] for r in recs["existence"][:2]] == ["Yes", "No"]
    assert recs["count"][0]["image"] == "count_0.png" and recs["count"][0]["image"] == recs["count"][1]["image"]
    # the second layout: <task>/images/ + <task>/questions_answer_YN/
    root = tmp_path / "MME2" / "artwork"
    (root / "images").mkdir(parents=True)
    (root / "questions_answer_YN").mkdir()
    _image(root / "images" / "10002.jpg")
    (root / "questions_answer_YN" / "10002.txt").write_text("Is this artwork by X?\tNo\nIs this artwork by Y?\tYes\n")
    recs2 = load_mme(tmp_path / "MME2")
    assert recs2["artwork"][0]["image_path"].endswith("images/10002.jpg") and len(recs2["artwork"]) == 2


@pytest.mark.parametrize("content,message", [
    ("Is there a cat?\tYes\nIs there a dog?\n", "expected 'question<TAB>answer'"),
    ("Is there a cat?\tYes\nIs there a dog?\tMaybe\n", "must be Yes or No"),
    ("Is there a cat?\tYes\nIs there a dog?\tYes\n", "one Yes and one No"),
])
def test_load_mme_refuses_bad_question_files(tmp_path, content, message):
    (tmp_path / "MME" / "existence").mkdir(parents=True)
    _image(tmp_path / "MME" / "existence" / "a.png")
    (tmp_path / "MME" / "existence" / "a.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_mme(tmp_path / "MME")


def test_load_mme_refuses_a_question_file_without_image_and_a_missing_folder(tmp_path):
    (tmp_path / "MME" / "existence").mkdir(parents=True)
    (tmp_path / "MME" / "existence" / "a.txt").write_text("q1\tYes\nq2\tNo\n")
    with pytest.raises(ValueError, match="no image a"):
        load_mme(tmp_path / "MME")
    with pytest.raises(FileNotFoundError, match="MME folder"):
        load_mme(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="subtask folder"):
        load_mme(tmp_path / "MME", tasks=["OCR"])


def test_result_files_have_the_official_layout_and_score_as_the_official_tool(mme_side_by_side, tmp_path):
    recs = load_mme(mme_side_by_side)
    rng = np.random.default_rng(0)
    answered = {t: [dict(r, prediction=str(rng.choice(PREDICTIONS))) for r in rs] for t, rs in recs.items()}
    answered["existence"][0]["prediction"] = "Yes\nthere is\ta cat"  # line breaks and tabs must not break the file
    paths = ev.write_mme_results(answered, tmp_path / "results")
    assert [p.name for p in paths] == ["existence.txt", "count.txt"]
    for p in paths:
        lines = p.read_text().splitlines()
        assert len(lines) == 6 and all(len(ln.split("\t")) == 4 for ln in lines)
        assert all(lines[i].split("\t")[0] == lines[i + 1].split("\t")[0] for i in range(0, 6, 2))
        assert {ln.split("\t")[2] for ln in lines} == {"Yes", "No"}
        assert score_mme_file(p)["score"] == pytest.approx(oracle_scores(p))
    s = ev.score_mme_results(tmp_path / "results")
    assert s["perception"] == pytest.approx(sum(oracle_scores(p) for p in paths)) and s["cognition"] == 0
    assert s["questions"] == 12 and 0 <= s["compliance"] <= 1


def test_mme_scores_by_hand(tmp_path):
    p = tmp_path / "color.txt"
    p.write_text("a.png\tq1\tYes\tyes\na.png\tq2\tNo\tno\n"       # both right
                 "b.png\tq1\tYes\tYes, it is\nb.png\tq2\tNo\tsure\n"  # one right, one "other"
                 "c.png\tq1\tNo\tyes\nc.png\tq2\tYes\tno\n")         # both wrong
    r = score_mme_file(p)
    assert r["acc"] == pytest.approx(3 / 6) and r["acc_plus"] == pytest.approx(1 / 3)
    assert r["score"] == pytest.approx(50 + 100 / 3) and r["other"] == 1
    assert r["compliance"] == pytest.approx(4 / 6)
    p.write_text("a.png\tq1\tYes\tyes\nb.png\tq2\tNo\tno\n")
    with pytest.raises(ValueError, match="not the two questions of one image"):
        score_mme_file(p)


def test_answer_mme_with_a_real_model_resumes(mme_side_by_side, tmp_path):
    from tests.support.tiny_models import tiny_llava

    model, proc = tiny_llava()
    recs = load_mme(mme_side_by_side)
    cache = tmp_path / "mme_answers.jsonl"
    first = ev.answer_mme(model, proc, {"existence": recs["existence"]}, cache, batch_size=4, max_new_tokens=3)
    assert len(cache.read_text().splitlines()) == 6
    both = ev.answer_mme(model, proc, recs, cache, batch_size=4, max_new_tokens=3)
    assert len(cache.read_text().splitlines()) == 12  # only the new subtask was answered
    assert [r["prediction"] for r in both["existence"]] == [r["prediction"] for r in first["existence"]]
    paths = ev.write_mme_results(both, tmp_path / "out")
    assert all(len(p.read_text().splitlines()) == 6 for p in paths)


def test_find_pope_files_on_the_real_question_files(root, tmp_path):
    files = pope.find_pope_files(root.parent / "shared" / "data" / "pope") if (
        root.parent / "shared" / "data" / "pope").is_dir() else None
    if files is not None:
        assert list(files) == ["random", "popular", "adversarial"]
        assert all(len(pope.load_pope_questions(p)) > 100 for p in files.values())
    with pytest.raises(FileNotFoundError, match="no POPE question files"):
        pope.find_pope_files(tmp_path)
    (tmp_path / "a_random.json").write_text("")
    (tmp_path / "b_random.json").write_text("")
    with pytest.raises(ValueError, match="several random"):
        pope.find_pope_files(tmp_path)


def test_paired_differences_and_summary_by_hand():
    rows = [{"condition": "base", "seed": None, "metrics": {"acc": 80.0}}]
    rows += [{"condition": "rdpo", "seed": s, "metrics": {"acc": v}} for s, v in enumerate([81.0, 82.0, 81.5])]
    rows += [{"condition": "dpo", "seed": s, "metrics": {"acc": v}} for s, v in enumerate([81.0, 80.0, 82.5])]
    summ = summarize_conditions(rows)
    assert summ["rdpo"]["acc"]["mean"] == pytest.approx(81.5) and summ["rdpo"]["acc"]["sd"] == pytest.approx(0.5)
    assert summ["base"]["acc"]["n"] == 1 and math.isnan(summ["base"]["acc"]["sd"])
    d = paired_differences(rows, "rdpo", "base")["acc"]  # the one base evaluation pairs with every seed
    assert d["diffs"] == [1.0, 2.0, 1.5] and d["same_sign"] == 3 and d["clear"]  # mean 1.5 > 2·0.5/√3
    d2 = paired_differences(rows, "rdpo", "dpo")["acc"]  # paired by seed: 0, +2, -1
    assert d2["diffs"] == [0.0, 2.0, -1.0] and d2["mean"] == pytest.approx(1 / 3) and not d2["clear"]
    table = format_table(summ, ["acc"], ["base", "rdpo", "dpo"])
    assert "| rdpo | 81.5 ± 0.5 |" in table and "| base | 80.0 |" in table
    assert condition_of("dpo_swap_seed12") == ("dpo_swap", 12) and condition_of("base") == ("base", None)


def test_flat_metrics_picks_percentages():
    m = {"pope": {"adversarial": {"accuracy": 0.75, "f1": 0.7, "yes_ratio": 0.6}},
         "pope_partner": {"adversarial": {"absent_partner_yes_rate": 0.5, "absent_other_yes_rate": float("nan")}},
         "mme": {"tasks": {"existence": {"score": 150.0}}, "perception": 150.0, "cognition": 0.0, "compliance": 0.9},
         "chair": {"chair_i": 0.2, "chair_s": 0.3, "recall": 0.6}}
    f = flat_metrics(m)
    assert f["pope/adversarial/accuracy"] == 75.0 and f["pope/adversarial/absent_partner_yes_rate"] == 50.0
    assert "pope/adversarial/absent_other_yes_rate" not in f and "mme/cognition" not in f
    assert f["mme/perception"] == 150.0 and f["mme/compliance"] == 90.0 and f["chair/chair_i"] == 20.0


def test_evaluate_model_caches_by_fingerprint_resumes_and_reuses_base_answers(tmp_path, monkeypatch):
    import json

    from realign_lib.cache import file_digest, model_identity, weights_digest
    from tests.support.tiny_models import save_tiny

    base = save_tiny("llava", tmp_path / "base")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    qfile = tmp_path / "pope" / "x_random.json"
    qfile.parent.mkdir()
    qs = [{"question_id": k, "image": f"im{k % 2}.png", "text": f"Is there a {o} in the image?",
           "label": "yes" if k % 2 else "no"} for k, o in enumerate(["star", "moon", "boat", "fish"])]
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    setup = ev.EvaluationSetup(base_path=base, train_dir=tmp_path / "04", questions={"random": qs},
                               pope_files={"random": str(qfile)}, image_root=images, batch_size=4)
    sig = setup.fingerprint("base")
    assert sig["model"] == model_identity(base) and sig["model"]["weights"] == weights_digest(base) is not None
    assert sig["pope"] == {"random": [str(qfile), file_digest(qfile)]} and sig["mme"] == "None"

    out = tmp_path / "05" / "base"
    res = ev.evaluate_model(setup, "base", out)
    assert res["pope"]["random"]["n"] == 4 and res["fingerprint"] == sig and "mme" not in res and "reused" not in res
    assert json.loads((out / "fingerprint.json").read_text()) == sig
    assert len((out / "pope_random_answers.jsonl").read_text().splitlines()) == 4

    def no_load(*_):
        raise AssertionError("a cached evaluation loaded the model")

    monkeypatch.setattr(ev, "load_for_evaluation", no_load)
    assert ev.evaluate_model(setup, "base", out) == json.loads((out / "metrics.json").read_text())
    monkeypatch.undo()

    # stage 00's answers to the same questions are reused (not asked again), with the same scores
    reused = ev.EvaluationSetup(base_path=base, train_dir=tmp_path / "04", questions={"random": qs[:3]},
                                pope_files={"random": str(qfile)}, image_root=images, batch_size=4, base_answers=out)
    again = ev.evaluate_model(reused, "base", tmp_path / "05b" / "base")
    assert again["reused"] == [str(out / "pope_random_answers.jsonl")] and again["pope"]["random"]["n"] == 3
    assert (tmp_path / "05b" / "base" / "pope_random_answers.jsonl").read_text().splitlines() == \
        (out / "pope_random_answers.jsonl").read_text().splitlines()[:3]

    # other settings: the old answers are dropped and the questions asked again with the new prompt
    changed = ev.EvaluationSetup(base_path=base, train_dir=tmp_path / "04", questions={"random": qs},
                                 pope_files={"random": str(qfile)}, image_root=images, batch_size=4,
                                 suffix="Answer with one word.")
    res2 = ev.evaluate_model(changed, "base", out)
    assert res2["fingerprint"]["suffix"] == "Answer with one word." != res["fingerprint"]["suffix"]
    prompts = [json.loads(x)["prompt"] for x in (out / "pope_random_answers.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and all(p.endswith("\nAnswer with one word.") for p in prompts)


def test_format_differences_marks_clear_ones():
    d = {"rdpo - base": {"acc": {"mean": 1.5, "sd": 0.5, "n": 3, "same_sign": 3, "clear": True},
                         "f1": {"mean": -0.2, "sd": float("nan"), "n": 1, "same_sign": 1, "clear": False}}}
    table = format_differences(d, ["acc", "f1", "chair"])
    assert table.splitlines()[2] == "| rdpo - base | **+1.5 ± 0.5** (3/3) | -0.2 (1/1) | – |"


def test_paired_differences_pair_within_each_world():
    """Rows with a group (a world) pair only with their own world's base model."""
    rows = [{"condition": "base", "seed": None, "group": 0, "metrics": {"f1": 70.0}},
            {"condition": "base", "seed": None, "group": 1, "metrics": {"f1": 50.0}}]
    rows += [{"condition": "rdpo", "seed": s, "group": g, "metrics": {"f1": base + 1.0 + 0.1 * s}}
             for g, base in ((0, 70.0), (1, 50.0)) for s in range(3)]
    d = paired_differences(rows, "rdpo", "base")["f1"]
    assert d["n"] == 6 and d["mean"] == pytest.approx(1.1) and d["clear"]  # not 70-50 mixed pairs


def test_reading_says_better_or_worse_by_the_metric_direction():
    assert better_direction("pope/adversarial/f1") == 1 and better_direction("chair/chair_i") == -1
    assert better_direction("pope/adversarial/absent_partner_yes_rate") == -1
    assert better_direction("pope/random/yes_ratio") == 0
    clear = lambda mean: {"mean": mean, "sd": 0.1, "n": 3, "same_sign": 3, "diffs": [mean] * 3, "clear": True}
    diffs = {"pope/adversarial/f1": clear(1.5), "pope/adversarial/absent_partner_yes_rate": clear(2.0),
             "pope/adversarial/yes_ratio": clear(-3.0), "chair/chair_i": clear(-1.0),
             "mme/perception": {**clear(4.0), "clear": False}}
    line = describe_differences("rdpo - base", diffs, list(diffs), {"pope/adversarial/yes_ratio": 60.0})
    assert "pope/adversarial/f1 +1.50 (better)" in line
    assert "absent_partner_yes_rate +2.00 (worse)" in line
    assert "yes_ratio -3.00 (better (closer to the label balance))" in line  # 60 → 57
    assert "chair/chair_i -1.00 (better)" in line and "mme/perception" not in line
    assert line.startswith("- rdpo - base: better on 3, worse on 1 clear metrics")
    line = describe_differences("rdpo - base", diffs, list(diffs), {"pope/adversarial/yes_ratio": 45.0})
    assert "yes_ratio -3.00 (worse (further from the label balance))" in line  # 45 → 42
    none = describe_differences("a - b", {"f1": {**clear(0.1), "clear": False}}, ["f1"])
    assert "neither better nor worse" in none
    assert answer_bias({"pope/random/yes_ratio": 52.0, "pope/adversarial/yes_ratio": 71.0,
                        "pope/adversarial/f1": 90.0}) == ["adversarial 71.0 %"]


def test_health_check_names_the_figures_outside_the_bounds(root):
    from realign_lib.evaluation import health
    qs = pope.load_pope_questions(root / "data" / "pope" / "coco_pope_adversarial.json")  # the real file
    fake = [{"question_id": i, "image": f"{i // 2}.png", "text": "q", "label": "yes" if i % 2 == 0 else "no"}
            for i in range(1000)]
    for questions in [q for q in (qs, fake) if q]:
        sub = health.pope_subset(questions, 100, seed=3)
        assert len(sub) == 100 and sum(q["label"] == "yes" for q in sub) == 50
        assert sub == health.pope_subset(questions, 100, seed=3) != health.pope_subset(questions, 100, seed=4)
    assert health.pope_subset(fake, 0) == fake
    good = {"accuracy": 0.78, "recall": 0.85, "yes_ratio": 0.55}
    assert health.health_problems({"random": good, "adversarial": {**good, "accuracy": 0.6}}) == []
    broken = {"random": {"accuracy": 0.53, "recall": 0.22, "yes_ratio": 0.19},
              "adversarial": {"accuracy": 0.5, "recall": 1.0, "yes_ratio": 1.0}}
    problems = health.health_problems(broken)
    assert problems == ["accuracy on random 53.0 % < 65 %", "recall on random 22.0 % < 50 %",
                        "yes-ratio on random 19.0 % outside 20-85 % (labels: 50 %)",
                        "yes-ratio on adversarial 100.0 % outside 20-85 % (labels: 50 %)"]
    msg = health.health_message(problems, {"sft_steps": 150}, ["sft_steps"], "health_check=false")
    assert "sft_steps=150" in msg and "Raise sft_steps" in msg and problems[0] in msg
