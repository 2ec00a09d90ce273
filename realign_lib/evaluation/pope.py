"""POPE: read the official question files, answer them, and score exactly as the official scorer.

Question files (official format, one JSON object a line)::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

Answer files (as LLaVA's ``model_vqa_loader`` writes them): one JSON object a line with
``question_id`` and ``text`` (the model's raw answer), plus ``prompt`` and ``model_id``.

Scoring follows POPE's ``evaluate.py``: keep the text before the first ``.``, drop commas, split
on spaces; the answer is "no" if the words contain ``No``, ``not`` or ``no``, else "yes". "yes"
is the positive class. Unlike the official script, answers are joined to questions by
``question_id`` (not by line order), and a division by zero gives 0.0 instead of a crash.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from realign_lib.files import append_jsonl, check_settings, iter_jsonl, read_appended, safe_join, write_jsonl

__all__ = ["POPE_SPLITS", "find_pope_files", "load_pope_questions", "parse_yes_no", "answer_kind", "score_pope",
           "join_answers", "answer_pope", "evaluate_pope"]

POPE_SPLITS = ("random", "popular", "adversarial")


def find_pope_files(folder: str | os.PathLike) -> dict[str, str]:
    """``split → path`` for the question files in ``folder`` named ``*_<split>.json`` (official names
    ``coco_pope_random.json`` …; the tiny world's ``tiny_pope_random.json`` …), in POPE's split order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"POPE folder {folder} not found")
    out = {}
    for split in POPE_SPLITS:
        hits = sorted(folder.glob(f"*_{split}.json")) + sorted(folder.glob(f"*_{split}.jsonl"))
        if len(hits) > 1:
            raise ValueError(f"{folder}: several {split} question files ({', '.join(h.name for h in hits)}); "
                             f"keep one per split")
        if hits:
            out[split] = str(hits[0])
    if not out:
        raise FileNotFoundError(f"{folder}: no POPE question files named *_random.json, *_popular.json or "
                                f"*_adversarial.json")
    return out


def load_pope_questions(path: str | os.PathLike) -> list[dict]:
    """Read a POPE question file; errors name the line of a bad record or duplicate id."""
    path = Path(path)
    out, seen = [], {}
    for lineno, rec in enumerate(iter_jsonl(path), 1):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {lineno} lacks {', '.join(missing)}; POPE lines need "
                             f"question_id, image, text and label")
        if rec["label"] not in ("yes", "no"):
            raise ValueError(f"{path}: record {lineno} has label {rec['label']!r}; expected 'yes' or 'no'")
        qid = rec["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise ValueError(f"{path}: record {lineno} has question_id {qid!r}; it must be a number or text "
                             f"(answers are joined by it)")
        for key in ("image", "text"):
            if not isinstance(rec[key], str) or not rec[key].strip():
                raise ValueError(f"{path}: record {lineno} (question_id {qid!r}) has {key} {rec[key]!r}; it must be "
                                 f"non-empty text")
        if qid in seen:
            raise ValueError(f"{path}: duplicate question_id {qid!r} at records {seen[qid]} and {lineno}; "
                             f"answers are joined by id, so ids must be unique")
        seen[qid] = lineno
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def parse_yes_no(text: str) -> str:
    """The official POPE rule: first sentence, commas dropped, "no" if it has the word No/not/no."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def answer_kind(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``: whether an answer's first sentence says yes or no at all.

    The official rule (:func:`parse_yes_no`) scores every answer without a no-word as *yes*, so a
    model that rambles ("A cat.") is silently counted as answering yes; this separates those
    answers so they can be counted and reported (the score itself stays the official one).
    """
    head = text.split(".")[0] if "." in text else text
    words = {w.strip(",!?;:\"'").lower() for w in head.split()}
    if words & {"no", "not"}:
        return "no"
    return "yes" if "yes" in words else "other"


def score_pope(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (yes = positive) and yes-ratio of parsed predictions.

    ``labels`` and ``predictions`` are "yes"/"no" strings of equal length. Figures are fractions
    in [0, 1]; ``n`` is the number of questions.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("nothing to score")
    tp = sum(lab == "yes" and p == "yes" for lab, p in zip(labels, predictions))
    tn = sum(lab == "no" and p == "no" for lab, p in zip(labels, predictions))
    fp = sum(lab == "no" and p == "yes" for lab, p in zip(labels, predictions))
    fn = sum(lab == "yes" and p == "no" for lab, p in zip(labels, predictions))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in predictions) / len(predictions),
            "tp": tp, "tn": tn, "fp": fp, "fn": fn, "n": len(labels)}


def join_answers(questions: list[dict], answers: list[dict], source: str = "answers") -> list[tuple[dict, str]]:
    """Pair each question with its answer text by ``question_id``; every question must be answered."""
    by_id: dict = {}
    for i, a in enumerate(answers, 1):
        if "question_id" not in a:
            raise ValueError(f"{source}: record {i} has no question_id")
        if not isinstance(a["question_id"], (int, str)) or isinstance(a["question_id"], bool):
            raise ValueError(f"{source}: record {i} has question_id {a['question_id']!r}; it must be a number or text")
        text = a.get("text", a.get("answer"))
        if text is None:
            raise ValueError(f"{source}: record {i} (question_id {a['question_id']!r}) has no 'text' or 'answer'")
        by_id[a["question_id"]] = str(text)
    missing = [q["question_id"] for q in questions if q["question_id"] not in by_id]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(questions)} questions have no answer "
                         f"(first ids: {missing[:5]}); rerun answering to complete the file")
    return [(q, by_id[q["question_id"]]) for q in questions]


def answer_pope(model, processor, questions: list[dict], image_root: str | os.PathLike, out_path: str | os.PathLike,
                batch_size: int = 32, suffix: str = "", max_new_tokens: int = 8, model_id: str = "",
                progress: bool = False, model_key=None) -> list[dict]:
    """Answer POPE questions greedily, appending to ``out_path`` as JSON lines; resumes a partial file.

    ``suffix`` is appended to each question on a new line, as LLaVA's and lmms-eval's POPE prompt
    does (``question + "\nAnswer the question using a single word or phrase."``,
    :data:`realign_lib.prompts.LMMS_EVAL_SUFFIX`); a suffix that starts with whitespace is appended as it is.

    An answer is resumed only if it was made by the same model for the same prompt and image file:
    ``model_key`` (default :func:`~realign_lib.cache.model_identity` of ``model``: folder,
    weights, dtype; pass your own for weights that are not a folder's, e.g. a merged adapter) and
    ``max_new_tokens`` are kept in ``<answers>.settings.json`` (other ones: every answer is made
    again), and each answer line holds its ``prompt`` and ``image``.
    """
    from realign_lib.models.vlm import generate

    out_path = Path(out_path)
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"POPE image folder {root} not found (COCO val2014 for the official files)")
    images = {}
    for q in questions:
        images[q["question_id"]] = safe_join(root, q["image"], f"POPE question {q['question_id']!r}")
    missing = sorted({str(p.name) for p in images.values() if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of these POPE questions are not in {root} (first: "
                                f"{', '.join(missing[:3])}); point image_root at the folder that holds them "
                                f"(COCO val2014 for the official files)")
    if model_key is None:
        from realign_lib.cache import model_identity
        model_key = model_identity(model)
    check_settings(out_path.with_name(out_path.stem + ".settings.json"),
                   {"model": model_key, "max_new_tokens": max_new_tokens}, [out_path], log=lambda _: None)

    def prompt(q):
        return q["text"] + (suffix if not suffix or suffix[0].isspace() else f"\n{suffix}")

    expected = {q["question_id"]: (prompt(q), str(q["image"])) for q in questions}
    answers = read_appended(out_path)  # a kill's half-written last line is cut
    kept = [a for a in answers if expected.get(a["question_id"]) == (a.get("prompt"), a.get("image"))
            or a["question_id"] not in expected]
    if len(kept) != len(answers):  # answers to another prompt or image under these ids: asked again
        write_jsonl(out_path, kept)
    done = {a["question_id"] for a in kept}
    todo = [q for q in questions if q["question_id"] not in done]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        prompts = [prompt(q) for q in chunk]
        texts = generate(model, processor, [images[q["question_id"]] for q in chunk], prompts,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        append_jsonl(out_path, [{"question_id": q["question_id"], "prompt": p, "text": t, "model_id": model_id,
                                 "image": str(q["image"])} for q, p, t in zip(chunk, prompts, texts)])
        if progress:
            print(f"  {out_path.name}: {len(done) + s + len(chunk)}/{len(questions)} answered", flush=True)
    return read_appended(out_path)


def evaluate_pope(model, processor, question_files: dict[str, str], image_root: str | os.PathLike,
                  out_dir: str | os.PathLike, batch_size: int = 32, suffix: str = "", model_id: str = "",
                  progress: bool = False, model_key=None) -> dict[str, dict]:
    """Answer and score every split in ``question_files`` (split → path); answers go to ``out_dir``
    (resumed as :func:`answer_pope` says)."""
    out_dir = Path(out_dir)
    metrics = {}
    for split, qfile in question_files.items():
        qs = load_pope_questions(qfile)
        ans = answer_pope(model, processor, qs, image_root, out_dir / f"pope_{split}_answers.jsonl",
                          batch_size=batch_size, suffix=suffix, model_id=model_id, progress=progress,
                          model_key=model_key)
        pairs = join_answers(qs, ans, source=str(out_dir / f"pope_{split}_answers.jsonl"))
        metrics[split] = score_pope([q["label"] for q, _ in pairs], [parse_yes_no(t) for _, t in pairs])
        metrics[split]["other_answers"] = sum(answer_kind(t) == "other" for _, t in pairs)
    return metrics
