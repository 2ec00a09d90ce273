"""MME in its official layout (stage 05).

The benchmark ships one folder per subtask, in one of two layouts: images and their question files
side by side (``existence/000000006040.jpg`` + ``existence/000000006040.txt``), or
``<subtask>/images/`` + ``<subtask>/questions_answer_YN/``. A question file holds
``question<TAB>answer`` lines (two per image: one Yes, one No). :func:`write_mme_results` writes
what MME's own ``eval_tool/calculation.py`` reads — one ``<subtask>.txt`` per subtask with
``image<TAB>question<TAB>gt<TAB>prediction`` lines, an image's two questions on consecutive lines —
and :func:`score_mme_results` scores those files by the same rule: lower-case; exactly
``yes``/``no``, else ``yes`` / ``no`` within the first four characters (in that order), else
``other`` (wrong); per subtask ``acc·100 + acc+·100`` where acc+ is the share of images with both
questions right; perception and cognition totals are sums over the subtasks present.

**Answer-format compliance** (:func:`is_compliant`): the share of answers that are a bare
"yes"/"no" (an optional final full stop allowed). DPO-trained models are known to drift from the
short-answer format.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from realign_lib.files import append_jsonl, read_appended, read_text

__all__ = ["MME_PERCEPTION", "MME_COGNITION", "IMAGE_SUFFIXES", "load_mme", "parse_mme_answer", "clean_prediction",
           "is_compliant", "answer_mme", "write_mme_results", "score_mme_file", "score_mme_results"]


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ------------------------------------------------------------------------------------------ MME
def _read_question_file(path: Path) -> list[tuple[str, str]]:
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'question<TAB>answer', got {len(parts)} field(s): {line[:80]!r}")
        q, a = parts[0].strip(), parts[1].strip()
        if a.lower() not in ("yes", "no"):
            raise ValueError(f"{path}:{lineno}: the answer must be Yes or No, got {a!r}")
        rows.append((q, a))
    return rows


def load_mme(root: str | os.PathLike, tasks: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Read an MME folder: ``subtask → [{"task", "image", "image_path", "question", "answer"}, ...]``.

    ``tasks``: subtasks to read (default: every folder under ``root`` that holds questions, in
    MME's order). Both official layouts are accepted (module docstring). An image's two questions
    stay consecutive; a question file without its image, a malformed line or an image whose
    questions are not one Yes and one No raise ``ValueError`` naming the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder {root} not found (it should hold one folder per subtask, "
                                f"e.g. existence/, count/)")
    known = list(MME_PERCEPTION + MME_COGNITION)
    present = [p.name for p in sorted(root.iterdir()) if p.is_dir()]
    if tasks is None:
        tasks = [t for t in known if t in present] + [t for t in present if t not in known]
    out: dict[str, list[dict]] = {}
    for task in tasks:
        folder = root / task
        if not folder.is_dir():
            raise FileNotFoundError(f"MME subtask folder {folder} not found; subtasks here: {', '.join(present)}")
        if (folder / "questions_answer_YN").is_dir():
            qdir, idir = folder / "questions_answer_YN", folder / "images"
        else:
            qdir = idir = folder
        records = []
        for qfile in sorted(qdir.glob("*.txt")):
            image = next((idir / (qfile.stem + s) for s in IMAGE_SUFFIXES if (idir / (qfile.stem + s)).is_file()),
                         None)
            if image is None:
                raise ValueError(f"{qfile}: no image {qfile.stem}.(jpg|jpeg|png) in {idir}")
            rows = _read_question_file(qfile)
            if sorted(a.lower() for _, a in rows) != ["no", "yes"]:
                raise ValueError(f"{qfile}: MME has two questions per image, one Yes and one No; "
                                 f"found answers {[a for _, a in rows]}")
            records += [{"task": task, "image": image.name, "image_path": str(image), "question": q, "answer": a}
                        for q, a in rows]
        if not records:
            raise ValueError(f"MME subtask {folder} holds no question files")
        out[task] = records
    if not out:
        raise ValueError(f"MME folder {root} holds no subtask folders (it should hold one folder per subtask, e.g. "
                         f"existence/, count/, each with question files); to skip MME, set mme_root to \"none\"")
    return out


def parse_mme_answer(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` by MME's official rule (lower-cased; exact, else first 4 chars)."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def clean_prediction(text: str) -> str:
    """One line of text: tabs and line breaks become spaces (the result files are TAB-separated lines)."""
    return re.sub(r"[\t\r\n]+", " ", text).strip()


def is_compliant(text: str) -> bool:
    """True for a bare yes/no answer ("Yes", "no.", "yes ." from a word-level tokenizer) — the
    short-answer format MME asks for."""
    return re.fullmatch(r"(yes|no)\s*\.?", text.strip().lower()) is not None


def answer_mme(model, processor, records: dict[str, list[dict]], cache_path: str | os.PathLike,
               batch_size: int = 32, max_new_tokens: int = 16, model_id: str = "",
               progress: bool = False) -> dict[str, list[dict]]:
    """Answer every MME question greedily; answers are appended to ``cache_path`` (JSON lines).

    Resumable: questions already in the cache (same task, image and question) are not asked
    again. Returns ``task → records`` with a ``"prediction"`` key added.
    """
    from realign_lib.models.vlm import generate

    cache_path = Path(cache_path)

    def key(r):
        return f"{r['task']}\t{r['image']}\t{r['question']}"

    done = {key(a): a["prediction"] for a in read_appended(cache_path)}  # a kill's half-written line is cut
    todo = [r for rs in records.values() for r in rs if key(r) not in done]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        texts = generate(model, processor, [r["image_path"] for r in chunk], [r["question"] for r in chunk],
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        rows = [{"task": r["task"], "image": r["image"], "question": r["question"], "prediction": t,
                 "model_id": model_id} for r, t in zip(chunk, texts)]
        append_jsonl(cache_path, rows)
        done.update({key(r): r["prediction"] for r in rows})
        if progress:
            print(f"  MME: {s + len(chunk)}/{len(todo)} answered", flush=True)
    return {t: [dict(r, prediction=done[key(r)]) for r in rs] for t, rs in records.items()}


def write_mme_results(answered: dict[str, list[dict]], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<out_dir>/<task>.txt`` per subtask in the layout MME's ``calculation.py`` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, rows in answered.items():
        lines = [f"{r['image']}\t{clean_prediction(r['question'])}\t{r['answer']}\t{clean_prediction(r['prediction'])}"
                 for r in rows]
        p = out_dir / f"{task}.txt"
        tmp = p.with_suffix(".txt.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(p)
        paths.append(p)
    return paths


def score_mme_file(path: str | os.PathLike) -> dict:
    """Score one ``<subtask>.txt``: acc, acc+, score (= 100·acc + 100·acc+), other answers, compliance."""
    path = Path(path)
    lines = [ln for ln in read_text(path).split("\n") if ln != ""]
    if len(lines) % 2:
        raise ValueError(f"{path}: {len(lines)} lines; MME result files hold two lines per image")
    correct = both = other = compliant = 0
    for i in range(0, len(lines), 2):
        pair_ok = 0
        images = set()
        for j, ln in enumerate(lines[i:i + 2], i + 1):
            parts = ln.split("\t")
            if len(parts) != 4:
                raise ValueError(f"{path}: line {j} has {len(parts)} fields, "
                                 f"expected image, question, gt, prediction")
            image, _, gt, pred = parts
            images.add(image)
            gt = gt.lower()
            if gt not in ("yes", "no"):
                raise ValueError(f"{path}: ground truth must be yes or no, got {gt!r}")
            label = parse_mme_answer(pred)
            other += label == "other"
            compliant += is_compliant(pred)
            pair_ok += label == gt
        if len(images) != 1:
            raise ValueError(f"{path}: lines {i + 1}-{i + 2} are not the two questions of one image: {sorted(images)}")
        correct += pair_ok
        both += pair_ok == 2
    n, n_img = len(lines), len(lines) // 2
    acc, acc_plus = correct / max(n, 1), both / max(n_img, 1)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus, "other": other,
            "compliance": compliant / max(n, 1), "questions": n, "images": n_img}


def score_mme_results(results_dir: str | os.PathLike, tasks: Iterable[str] | None = None) -> dict:
    """Score every ``<task>.txt`` in ``results_dir``: per task, perception / cognition totals, compliance."""
    results_dir = Path(results_dir)
    if tasks is None:
        tasks = [p.stem for p in sorted(results_dir.glob("*.txt"))]
    per = {t: score_mme_file(results_dir / f"{t}.txt") for t in tasks}
    n = sum(r["questions"] for r in per.values())
    return {
        "tasks": per,
        "perception": sum(r["score"] for t, r in per.items() if t in MME_PERCEPTION),
        "cognition": sum(r["score"] for t, r in per.items() if t in MME_COGNITION),
        "total": sum(r["score"] for r in per.values()),
        "compliance": sum(r["compliance"] * r["questions"] for r in per.values()) / max(n, 1),
        "other_rate": sum(r["other"] for r in per.values()) / max(n, 1),
        "questions": n,
    }


