"""Object hallucination from ground truth: CHAIR for image descriptions, and the absent-partner yes-rate
on POPE answers. One measurement, one set of settings, for every stage that reports CHAIR.

CHAIR (Rohrbach et al., 2018) counts the objects a description names (:func:`mentioned_objects`)
against the objects present in the image:

    CHAIR_i = |named objects absent from the image| / |named objects|
    CHAIR_s = |descriptions naming an absent object| / |descriptions|

The descriptions are always made the same way (:func:`describe_images`): the detailed-description
prompt :data:`~realign_lib.prompts.DESCRIBE_PROMPT`, greedy decoding, at most
:data:`CHAIR_MAX_NEW_TOKENS` new tokens. Which words name which object is a parameter, ``lexicon``
(``word → object type``, plurals included): the tiny world passes
:func:`realign_lib.tinyworld.scenes.object_lexicon`; for COCO, pass CHAIR's synonym list. This
module never imports the tiny world.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from realign_lib.files import append_jsonl, read_appended

__all__ = ["CHAIR_MAX_NEW_TOKENS", "mentioned_objects", "chair_scores", "describe_images", "partner_yes_rate"]

#: New tokens per description: enough for every description of the tiny world (at most three objects).
CHAIR_MAX_NEW_TOKENS = 48


def mentioned_objects(text: str, lexicon: Mapping[str, str]) -> list[str]:
    """Object types that ``text`` names (a word of ``lexicon``), in order of first mention."""
    seen: list[str] = []
    for w in re.findall(r"[a-z]+", text.lower()):
        o = lexicon.get(w)
        if o and o not in seen:
            seen.append(o)
    return seen


def chair_scores(texts: Sequence[str], present: Sequence[Iterable[str]], lexicon: Mapping[str, str],
                 partners: Mapping[str, str] | None = None) -> dict:
    """CHAIR of ``texts``, the descriptions of images whose objects are ``present`` (one set per text).

    ``chair_i``: share of named objects that are absent; ``chair_s``: share of descriptions with at
    least one absent object; ``recall``: share of present objects named; ``partner_share`` (with
    ``partners``: object → its usual companion): share of the absent named objects that are the
    partner of a present one; ``n``: descriptions.
    """
    if len(texts) != len(present):
        raise ValueError(f"{len(texts)} texts but {len(present)} sets of present objects")
    mentioned = hallucinated = with_h = present_total = recalled = partner = 0
    for t, objs in zip(texts, present):
        named = mentioned_objects(t, lexicon)
        here = set(objs)
        bad = [o for o in named if o not in here]
        mentioned += len(named)
        hallucinated += len(bad)
        with_h += bool(bad)
        if partners is not None:
            partner += sum(partners.get(o) in here for o in bad)
        present_total += len(here)
        recalled += len(here & set(named))
    out = {"chair_i": hallucinated / max(mentioned, 1), "chair_s": with_h / max(len(texts), 1),
           "recall": recalled / max(present_total, 1)}
    if partners is not None:
        out["partner_share"] = partner / max(hallucinated, 1)
    return out | {"n": len(texts)}


def describe_images(model, processor, images: Sequence[str | os.PathLike], batch_size: int = 64,
                    cache_path: str | os.PathLike | None = None) -> list[str]:
    """CHAIR's descriptions of ``images``: :data:`~realign_lib.prompts.DESCRIBE_PROMPT`, greedy, at most
    :data:`CHAIR_MAX_NEW_TOKENS` tokens. With ``cache_path`` (JSON lines ``{"id": image stem, "text"}``),
    descriptions already there are reused and new ones appended batch by batch (a killed run resumes);
    the caller keys the cache's folder by the model (:mod:`realign_lib.cache`)."""
    from realign_lib.models.vlm import generate
    from realign_lib.prompts import DESCRIBE_PROMPT

    ids = [Path(p).stem for p in images]
    done = {r["id"]: r["text"] for r in read_appended(cache_path)} if cache_path is not None else {}
    todo = [(i, p) for i, p in zip(ids, images) if i not in done]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        outs = generate(model, processor, [p for _, p in chunk], [DESCRIBE_PROMPT] * len(chunk),
                        max_new_tokens=CHAIR_MAX_NEW_TOKENS, batch_size=batch_size)
        if cache_path is not None:
            append_jsonl(cache_path, [{"id": i, "text": o} for (i, _), o in zip(chunk, outs)])
        done.update({i: o for (i, _), o in zip(chunk, outs)})
    return [done[i] for i in ids]


def partner_yes_rate(questions: Sequence[dict], predictions: Sequence[str], present: Mapping[str, Iterable[str]],
                     lexicon: Mapping[str, str], partners: Mapping[str, str]) -> dict:
    """Yes-rate on POPE "no" questions, split by whether the absent object asked about is the partner
    (usual companion) of an object present in the image.

    ``questions``: POPE records; ``predictions``: parsed yes/no; ``present``: image → its objects.
    Returns ``absent_partner_yes_rate``, ``absent_other_yes_rate`` (NaN when none) and their counts.
    """
    counts = {"partner": [0, 0], "other": [0, 0]}
    for q, p in zip(questions, predictions):
        if q["label"] != "no":
            continue
        named = mentioned_objects(q["text"], lexicon)
        if not named:
            continue
        here = set(present[q["image"]])
        key = "partner" if partners.get(named[0]) in here else "other"
        counts[key][0] += p == "yes"
        counts[key][1] += 1
    return {f"absent_{k}_yes_rate": (v[0] / v[1] if v[1] else float("nan")) for k, v in counts.items()} | \
        {f"absent_{k}_n": v[1] for k, v in counts.items()}
