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

__all__ = ["EvaluationSetup", "WorldPlan", "plan_world", "load_for_evaluation", "evaluate_model"]


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


@dataclass
class WorldPlan:
    """Stage 05's plan for one run folder (one world): the :class:`EvaluationSetup`, the models to
    evaluate (``"base"`` then stage 04's runs), and the tiny world's ground truth when there is one."""
    setup: EvaluationSetup
    models: list[str]
    scenes: list = field(default_factory=list)          # the evaluation images' scenes (tiny world)
    chair_scenes: list = field(default_factory=list)    # the ones described for CHAIR
    chair_image_dir: Path | None = None


def plan_world(run: str | os.PathLike, *, model_path: str, eval_split: str, pope_dir: str, image_root: str,
               mme_root: str, pope_suffix: bool, max_questions: int, max_mme_questions: int, n_chair: int,
               batch_size: int, runs: Sequence[str], include_base: bool, load_scenes=None,
               lexicon: dict[str, str] | None = None, partners: dict[str, str] | None = None) -> WorldPlan:
    """What stage 05 asks in run folder ``run`` and of which models (the notebook's parameters, same names
    and meanings; their defaults are :class:`realign_lib.run.stages.EvaluationStage`'s).

    Questions: the tiny world's POPE files of ``eval_split`` (``pope_val`` for validation) unless
    ``pope_dir`` is given, the first ``max_questions`` of each split (0: all); MME from ``mme_root`` (the
    tiny world's by default, ``"none"`` or validation: none), the first ``max_mme_questions`` per subtask;
    CHAIR on the first ``n_chair`` evaluation images of the tiny world. Models: ``base`` (with
    ``include_base``), then ``runs`` or every finished stage-04 run under ``run/04_training``.

    The tiny world's ground truth comes from the caller (the evaluation never imports the tiny world):
    ``load_scenes(annotations.jsonl)`` → scenes with ``.id`` and ``.types``, ``lexicon`` (word → object)
    and ``partners`` (object → its usual companion); without them, no CHAIR and no partner yes-rate.
    """
    from realign_lib.evaluation import pope
    from realign_lib.evaluation.mme import load_mme
    from realign_lib.prompts import LMMS_EVAL_SUFFIX
    from realign_lib.run.workspace import model_dir

    run = Path(run)
    world_dir = run / "data" / "tiny_world"
    validation = eval_split == "validation"  # recipes are chosen on these images, never on the test images
    if validation and (pope_dir or image_root):
        raise ValueError("eval_split='validation' selects the tiny world's validation images; with your own data "
                         "point pope_dir and image_root at your validation questions and images instead")
    pope_files = pope.find_pope_files(pope_dir or world_dir / ("pope_val" if validation else "pope"))
    img_root = Path(image_root) if image_root else world_dir / ("val_images" if validation else "test_images")
    mme_dir = None if mme_root == "none" or validation else Path(mme_root) if mme_root else world_dir / "MME"
    ann = world_dir / ("annotations_val.jsonl" if validation else "annotations_test.jsonl")
    scenes = load_scenes(ann) if load_scenes and ann.is_file() and not pope_dir else []
    chair_scenes = scenes[:n_chair]
    chair_image_dir = world_dir / ("val_images" if validation else "test_images")
    questions = {split: (qs[:max_questions] if max_questions else qs)
                 for split, qs in ((s, pope.load_pope_questions(p)) for s, p in pope_files.items())}
    mme_records = load_mme(mme_dir) if mme_dir is not None else {}
    if max_mme_questions:
        mme_records = {t: rs[:max_mme_questions] for t, rs in mme_records.items()}
    train_dir = run / "04_training"
    available = sorted(p.name for p in train_dir.iterdir()
                       if (p / "adapter_config.json").is_file() or (p / "config.json").is_file()) \
        if train_dir.is_dir() else []
    missing = [r for r in runs if r not in available]
    if missing:
        raise FileNotFoundError(f"stage-04 runs not found under {train_dir}: {missing}; available: {available}")
    setup = EvaluationSetup(
        base_path=model_dir(run, model_path), train_dir=train_dir, questions=questions, pope_files=pope_files,
        image_root=img_root, suffix=LMMS_EVAL_SUFFIX if pope_suffix else "", mme_records=mme_records,
        mme_dir=mme_dir, batch_size=batch_size,
        present={f"{s.id}.png": s.types for s in scenes}, lexicon=(lexicon or {}) if scenes else {},
        partners=(partners or {}) if scenes else {}, chair_images=[chair_image_dir / f"{s.id}.png" for s in chair_scenes],
        chair_present=[s.types for s in chair_scenes],
        # stage 00's base answers: same questions and prompt only on the tiny world's test images, no suffix
        base_answers=run / "00_tiny_world" / "eval_base" if not (model_path or pope_dir or pope_suffix or validation)
        else None)
    return WorldPlan(setup, (["base"] if include_base else []) + (list(runs) or available), scenes, chair_scenes,
                     chair_image_dir)


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


