"""The tiny world's benchmark files and hallucination metrics, from its ground truth per image
(:class:`~realign_lib.tinyworld.scenes.Scene`):

* POPE question files (:func:`pope_questions`, :func:`write_pope_files`): the official format,
  random / popular / adversarial negatives sampled as POPE does;
* MME-style folders (:func:`mme_questions`, :func:`write_mme_folders`): existence, count,
  position and color, one yes and one no question per image;
* absent objects in the rejected responses of a preference set (:func:`absent_object_stats`).

CHAIR and the absent-partner yes-rate are the evaluation's (:mod:`realign_lib.evaluation.chair`); the
tiny world hands them its object words (:func:`~realign_lib.tinyworld.scenes.object_lexicon`) and
partners (:data:`~realign_lib.tinyworld.scenes.PARTNER`).

:func:`realign_lib.tinyworld.world.build_world` writes the files. Pure functions of their inputs;
nothing runs at import.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from realign_lib.evaluation.chair import mentioned_objects
from realign_lib.files import write_jsonl
from realign_lib.prompts import MME_SUFFIX
from realign_lib.tinyworld.scenes import (COLOURS, NUMBER_WORDS, OBJECTS, PARTNER, POSITION_PHRASE, POSITIONS, Scene,
                                          existence_question, object_lexicon, plural, render_scene, sample_scenes,
                                          save_png)

LEXICON = object_lexicon()

__all__ = [
    "object_statistics", "pope_questions", "write_pope_files", "MME_TASKS", "mme_questions", "write_mme_folders",
    "absent_object_stats",
]


# ----------------------------------------------------------------------------------------- POPE
def object_statistics(scenes: Sequence[Scene]) -> tuple[Counter, dict[str, Counter]]:
    """Object frequencies (images containing each type) and pairwise co-occurrence counts."""
    freq: Counter = Counter()
    co: dict[str, Counter] = {o: Counter() for o in OBJECTS}
    for s in scenes:
        ts = s.types
        freq.update(ts)
        for a in ts:
            for b in ts:
                if a != b:
                    co[a][b] += 1
    return freq, co


def pope_questions(scenes: Sequence[Scene], image_files: Sequence[str], split: str,
                   stats_scenes: Sequence[Scene], seed: int) -> list[dict]:
    """POPE question records for one split, in the official format.

    Each image gets its ground-truth object types as "yes" questions and as many absent types as
    "no" questions, chosen as POPE does: ``random`` — uniformly among absent objects; ``popular`` —
    the most frequent objects (over ``stats_scenes``) that are absent; ``adversarial`` — the absent
    objects that co-occur most often with the present ones. Yes and no questions alternate, so the
    file is exactly half "yes".
    """
    if split not in ("random", "popular", "adversarial"):
        raise ValueError(f"unknown POPE split {split!r}: use random, popular or adversarial")
    freq, co = object_statistics(stats_scenes)
    rng = np.random.default_rng([seed, {"random": 1, "popular": 2, "adversarial": 3}[split]])
    out, qid = [], 1
    for s, img in zip(scenes, image_files):
        present = s.types
        absent = [o for o in OBJECTS if o not in present]
        k = min(len(present), len(absent))
        if split == "random":
            negs = [str(x) for x in rng.choice(absent, size=k, replace=False)]
        elif split == "popular":
            negs = sorted(absent, key=lambda o: (-freq[o], OBJECTS.index(o)))[:k]
        else:
            score = Counter()
            for p in present:
                score.update(co[p])
            negs = sorted(absent, key=lambda o: (-score[o], -freq[o], OBJECTS.index(o)))[:k]
        for pos, neg in zip(present[:k], negs):
            for obj, label in ((pos, "yes"), (neg, "no")):
                out.append({"question_id": qid, "image": img, "text": existence_question(obj), "label": label})
                qid += 1
    return out


def write_pope_files(folder: str | os.PathLike, scenes: Sequence[Scene], image_files: Sequence[str],
                     stats_scenes: Sequence[Scene], seed: int) -> dict[str, str]:
    """Write ``<folder>/tiny_pope_<split>.json`` for the three POPE splits; returns split → path."""
    pope_files = {}
    for split in ("random", "popular", "adversarial"):
        qs = pope_questions(scenes, image_files, split, stats_scenes=stats_scenes, seed=seed)
        pope_files[split] = str(write_jsonl(Path(folder) / f"tiny_pope_{split}.json", qs))
    return pope_files


# ------------------------------------------------------------------------------------------ MME
MME_TASKS = ("existence", "count", "position", "color")


def mme_questions(s: Scene, task: str, rng: np.random.Generator) -> list[tuple[str, str]] | None:
    """The two MME questions (one yes, one no) of ``task`` for scene ``s``, or None if it does not fit."""
    sfx = " " + MME_SUFFIX
    present = s.types
    if task == "existence":
        obj = present[int(rng.integers(len(present)))]
        neg = str(rng.choice([o for o in OBJECTS if o not in present]))
        return [(f"Is there a {obj} in this image?{sfx}", "Yes"), (f"Is there a {neg} in this image?{sfx}", "No")]
    if task == "count":
        obj = present[int(rng.integers(len(present)))]
        true = s.count(obj)
        wrong = true + 1 if true == 1 or rng.random() < 0.5 else true - 1

        def q(n):
            return (f"Is there one {obj} in this image?{sfx}" if n == 1 else
                    f"Are there {NUMBER_WORDS[n]} {plural(obj)} in this image?{sfx}")
        return [(q(true), "Yes"), (q(wrong), "No")]
    if task == "position":
        singles = [o for o in s.objects if s.count(o.type) == 1]
        if not singles:
            return None
        o = singles[int(rng.integers(len(singles)))]
        other = str(rng.choice([p for p in POSITIONS if p != o.position]))
        return [(f"Is the {o.type} {POSITION_PHRASE[o.position]} of the image?{sfx}", "Yes"),
                (f"Is the {o.type} {POSITION_PHRASE[other]} of the image?{sfx}", "No")]
    if task == "color":
        singles = [o for o in s.objects if s.count(o.type) == 1]
        if not singles:
            return None
        o = singles[int(rng.integers(len(singles)))]
        other = str(rng.choice([c for c in COLOURS if c != o.colour]))
        return [(f"Is there a {o.colour} {o.type} in this image?{sfx}", "Yes"),
                (f"Is there a {other} {o.type} in this image?{sfx}", "No")]
    raise ValueError(f"unknown MME task {task!r}; tiny world supports {', '.join(MME_TASKS)}")


def write_mme_folders(out_dir: str | os.PathLike, seed: int, n_mme: int) -> dict[str, int]:
    """Write ``<out_dir>/MME/<task>/<image>.png + <image>.txt`` (MME's layout: question TAB answer
    per line) and ``<out_dir>/annotations_mme_<task>.jsonl`` for every task of :data:`MME_TASKS`,
    ``n_mme`` images each from scenes of their own sub-seed; returns task → images written."""
    out = Path(out_dir)
    mme_counts = {}
    for t_i, task in enumerate(MME_TASKS):
        scenes = sample_scenes(n_mme * 3, seed=seed * 1000 + 10 + t_i, prefix=f"mme_{task}_")
        trng = np.random.default_rng([seed, 500 + t_i])
        folder = out / "MME" / task
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        mme_ann = []
        for s in scenes:
            qs = mme_questions(s, task, trng)
            if qs is None:
                continue
            save_png(render_scene(s), folder / f"{s.id}.png")
            (folder / f"{s.id}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qs), encoding="utf-8")
            mme_ann.append(s.to_dict())
            n += 1
            if n == n_mme:
                break
        write_jsonl(out / f"annotations_mme_{task}.jsonl", mme_ann)
        mme_counts[task] = n
    return mme_counts


# ------------------------------------------------------------------------- hallucination checks
def absent_object_stats(records: Sequence[dict], scenes: dict, image_scene: Callable[[str], Any] | None = None) -> dict:
    """Tiny world: how often the rejected responses name objects absent from the original image.

    ``scenes``: id → :class:`~realign_lib.tinyworld.scenes.Scene` of each sample's own image;
    ``image_scene``: optional retrieved-image path → Scene (or None), to count absent objects that
    are present in the retrieved image. Returns the share of rejected responses naming ≥ 1 absent
    object (``responses_with_absent``), the share of named objects that are absent
    (``object_hallucination_rate``, CHAIR_i style), ``partner_share`` (of the absent mentions,
    those that are the partner of a present object, :data:`~realign_lib.tinyworld.scenes.PARTNER`),
    ``responses_with_absent_partner`` and ``absent_in_retrieved_share`` (of the absent mentions whose
    retrieved image has a known scene, those present there; NaN when none is known).
    """
    n = with_absent = with_partner = mentions = absent = partner = in_retrieved = absent_looked_up = 0
    for r in records:
        s = scenes.get(r["id"])
        if s is None:
            continue
        n += 1
        present = set(s.types)
        named = mentioned_objects(r["rejected"], LEXICON)
        bad = [o for o in named if o not in present]
        mentions += len(named)
        absent += len(bad)
        part = [o for o in bad if PARTNER[o] in present]
        partner += len(part)
        with_absent += bool(bad)
        with_partner += bool(part)
        if image_scene is not None and bad:
            rs = image_scene(r["retrieved_image"])
            if rs is not None:
                absent_looked_up += len(bad)
                in_retrieved += sum(o in rs.types for o in bad)
    return {"n": n, "responses_with_absent": with_absent / n if n else float("nan"),
            "responses_with_absent_partner": with_partner / n if n else float("nan"),
            "object_hallucination_rate": absent / mentions if mentions else float("nan"),
            "absent_mentions": absent, "partner_share": partner / absent if absent else float("nan"),
            "absent_in_retrieved_share": in_retrieved / absent_looked_up if absent_looked_up else float("nan")}
