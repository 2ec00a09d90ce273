"""Stage 5: MME in its official layout, CHAIR-style caption checks, and the comparison over seeds.

POPE lives in :mod:`realign_lib.pope`. This module adds

* **MME**. The benchmark ships one folder per subtask, in one of two layouts:
  images and their question files side by side (``existence/000000006040.jpg`` +
  ``existence/000000006040.txt``), or ``<subtask>/images/`` + ``<subtask>/questions_answer_YN/``.
  A question file holds ``question<TAB>answer`` lines (two per image: one Yes, one No).
  :func:`write_mme_results` writes what MME's own ``eval_tool/calculation.py`` reads — one
  ``<subtask>.txt`` per subtask with ``image<TAB>question<TAB>gt<TAB>prediction`` lines, an
  image's two questions on consecutive lines — and :func:`score_mme_results` scores those files
  by the same rule: lower-case; exactly ``yes``/``no``, else ``yes`` / ``no`` within the first four
  characters (in that order), else ``other`` (wrong); per subtask ``acc·100 + acc+·100`` where
  acc+ is the share of images with both questions right; perception and cognition totals are
  sums over the subtasks present.
* **Answer-format compliance**: the share of answers that are a bare "yes"/"no" (an optional
  final full stop allowed). DPO-trained models are known to drift from the short-answer format.
* **The comparison** of conditions over seeds: mean ± sd per metric and paired differences
  (same seed) against a baseline condition, with how many seeds agree in sign.
* **One model's evaluation**, cached: :func:`evaluate_model` answers and scores POPE, MME and
  CHAIR for one model under an :class:`EvaluationSetup`, keyed by a fingerprint of its weights and
  the settings, resumable from its answer files.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .files import append_jsonl, read_appended, read_text

__all__ = [
    "MME_PERCEPTION", "MME_COGNITION", "IMAGE_SUFFIXES", "load_mme", "parse_mme_answer", "clean_prediction",
    "is_compliant", "answer_mme", "write_mme_results", "score_mme_file", "score_mme_results",
    "flat_metrics", "condition_of", "summarize_conditions", "paired_differences", "format_table",
    "EvaluationSetup", "load_for_evaluation", "evaluate_model", "format_differences",
]

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
    from .vlm import generate

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


# --------------------------------------------------------------------------- the comparison
def flat_metrics(m: dict) -> dict[str, float]:
    """One flat ``name → value`` dict from an evaluation's ``metrics.json`` (what the table shows).

    POPE figures in percent (``pope/<split>/accuracy`` …, yes-ratio, the absent-partner yes-rate, the
    share of answers that say neither yes nor no),
    MME scores (per subtask, perception total, compliance in percent), CHAIR in percent.
    """
    out: dict[str, float] = {}
    for split, r in (m.get("pope") or {}).items():
        for k in ("accuracy", "f1", "yes_ratio", "precision", "recall"):
            if k in r:
                out[f"pope/{split}/{k}"] = 100 * r[k]
        if "other_answers" in r and r.get("n"):  # answers saying neither yes nor no (scored "yes" officially)
            out[f"pope/{split}/neither_yes_no"] = 100 * r["other_answers"] / r["n"]
    for split, r in (m.get("pope_partner") or {}).items():
        for k in ("absent_partner_yes_rate", "absent_other_yes_rate"):
            if r.get(k) is not None and r[k] == r[k]:
                out[f"pope/{split}/{k}"] = 100 * r[k]
    mme = m.get("mme") or {}
    for task, r in (mme.get("tasks") or {}).items():
        out[f"mme/{task}"] = r["score"]
    for k in ("perception", "cognition"):
        if mme.get("tasks") and any(t in (MME_PERCEPTION if k == "perception" else MME_COGNITION)
                                    for t in mme["tasks"]):
            out[f"mme/{k}"] = mme[k]
    if "compliance" in mme:
        out["mme/compliance"] = 100 * mme["compliance"]
    for k in ("chair_i", "chair_s", "recall"):
        if (m.get("chair") or {}).get(k) is not None:
            out[f"chair/{k}"] = 100 * m["chair"][k]
    return out


def condition_of(name: str) -> tuple[str, int | None]:
    """``"rdpo_seed2"`` → ``("rdpo", 2)``; a name without a ``_seed<k>`` suffix → ``(name, None)``."""
    mt = re.fullmatch(r"(.+)_seed(\d+)", name)
    return (mt.group(1), int(mt.group(2))) if mt else (name, None)


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return mean, sd


def summarize_conditions(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """``rows``: ``{"condition", "seed", "metrics": flat}`` → ``condition → metric → {mean, sd, n}``."""
    by: dict[str, dict[str, list]] = {}
    for r in rows:
        for k, v in r["metrics"].items():
            by.setdefault(r["condition"], {}).setdefault(k, []).append(v)
    out = {}
    for cond, ms in by.items():
        out[cond] = {}
        for k, vs in ms.items():
            mean, sd = _mean_sd(vs)
            out[cond][k] = {"mean": mean, "sd": sd, "n": len(vs)}
    return out


def paired_differences(rows: Sequence[dict], condition: str, baseline: str) -> dict[str, dict]:
    """Per metric, ``condition − baseline`` paired by seed: mean, sd, n and seeds agreeing in sign.

    A baseline without seeds (the base model, evaluated once) pairs with every seed. ``clear`` is
    True when every paired difference has the same sign and the mean exceeds twice its standard
    error — a plain, conservative reading for 3–5 seeds, not a significance test.
    """
    base = {r["seed"]: r["metrics"] for r in rows if r["condition"] == baseline}
    out = {}
    for r in rows:
        if r["condition"] != condition:
            continue
        b = base.get(r["seed"], base.get(None))
        if b is None:
            continue
        for k, v in r["metrics"].items():
            if k in b:
                out.setdefault(k, []).append(v - b[k])
    res = {}
    for k, ds in out.items():
        mean, sd = _mean_sd(ds)
        n = len(ds)
        same_sign = max(sum(d > 0 for d in ds), sum(d < 0 for d in ds))
        se = sd / math.sqrt(n) if n > 1 and sd == sd else float("nan")
        res[k] = {"mean": mean, "sd": sd, "n": n, "same_sign": same_sign, "diffs": ds,
                  "clear": bool(n > 1 and same_sign == n and se == se and abs(mean) > 2 * se)}
    return res


def format_table(summary: dict[str, dict[str, dict]], metrics: Sequence[str], conditions: Sequence[str],
                 digits: int = 1) -> str:
    """A Markdown table: one row per condition, ``mean ± sd (n)`` per metric."""
    head = "| condition | " + " | ".join(metrics) + " |"
    rows = [head, "| --- |" + " ---: |" * len(metrics)]
    for c in conditions:
        cells = []
        for m in metrics:
            s = summary.get(c, {}).get(m)
            if s is None or s["mean"] != s["mean"]:
                cells.append("–")
            elif s["n"] > 1 and s["sd"] == s["sd"]:
                cells.append(f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}")
            else:
                cells.append(f"{s['mean']:.{digits}f}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)



# ------------------------------------------------------------------- one model, answered once
@dataclass
class EvaluationSetup:
    """What stage 05 evaluates every model on, fixed once per stage.

    ``questions``: POPE split → question records (a prefix of each file with ``max_questions``);
    ``pope_files``: split → the question file they came from (hashed once, here, for every model's
    fingerprint); ``image_root``: the POPE images; ``suffix``: text appended to each POPE question;
    ``mme_records``/``mme_dir``: MME subtask → records and the folder they came from (empty / None:
    no MME); ``scenes``: the tiny world's ground truth of the evaluated images (empty for real data:
    no partner yes-rate), ``chair_scenes`` the ones described for CHAIR, whose images are in
    ``chair_image_dir``; ``base_path``/``train_dir``: the base model and stage 04's runs;
    ``base_answers``: a folder of stage 00's POPE answers by the same base model to the same
    questions and prompt (``pope_<split>_answers.jsonl``), reused instead of answering again.
    """
    base_path: Path
    train_dir: Path
    questions: dict[str, list[dict]]
    pope_files: dict[str, str]
    image_root: Path
    suffix: str = ""
    mme_records: dict[str, list[dict]] = field(default_factory=dict)
    mme_dir: Path | None = None
    scenes: Sequence = ()
    chair_scenes: Sequence = ()
    chair_image_dir: Path | None = None
    batch_size: int = 64
    base_answers: Path | None = None
    pope_digests: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        from .fingerprints import file_sha256

        self.pope_digests = {s: [str(p), file_sha256(p)] for s, p in self.pope_files.items()}

    def model_dir(self, name: str) -> Path:
        """The folder of model ``name``: the base model's for ``"base"``, else ``train_dir/name``."""
        return Path(self.base_path) if name == "base" else Path(self.train_dir) / name

    def fingerprint(self, name: str) -> dict:
        """What model ``name``'s evaluation depends on: its weights' bytes
        (:func:`~realign_lib.fingerprints.weights_sha256`) and every evaluation setting."""
        from .fingerprints import weights_sha256

        folder = self.model_dir(name)
        return {"model": str(folder), "weights_sha256": weights_sha256(folder) if folder.exists() else str(folder),
                "base": str(self.base_path), "pope": self.pope_digests, "image_root": str(self.image_root),
                "suffix": self.suffix, "mme": str(self.mme_dir),
                "mme_questions": sum(map(len, self.mme_records.values())), "n_chair": len(self.chair_scenes)}


def load_for_evaluation(setup: EvaluationSetup, name: str):
    """``(model, processor)`` of model ``name``: the base model, a stage-04 LoRA adapter merged into
    it (same outputs, faster), or a stage-04 full model."""
    from .vlm import load_vlm

    folder = setup.model_dir(name)
    if name == "base":
        return load_vlm(folder)
    if (folder / "adapter_config.json").is_file():
        model, processor = load_vlm(setup.base_path, adapter=folder)
        return model.merge_and_unload().eval(), processor
    return load_vlm(folder)


def _reuse_base_answers(src_dir: Path, out: Path, questions: dict[str, list[dict]]) -> list[str]:
    """Copy stage 00's answers of the questions asked here (and their settings record, which
    :func:`~realign_lib.pope.answer_pope` checks) into ``out`` where no answer file is yet."""
    from .files import read_jsonl, write_jsonl

    reused = []
    for split, qs in questions.items():
        src, dst = src_dir / f"pope_{split}_answers.jsonl", out / f"pope_{split}_answers.jsonl"
        if src.is_file() and not dst.exists():
            ids = {q["question_id"] for q in qs}
            write_jsonl(dst, [a for a in read_jsonl(src) if a["question_id"] in ids])
            settings = src.with_name(src.stem + ".settings.json")
            if settings.is_file():
                shutil.copy2(settings, dst.with_name(dst.stem + ".settings.json"))
            reused.append(str(src))
    return reused


def evaluate_model(setup: EvaluationSetup, name: str, out_dir: str | os.PathLike) -> dict:
    """Answer and score POPE, MME and CHAIR for model ``name``; files in ``out_dir``; the metrics.

    Writes ``pope_<split>_answers.jsonl``, ``mme_answers.jsonl``, ``mme/<subtask>.txt``,
    ``descriptions.jsonl``, ``fingerprint.json`` and ``metrics.json`` (returned: ``model``,
    ``fingerprint``, ``seconds``, ``reused`` when stage 00's answers were, ``pope`` split → POPE
    scores, ``pope_partner`` split → tiny-world partner yes-rates, ``mme``, ``chair``).

    Cached and resumable: a ``metrics.json`` with this :meth:`EvaluationSetup.fingerprint` is
    returned as it is (the model is not even loaded); answers made under another fingerprint are
    deleted first; answer files are appended batch by batch, so a killed evaluation continues
    where it stopped.
    """
    from . import pope
    from . import tinyworld_eval as twe
    from .files import read_json, write_json
    from .prompts import DESCRIBE_PROMPT
    from .vlm import generate

    out = Path(out_dir)
    sig = setup.fingerprint(name)
    if (out / "metrics.json").is_file():
        old = read_json(out / "metrics.json")
        if old.get("fingerprint") == sig:
            return old
    if (out / "fingerprint.json").is_file() and read_json(out / "fingerprint.json") != sig:
        for f in list(out.glob("*.jsonl")) + list(out.glob("mme/*.txt")) + [out / "metrics.json"]:
            f.unlink(missing_ok=True)  # answers of other weights or settings: start over
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fingerprint.json", sig)
    t0 = time.time()
    model, processor = load_for_evaluation(setup, name)
    res = {"model": name, "fingerprint": sig, "seconds": {}}
    # POPE (the base model's answers from stage 00 are the same questions, prompt and weights: reused)
    t = time.time()
    if name == "base" and setup.base_answers is not None and Path(setup.base_answers).is_dir():
        reused = _reuse_base_answers(Path(setup.base_answers), out, setup.questions)
        if reused:
            res["reused"] = reused
    res["pope"], res["pope_partner"] = {}, {}
    for split, qs in setup.questions.items():
        path = out / f"pope_{split}_answers.jsonl"
        ans = pope.answer_pope(model, processor, qs, setup.image_root, path, batch_size=setup.batch_size,
                               suffix=setup.suffix, model_id=name,
                               model_key=None if name == "base" else sig)  # (merged adapters: not a folder's)
        pairs = pope.join_answers(qs, ans, source=str(path))
        preds = [pope.parse_yes_no(a) for _, a in pairs]
        res["pope"][split] = pope.score_pope([q["label"] for q, _ in pairs], preds)
        if setup.scenes:
            res["pope_partner"][split] = twe.partner_yes_rate([q for q, _ in pairs], preds, setup.scenes)
    res["seconds"]["pope"] = round(time.time() - t, 1)
    if setup.mme_records:
        t = time.time()
        answered = answer_mme(model, processor, setup.mme_records, out / "mme_answers.jsonl",
                              batch_size=setup.batch_size, model_id=name)
        write_mme_results(answered, out / "mme")
        res["mme"] = score_mme_results(out / "mme", tasks=list(setup.mme_records))
        res["seconds"]["mme"] = round(time.time() - t, 1)
    if setup.chair_scenes:
        t = time.time()
        cache = out / "descriptions.jsonl"
        texts = {r["id"]: r["text"] for r in read_appended(cache)}  # cuts a torn line
        todo = [s for s in setup.chair_scenes if s.id not in texts]
        if todo:
            outs = generate(model, processor, [Path(setup.chair_image_dir) / f"{s.id}.png" for s in todo],
                            [DESCRIBE_PROMPT] * len(todo), max_new_tokens=48, batch_size=setup.batch_size)
            append_jsonl(cache, [{"id": s.id, "text": o} for s, o in zip(todo, outs)])
            texts.update({s.id: o for s, o in zip(todo, outs)})
        res["chair"] = twe.caption_hallucination([texts[s.id] for s in setup.chair_scenes], setup.chair_scenes)
        res["seconds"]["chair"] = round(time.time() - t, 1)
    res["seconds"]["total"] = round(time.time() - t0, 1)
    write_json(out / "metrics.json", res)
    return res


def format_differences(diffs: dict[str, dict[str, dict]], metrics: Sequence[str]) -> str:
    """A Markdown table of :func:`paired_differences` results: one row per comparison (``label →
    metric → difference``), ``mean ± sd (seeds agreeing in sign/seeds)`` per metric, **bold** when clear."""
    rows = ["| comparison | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for label, d in diffs.items():
        cells = []
        for m in metrics:
            x = d.get(m)
            if x is None:
                cells.append("–")
            else:
                sd = f" ± {x['sd']:.1f}" if x["n"] > 1 and x["sd"] == x["sd"] else ""
                cells.append(f"{'**' if x['clear'] else ''}{x['mean']:+.1f}{sd}{'**' if x['clear'] else ''} "
                             f"({x['same_sign']}/{x['n']})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
