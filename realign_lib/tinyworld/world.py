"""The tiny world's texts and files: descriptions, yes/no and short-answer questions, the
LLaVA-Instruct-150K style training file, the samples handed to stages 01-03, and
:func:`build_world`, which writes images, annotations, the training file and the benchmark files
(:mod:`realign_lib.tinyworld.benchmarks`). Scenes and rendering: :mod:`realign_lib.tinyworld.scenes`.

Everything here is a pure function of a seed; nothing runs at import.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from realign_lib.files import write_json, write_jsonl
from realign_lib.prompts import DESCRIBE_PROMPT, FIXED_PROMPTS, LMMS_EVAL_SUFFIX, MME_SUFFIX
from realign_lib.tinyworld.scenes import (COLOURS, NUMBER_WORDS, OBJECTS, PARTNER, POSITION_PHRASE, POSITIONS, SCENES,
                                          ObjectInstance, Scene, existence_question, plural, render_scene,
                                          sample_scenes, save_png)
from realign_lib.tinyworld.settings import WorldConfig

__all__ = [
    "describe", "training_questions", "short_answer_questions", "SHORT_QUESTIONS",
    "existence_questions", "llava_record", "world_samples", "build_world", "world_vocabulary", "span_lexicon",
]


# ----------------------------------------------------------------------------------------- text
_INTROS = ("in this {scene} scene there is", "this picture shows a {scene} scene with",
           "the image shows a {scene} background with")
_REL = {("left", "right"): "to the left of", ("right", "left"): "to the right of",
        ("top", "bottom"): "above", ("bottom", "top"): "below",
        ("top", "center"): "above", ("center", "top"): "below",
        ("bottom", "center"): "below", ("center", "bottom"): "above",
        ("left", "center"): "to the left of", ("center", "left"): "to the right of",
        ("right", "center"): "to the right of", ("center", "right"): "to the left of"}


def _phrase(o: ObjectInstance) -> str:
    words = ["a", o.size_word, o.colour, o.type, POSITION_PHRASE[o.position]]
    return " ".join(w for w in words if w)


def _listing(phrases: Sequence[str]) -> str:
    """``"a , b and c"`` (the world's spaced punctuation)."""
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(s: Scene) -> str:
    """A detailed description naming every object with size, colour, position, plus a relation.

    Example: ``"in this night scene there is a big yellow star on the left and a small white moon
    at the top . the star is to the left of the moon ."`` (lower case, punctuation spaced).
    """
    text = f"{_INTROS[s.template].format(scene=s.scene)} {_listing([_phrase(o) for o in s.objects])} ."
    if len(s.objects) >= 2:
        a, b = s.objects[0], s.objects[1]
        rel = _REL.get((a.position, b.position))
        if rel and a.type != b.type:
            text += f" the {a.type} is {rel} the {b.type} ."
    return text


def _yn(q: str, yes: bool) -> dict:
    return {"question": q, "answer": "yes" if yes else "no"}


def training_questions(s: Scene, rng: np.random.Generator, n: int = 4) -> list[dict]:
    """Balanced yes/no questions of four kinds (existence, colour, count, position).

    Negatives for existence are *uniformly random* absent objects, as in ordinary instruction data;
    the world's priors, not the questions, are what later make partners hallucination-prone.
    """
    out: list[dict] = []
    present = s.types
    absent = [o for o in OBJECTS if o not in present]
    for k in range(n):
        yes = k % 2 == 0
        kind = str(rng.choice(["existence", "existence", "colour", "count", "position"]))
        obj = s.objects[int(rng.integers(len(s.objects)))]
        if kind == "existence":
            q = existence_question(obj.type if yes else str(rng.choice(absent)))
        elif kind == "colour":
            c = obj.colour if yes else str(rng.choice([c for c in COLOURS if c not in
                                                       {o.colour for o in s.objects if o.type == obj.type}]))
            q = f"Is there a {c} {obj.type} in the image?"
        elif kind == "count":
            true = s.count(obj.type)
            num = true if yes else (true + 1 if true == 1 or rng.random() < 0.5 else true - 1)
            q = f"Is there one {obj.type} in the image?" if num == 1 else \
                f"Are there {NUMBER_WORDS[num]} {plural(obj.type)} in the image?"
        else:
            taken = {o.position for o in s.objects if o.type == obj.type}
            pos = obj.position if yes else str(rng.choice([p for p in POSITIONS if p not in taken]))
            q = f"Is the {obj.type} {POSITION_PHRASE[pos]} of the image?"
            if pos == "center":
                q = f"Is the {obj.type} in the center of the image?"
        suffix = str(rng.choice(["", MME_SUFFIX, LMMS_EVAL_SUFFIX]))
        out.append(_yn(q + (f" {suffix}" if suffix else ""), yes))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


#: the short-answer questions of the tiny world (paper, Appendix C: QA pairs beside detailed descriptions)
SHORT_QUESTIONS = {
    "objects": "What objects can you see in the image?",
    "colour": "What colour is the {obj}?",
    "position": "Where is the {obj}?",
    "count": "How many {objs} are there in the image?",
}


def _short_phrase(o: ObjectInstance) -> str:
    return " ".join(w for w in ("a", o.size_word, o.colour, o.type) if w)


def short_answer_questions(s: Scene, rng: np.random.Generator, n: int = 1) -> list[dict]:
    """``n`` short-answer questions about ``s`` with answers that name objects, attributes, counts
    and positions, in the world's lower-case style (``{"kind", "question", "answer"}``):

    * objects — "What objects can you see in the image?" → "there is a red kite and a small boat ."
    * colour — "What colour is the bird?" → "the bird is blue ."
    * position — "Where is the boat?" → "the boat is on the left ."
    * count — "How many stars are there in the image?" → "there are two stars ."

    Colour and position are asked only of an object type that appears once. Kinds are drawn
    uniformly among those that fit, without repeats.
    """
    single = [o for o in s.objects if s.count(o.type) == 1]
    kinds = ["objects", "count"] + (["colour", "position"] if single else [])
    out = []
    for kind in [kinds[i] for i in rng.permutation(len(kinds))][:n]:
        if kind == "objects":
            q, a = SHORT_QUESTIONS["objects"], f"there is {_listing([_short_phrase(o) for o in s.objects])} ."
        elif kind == "count":
            t = s.objects[int(rng.integers(len(s.objects)))].type
            k = s.count(t)
            q = SHORT_QUESTIONS["count"].format(objs=plural(t))
            a = f"there is one {t} ." if k == 1 else f"there are {NUMBER_WORDS[k]} {plural(t)} ."
        else:
            o = single[int(rng.integers(len(single)))]
            q = SHORT_QUESTIONS[kind].format(obj=o.type)
            a = f"the {o.type} is {o.colour} ." if kind == "colour" else f"the {o.type} is {POSITION_PHRASE[o.position]} ."
        out.append({"kind": kind, "question": q, "answer": a})
    return out


def existence_questions(s: Scene, rng: np.random.Generator, n: int, partner_negatives: float = 0.0) -> list[dict]:
    """``n`` existence questions, alternately yes (a present object) and no.

    A "no" asks for a uniformly random absent object, or — with probability ``partner_negatives``, when
    one is absent — for the absent partner of a present object (the hard negative POPE-adversarial asks).
    No answer-format suffix: these are POPE's own question form.
    """
    absent = [o for o in OBJECTS if o not in s.types]
    partners = sorted({PARTNER[t] for t in s.types} & set(absent))
    out = []
    for k in range(n):
        if k % 2 == 0:
            out.append(_yn(existence_question(str(rng.choice(s.types))), True))
        elif partners and partner_negatives and rng.random() < partner_negatives:
            out.append(_yn(existence_question(str(rng.choice(partners))), False))
        else:
            out.append(_yn(existence_question(str(rng.choice(absent))), False))
    return out


def llava_record(s: Scene, image_file: str, rng: np.random.Generator, n_questions: int = 4,
                 n_short: int = 0, n_existence: int = 0, partner_negatives: float = 0.0) -> dict:
    """One LLaVA-Instruct-150K record: a detailed description turn, then ``n_short`` short-answer
    turns (:func:`short_answer_questions`), ``n_questions`` yes/no turns of four kinds
    (:func:`training_questions`) and ``n_existence`` more existence turns (:func:`existence_questions`)."""
    conv = [{"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"}, {"from": "gpt", "value": describe(s)}]
    for qa in short_answer_questions(s, rng, n_short) if n_short else []:
        conv += [{"from": "human", "value": qa["question"]}, {"from": "gpt", "value": qa["answer"]}]
    extra = existence_questions(s, rng, n_existence, partner_negatives) if n_existence else []
    for qa in training_questions(s, rng, n_questions) + extra:
        conv.append({"from": "human", "value": qa["question"]})
        conv.append({"from": "gpt", "value": "Yes." if qa["answer"] == "yes" else "No."})
    # present the question turns before the description half of the time, as LLaVA data mixes turns
    if rng.random() < 0.5 and (n_questions or n_short or n_existence):
        qa_turns = conv[2:]
        first_q = dict(qa_turns[0])
        first_q["value"] = "<image>\n" + first_q["value"]
        desc = [{"from": "human", "value": DESCRIBE_PROMPT}, conv[1]]
        conv = [first_q] + qa_turns[1:] + desc
    return {"id": s.id, "image": image_file, "conversations": conv}


def world_samples(records: Sequence[dict], n_samples: int, short_answer_share: float = 0.0,
                  seed: int = 0) -> list[dict]:
    """Samples for stages 01-03 from LLaVA-Instruct records of the world, one per image: the first
    ``n_samples`` images in id order; each gives its short-answer exchange (the first one, e.g.
    "Where is the boat?" → "the boat is on the left .") with probability ``short_answer_share``
    (seeded), else its detailed description. A sample is ``{"id", "image", "prompt", "chosen",
    "kind"}`` with ``kind`` ``"description"`` or ``"short_answer"``; prompts carry no ``<image>``."""
    if not 0.0 <= short_answer_share <= 1.0:
        raise ValueError(f"short_answer_share={short_answer_share}: must be in [0, 1]")
    short_prompts = {q.split("{")[0] for q in SHORT_QUESTIONS.values()}
    rng = np.random.default_rng([seed, 17])
    out = []
    for rec in sorted(records, key=lambda r: str(r["id"]))[:n_samples]:
        turns = rec["conversations"]
        pairs = [(turns[i]["value"].replace("<image>", "").strip(), turns[i + 1]["value"])
                 for i in range(0, len(turns) - 1, 2)]
        desc = [(q, a) for q, a in pairs if q == DESCRIBE_PROMPT]
        short = [(q, a) for q, a in pairs if any(q.startswith(p) for p in short_prompts)]
        if short_answer_share > 0 and not short:
            raise ValueError(f"record {rec['id']!r} has no short-answer exchange: short_answer_share="
                             f"{short_answer_share} needs a world built with short_answers_per_image >= 1")
        use_short = rng.random() < short_answer_share
        if not desc and not use_short:
            raise ValueError(f"record {rec['id']!r} has no detailed-description exchange")
        (q, a), kind = (short[0], "short_answer") if use_short else (desc[0], "description")
        out.append({"id": str(rec["id"]), "image": rec["image"], "prompt": q, "chosen": a, "kind": kind})
    return out


def _render_chunk(args) -> int:
    scenes, folder = args
    for s in scenes:
        p = Path(folder) / f"{s.id}.png"
        if not p.exists():
            save_png(render_scene(s), p)
    return len(scenes)


def _render_all(scenes: Sequence[Scene], folder: Path, progress: bool, workers: int) -> None:
    """Render and save every scene not already on disk, in ``workers`` processes (same pixels)."""
    from tqdm.auto import tqdm

    chunks = [(list(scenes[i:i + 500]), str(folder)) for i in range(0, len(scenes), 500)]
    bar = tqdm(total=len(scenes), desc=folder.name, disable=not progress, mininterval=2)
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for n in pool.imap_unordered(_render_chunk, chunks):
                bar.update(n)
    else:
        for c in chunks:
            bar.update(_render_chunk(c))
    bar.close()


def build_world(out_dir: str | os.PathLike, cfg: WorldConfig = WorldConfig(), progress: bool = False,
                workers: int | None = None) -> dict:
    """Generate the tiny world into ``out_dir`` and return a summary with its file paths (absolute; the
    ``world.json`` it writes holds them relative to ``out_dir``, so a moved folder still reads its own).

    Layout (official formats where one exists)::

        out_dir/train_images/train_000000.png ...     training images
        out_dir/llava_instruct_tiny.json              LLaVA-Instruct-150K layout
        out_dir/annotations_{train,test}.jsonl        ground truth (scene, objects)
        out_dir/test_images/test_000000.png ...       POPE images
        out_dir/pope/tiny_pope_{random,popular,adversarial}.json   official POPE question format
        out_dir/val_images/val_000000.png ...         validation images (choosing a recipe), and
        out_dir/annotations_val.jsonl, out_dir/pope_val/tiny_pope_*.json   their ground truth and POPE
        out_dir/MME/{existence,count,position,color}/<image>.png + <image>.txt

    Images already on disk are reused when they were made for the same config, so a killed build
    resumes cheaply; a folder holding another world (another seed or size) is emptied and built
    again, never mixed. The summary ``world.json`` is written last, so its presence marks a
    complete world. ``workers``: rendering processes (default: the CPU count); the pixels do not
    depend on it.
    """
    from realign_lib.files import read_json
    from realign_lib.tinyworld.benchmarks import object_statistics, write_mme_folders, write_pope_files

    workers = workers if workers is not None else (os.cpu_count() or 1)
    out = Path(out_dir)
    done, building = out / "world.json", out / ".building.json"
    finished = read_json(done) if done.is_file() else None
    if finished is not None and finished.get("config") == asdict(cfg):
        return _world_paths(finished, out)
    before = read_json(building) if building.is_file() else finished
    if before is not None and before.get("config") != asdict(cfg):
        _clear_world(out)  # another world's files: images would not match the new labels
    elif before is None and any((out / "train_images").glob("*.png")):
        _clear_world(out)  # images of unknown origin (a world from before this marker existed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(building, {"config": asdict(cfg)})
    for sub in ("train_images", "test_images", "val_images", "pope", "pope_val", "MME"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    train = sample_scenes(cfg.n_train, seed=cfg.seed * 1000 + 1, prefix="train_")
    test = sample_scenes(cfg.n_test, seed=cfg.seed * 1000 + 2, prefix="test_")
    val = sample_scenes(cfg.n_val, seed=cfg.seed * 1000 + 3, prefix="val_")
    rng = np.random.default_rng([cfg.seed, 99])
    records = []
    _render_all(train, out / "train_images", progress, workers)
    for s in train:
        records.append(llava_record(s, f"{s.id}.png", rng, cfg.questions_per_image, cfg.short_answers_per_image,
                                    cfg.existence_per_image, cfg.partner_negatives))
    write_json(out / "llava_instruct_tiny.json", records, indent=None)
    write_jsonl(out / "annotations_train.jsonl", [s.to_dict() for s in train])
    _render_all(test, out / "test_images", progress, workers)
    test_files = [f"{s.id}.png" for s in test]
    write_jsonl(out / "annotations_test.jsonl", [s.to_dict() for s in test])
    pope_files = write_pope_files(out / "pope", test, test_files, train, cfg.seed)
    _render_all(val, out / "val_images", progress, workers)  # for choosing a recipe; test stays for reporting
    write_jsonl(out / "annotations_val.jsonl", [s.to_dict() for s in val])
    pope_val = write_pope_files(out / "pope_val", val, [f"{s.id}.png" for s in val], train, cfg.seed + 1)
    mme_counts = write_mme_folders(out, cfg.seed, cfg.n_mme)
    freq, co = object_statistics(train)
    summary = {  # paths relative to the world's folder: a moved or copied run folder reads its own files
        "config": asdict(cfg),
        "root": ".",
        "train_json": "llava_instruct_tiny.json",
        "train_images": "train_images",
        "test_images": "test_images",
        "annotations_train": "annotations_train.jsonl",
        "annotations_test": "annotations_test.jsonl",
        "pope": {s: os.path.relpath(f, out) for s, f in pope_files.items()},
        "val_images": "val_images",
        "annotations_val": "annotations_val.jsonl",
        "pope_val": {s: os.path.relpath(f, out) for s, f in pope_val.items()},
        "mme_root": "MME",
        "mme_images_per_task": mme_counts,
        "object_frequency": dict(freq.most_common()),
        "partner_cooccurrence": {a: round(co[a][PARTNER[a]] / max(freq[a], 1), 3) for a in OBJECTS},
    }
    write_json(done, summary)
    building.unlink(missing_ok=True)
    return _world_paths(summary, out)


_PATH_KEYS = ("root", "train_json", "train_images", "test_images", "annotations_train", "annotations_test",
              "val_images", "annotations_val", "mme_root")


def _world_paths(summary: dict, out: Path) -> dict:
    """``world.json``'s summary with its paths (relative to the world folder) made absolute under ``out``,
    the folder the world is in now."""
    res = dict(summary)
    for key in _PATH_KEYS:
        res[key] = str((out / summary[key]).resolve()) if key == "root" else str(out.resolve() / summary[key])
    for key in ("pope", "pope_val"):
        res[key] = {s: str(out.resolve() / f) for s, f in summary[key].items()}
    return res


def _clear_world(out: Path) -> None:
    """Remove every file a world build writes under ``out`` (nothing else)."""
    import shutil

    for sub in ("train_images", "test_images", "val_images", "pope", "pope_val", "MME"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("world.json", "llava_instruct_tiny.json", "annotations_train.jsonl", "annotations_test.jsonl",
                 "annotations_val.jsonl"):
        (out / name).unlink(missing_ok=True)


def world_vocabulary(short_answers: bool = False) -> list[str]:
    """Every word the world's texts and the kit's fixed prompts can contain (lower-cased);
    ``short_answers``: also the words of :data:`SHORT_QUESTIONS` (a world with short-answer turns)."""
    import re

    words: set[str] = set()
    texts: list[str] = list(FIXED_PROMPTS)
    texts += [i.format(scene=sc) for i in _INTROS for sc in SCENES]
    texts += list(POSITION_PHRASE.values()) + list(_REL.values())
    texts += list(OBJECTS) + [plural(o) for o in OBJECTS] + list(COLOURS) + list(NUMBER_WORDS.values())
    texts += [q.format(obj="", objs="") for q in SHORT_QUESTIONS.values()] if short_answers else []
    texts += ["a the is there are in of image this and , . ? yes no small big not",
              "Is there a in the image? Are there Is the of the image? Yes. No.",
              "Is there one in this image?"]
    for t in texts:
        words.update(re.findall(r"\[MASK\]|\w+|[^\w\s]", t.lower()))
    return sorted(words)


def span_lexicon() -> dict[str, str]:
    """The world's words by kind, for the random-swap comparison
    (:func:`realign_lib.induction.baselines.span_kind`): ``object`` / ``objects`` (plural), ``colour``,
    ``size``, ``position``, ``relation``, ``scene`` and ``number``."""
    lex = {o: "object" for o in OBJECTS} | {plural(o): "objects" for o in OBJECTS}
    lex |= {c: "colour" for c in COLOURS} | {"small": "size", "big": "size"}
    lex |= {p: "position" for p in POSITION_PHRASE} | {"above": "relation", "below": "relation"}
    lex |= {s: "scene" for s in SCENES} | {w: "number" for w in NUMBER_WORDS.values()}
    return lex
