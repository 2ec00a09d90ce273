"""One model's evaluation in stage 05, cached: :func:`evaluate_model` answers and scores POPE
(:mod:`realign_lib.evaluation.pope`), MME (:mod:`realign_lib.evaluation.mme`) and CHAIR
(:mod:`realign_lib.evaluation.runner.chair`) for one model under an :class:`EvaluationSetup`, keyed by
its identity and the settings (:mod:`realign_lib.cache`), resumable from its answer files.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from realign_lib.cache import file_digest, model_identity
from realign_lib.evaluation.chair import CHAIR_MAX_NEW_TOKENS, chair_scores, describe_images, partner_yes_rate
from realign_lib.evaluation.mme import answer_mme, score_mme_results, write_mme_results

__all__ = ["EvaluationSetup", "load_for_evaluation", "evaluate_model"]


# ------------------------------------------------------------------- one model, answered once
@dataclass
class EvaluationSetup:
    """What stage 05 evaluates every model on, fixed once per stage.

    ``questions``: POPE split → question records (a prefix of each file with ``max_questions``);
    ``pope_files``: split → the question file they came from (hashed once, here, for every model's
    fingerprint); ``image_root``: the POPE images; ``suffix``: text appended to each POPE question;
    ``mme_records``/``mme_dir``: MME subtask → records and the folder they came from (empty / None:
    no MME); ``present``: POPE image name → the objects in it, with ``lexicon`` (word → object) and
    ``partners`` (object → its usual companion) for the absent-partner yes-rate (empty for real data);
    ``chair_images`` the images described for CHAIR (:mod:`realign_lib.evaluation.chair`) and
    ``chair_present`` their objects; ``base_path``/``train_dir``: the base model and stage 04's runs;
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
    present: dict[str, Sequence[str]] = field(default_factory=dict)
    chair_images: Sequence[Path] = ()
    chair_present: Sequence[Sequence[str]] = ()
    lexicon: dict[str, str] = field(default_factory=dict)
    partners: dict[str, str] = field(default_factory=dict)
    batch_size: int = 64
    base_answers: Path | None = None
    pope_digests: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        self.pope_digests = {s: [str(p), file_digest(p)] for s, p in self.pope_files.items()}

    def model_dir(self, name: str) -> Path:
        """The folder of model ``name``: the base model's for ``"base"``, else ``train_dir/name``."""
        return Path(self.base_path) if name == "base" else Path(self.train_dir) / name

    def fingerprint(self, name: str) -> dict:
        """What model ``name``'s evaluation depends on: its identity and the base model's
        (:func:`realign_lib.cache.model_identity`: weights digest) and every evaluation setting."""
        return {"model": model_identity(self.model_dir(name)), "base": model_identity(self.base_path),
                "pope": self.pope_digests, "image_root": str(self.image_root), "suffix": self.suffix,
                "mme": str(self.mme_dir), "mme_questions": sum(map(len, self.mme_records.values())),
                "chair_images": [Path(p).name for p in self.chair_images],
                "chair_max_new_tokens": CHAIR_MAX_NEW_TOKENS}


def load_for_evaluation(setup: EvaluationSetup, name: str):
    """``(model, processor)`` of model ``name``: the base model, a stage-04 LoRA adapter merged into
    it (same outputs, faster), or a stage-04 full model."""
    from realign_lib.models.vlm import load_vlm

    folder = setup.model_dir(name)
    if name == "base":
        return load_vlm(folder)
    if (folder / "adapter_config.json").is_file():
        model, processor = load_vlm(setup.base_path, adapter=folder)
        return model.merge_and_unload().eval(), processor
    return load_vlm(folder)


def _reuse_base_answers(src_dir: Path, out: Path, questions: dict[str, list[dict]]) -> list[str]:
    """Copy stage 00's answers of the questions asked here (and their settings record, which
    :func:`~realign_lib.evaluation.pope.answer_pope` checks) into ``out`` where no answer file is yet."""
    from realign_lib.files import read_jsonl, write_jsonl

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
    from realign_lib.evaluation import pope
    from realign_lib.files import read_json, write_json

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
        if setup.present:
            res["pope_partner"][split] = partner_yes_rate([q for q, _ in pairs], preds, setup.present, setup.lexicon,
                                                          setup.partners)
    res["seconds"]["pope"] = round(time.time() - t, 1)
    if setup.mme_records:
        t = time.time()
        answered = answer_mme(model, processor, setup.mme_records, out / "mme_answers.jsonl",
                              batch_size=setup.batch_size, model_id=name)
        write_mme_results(answered, out / "mme")
        res["mme"] = score_mme_results(out / "mme", tasks=list(setup.mme_records))
        res["seconds"]["mme"] = round(time.time() - t, 1)
    if setup.chair_images:
        t = time.time()
        texts = describe_images(model, processor, setup.chair_images, batch_size=setup.batch_size,
                                cache_path=out / "descriptions.jsonl")
        res["chair"] = chair_scores(texts, setup.chair_present, setup.lexicon, setup.partners or None)
        res["seconds"]["chair"] = round(time.time() - t, 1)
    res["seconds"]["total"] = round(time.time() - t0, 1)
    write_json(out / "metrics.json", res)
    return res


