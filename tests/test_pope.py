"""POPE scoring agrees with the official evaluate.py, and the real question files load."""
import json
import random

import pytest

from realign_lib.evaluation import pope

ANSWERS = ["Yes.", "No.", "yes", "no", "No, there is not.", "There is a dog.", "", "Yes, there is a car.",
           "NO", "Not really.", "I see no car.", "Nope.", "no, it's absent", "The image shows a cat. No dog.",
           "Absolutely", "There is not any.", "yes . ", "no .", "No,there is not"]


def official_eval(answers, labels):
    """A literal transcription of POPE's evaluate.py (AoiDragon/POPE), kept as the oracle."""
    for answer in answers:
        text = answer["answer"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        if "No" in words or "not" in words or "no" in words:
            answer["answer"] = "no"
        else:
            answer["answer"] = "yes"
    label_list = [1 if lab == "yes" else 0 for lab in labels]
    pred_list = [0 if a["answer"] == "no" else 1 for a in answers]
    pos, neg = 1, 0
    yes_ratio = pred_list.count(1) / len(pred_list)
    TP = TN = FP = FN = 0
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1
        elif pred == pos and label == neg:
            FP += 1
        elif pred == neg and label == neg:
            TN += 1
        elif pred == neg and label == pos:
            FN += 1
    precision = float(TP) / float(TP + FP)
    recall = float(TP) / float(TP + FN)
    f1 = 2 * precision * recall / (precision + recall)
    acc = (TP + TN) / (TP + TN + FP + FN)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


def test_parse_matches_official_rule_on_varied_answers():
    expected = ["yes", "no", "yes", "no", "no", "yes", "yes", "yes", "yes", "yes", "no", "yes", "no", "yes",
                "yes", "no", "yes", "no", "no"]
    assert [pope.parse_yes_no(a) for a in ANSWERS] == expected


@pytest.mark.parametrize("seed", range(5))
def test_scores_equal_official_scorer(seed):
    rng = random.Random(seed)
    labels = [rng.choice(["yes", "no"]) for _ in range(200)]
    answers = [rng.choice(ANSWERS) for _ in range(200)]
    ours = pope.score_pope(labels, [pope.parse_yes_no(a) for a in answers])
    ref = official_eval([{"answer": a} for a in answers], labels)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k


def test_hand_computed_scores():
    m = pope.score_pope(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["yes_ratio"] == 0.5
    assert pope.score_pope(["no"], ["no"])["f1"] == 0.0  # no positives: 0, not a crash


@pytest.mark.parametrize("split", pope.POPE_SPLITS)
def test_real_pope_files_load_and_join_by_id(root, split):
    qs = pope.load_pope_questions(root / "data" / "pope" / f"coco_pope_{split}.json")
    assert len(qs) == 3000 and len({q["image"] for q in qs}) == 500
    assert sum(q["label"] == "yes" for q in qs) == 1500
    assert all(q["image"].startswith("COCO_val2014_") for q in qs)
    answers = [{"question_id": q["question_id"], "text": "Yes." if q["label"] == "yes" else "No, there is not."}
               for q in qs]
    random.Random(0).shuffle(answers)  # order must not matter: joined by id
    pairs = pope.join_answers(qs, answers)
    m = pope.score_pope([q["label"] for q, _ in pairs], [pope.parse_yes_no(t) for _, t in pairs])
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.5
    with pytest.raises(ValueError, match="2 of 3000 questions have no answer"):
        pope.join_answers(qs, answers[2:])


def test_bad_question_files_are_named(tmp_path):
    p = tmp_path / "q.json"
    rec = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}
    p.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="duplicate question_id 1 at records 1 and 2"):
        pope.load_pope_questions(p)
    p.write_text(json.dumps(rec) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"q.json:2: malformed JSON"):
        pope.load_pope_questions(p)
    p.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="lacks label"):
        pope.load_pope_questions(p)


def test_image_path_may_not_escape_root(tmp_path):
    from realign_lib.files import safe_join

    with pytest.raises(ValueError, match="q7: image path '../etc/passwd' leads outside the image folder"):
        safe_join(tmp_path, "../etc/passwd", "q7")
    with pytest.raises(ValueError, match="leads outside"):
        safe_join(tmp_path / "a", "/etc/passwd")
    assert safe_join(tmp_path, "x/../y.png") == (tmp_path / "y.png").resolve()
