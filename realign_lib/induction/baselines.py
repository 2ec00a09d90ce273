"""Comparison generators for the ablations: rejected responses made without retrieved images.

Both write the preference-record format of :func:`realign_lib.induction.loop.induce`:

* **random swap** (:func:`random_swap_records`) — masked words replaced by random other masked
  words of the same kind, no VLM. A span's kind comes from a lexicon (word → kind,
  :func:`span_kind`): pass the data's own (the tiny world's: :func:`realign_lib.tinyworld.world.span_lexicon`)
  or leave it out for a generic English one (:func:`english_lexicon`, built from the rule
  masker's word lists);
* **corrupted image** — the τ loop run over corrupted copies of the *same* image
  (:func:`corrupt_image`, :func:`corrupted_candidates`).

PIL and the VLM helpers load when an image is corrupted, not at import.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from realign_lib.induction.loop import Candidate, Item
from realign_lib.induction.texts import spans_from_masked, stable_seed
from realign_lib.masking.rule import COLOUR_WORDS, COUNT_WORDS, POSITION_WORDS, RELATION_WORDS

__all__ = ["SIZE_WORDS", "english_lexicon", "span_kind", "random_swap", "random_swap_records", "corrupt_image",
           "corrupted_candidates"]


# --------------------------------------------------------------------------- comparison: swapping
_FUNCTION = {"a", "an", "the", "on", "at", "in", "of", "to", "is", "are", "and", "there", "with"}
SIZE_WORDS = frozenset("small big large tiny little huge giant tall short".split())


@lru_cache(maxsize=1)
def _english() -> dict[str, str]:
    lex = {w: "number" for w in COUNT_WORDS} | {w: "size" for w in SIZE_WORDS}
    lex |= {w: "colour" for w in COLOUR_WORDS} | {w: "position" for w in POSITION_WORDS}
    return lex | {w: "relation" for w in RELATION_WORDS}  # "near", "nearby": relation rather than position


def english_lexicon() -> dict[str, str]:
    """A generic English lexicon (word → kind) for :func:`span_kind`, for data without its own.

    Kinds ``number``, ``size``, ``colour``, ``position`` and ``relation`` from the rule masker's
    word lists (:data:`~realign_lib.masking.rule.COUNT_WORDS`, :data:`SIZE_WORDS`,
    :data:`~realign_lib.masking.rule.COLOUR_WORDS`, :data:`~realign_lib.masking.rule.POSITION_WORDS`,
    :data:`~realign_lib.masking.rule.RELATION_WORDS`); every other content word — objects, mostly — is
    of kind ``word`` in :func:`span_kind`. A new dict each call.
    """
    return dict(_english())


def span_kind(text: str, lexicon: dict[str, str] | None = None) -> str:
    """The kind of a masked span, used to swap like for like.

    The categories of its content words in order, looked up in ``lexicon`` (word → category;
    default :func:`english_lexicon`; other content words → ``word``), e.g. with the tiny world's
    lexicon (object, colour, size, position, relation, scene, number) ``"big yellow star"`` →
    ``"size+colour+object"``; function words (a, the, on, …) are ignored unless the span has
    nothing else.
    """
    lex = _english() if lexicon is None else lexicon
    words = re.findall(r"[\w'-]+|[^\w\s]", text.lower())
    content = [w for w in words if w not in _FUNCTION] or words
    return "+".join(lex.get(w, "word") for w in content) or "empty"


def random_swap(chosen: str, spans: Sequence[dict], pool: dict[str, dict[str, int]], rng: np.random.Generator,
                kind: Callable[[str], str] = span_kind) -> str | None:
    """``chosen`` with each span's text replaced by a random *other* span text of the same kind.

    ``pool``: kind → {span text: occurrences}; a text is drawn with probability proportional to
    its occurrences among the texts that differ from the span's own (ignoring case). Spans with
    no alternative keep their text; None if no span could be changed. Only span characters change.
    """
    out, pos, changed = [], 0, False
    for sp in sorted(spans, key=lambda s: s["start"]):
        text = chosen[sp["start"]:sp["end"]]
        counts = pool.get(kind(text), {})
        options = [t for t in counts if t.lower() != text.lower()]
        new = text
        if options:
            w = np.array([counts[t] for t in options], dtype=np.float64)
            new = options[int(rng.choice(len(options), p=w / w.sum()))]
        changed |= new != text
        out += [chosen[pos:sp["start"]], new]
        pos = sp["end"]
    out.append(chosen[pos:])
    return "".join(out) if changed else None


def _spans(rec: dict, chosen: str) -> list[dict] | None:
    spans = rec.get("spans")
    if spans and all(chosen[s["start"]:s["end"]] == s["text"] for s in spans):
        return spans
    return spans_from_masked(chosen, rec["masked"])


def random_swap_records(items: Sequence[Item], masked_records: Sequence[dict], encoder, seed: int = 0,
                        kind: Callable[[str], str] | None = None, tau: float | None = None,
                        lexicon: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Comparison pairs whose rejected response swaps the masked words at random (no VLM).

    The pool is every masked span of ``masked_records`` (pass them all, not only the items'),
    grouped by kind — ``kind(text)``, by default :func:`span_kind` with ``lexicon`` (word → kind;
    None: :func:`english_lexicon`; the tiny world's: :func:`realign_lib.tinyworld.world.span_lexicon`);
    each sample draws from ``default_rng(stable_seed(seed, id))``, so results do not depend on
    order or on which other samples are processed.
    ``retrieved_image`` / ``rank`` are the rank-1 neighbour's (the text does not depend on it; it
    keeps the rDPO image term defined). ``similarity`` is recorded; with ``tau`` set, pairs at or
    above it are skipped as in Re-Align. Returns ``(records, skipped)`` in item order.
    """
    if kind is None:
        lex = english_lexicon() if lexicon is None else lexicon
        kind = lambda text: span_kind(text, lex)  # noqa: E731
    pool: dict[str, dict[str, int]] = {}
    m_by = {m["id"]: m for m in masked_records}
    chosen_of = {it.id: it.chosen for it in items}
    for m in masked_records:
        chosen = m.get("chosen") or chosen_of.get(m["id"])
        for sp in (_spans(m, chosen) if chosen else None) or []:
            texts = pool.setdefault(kind(sp["text"]), {})
            texts[sp["text"]] = texts.get(sp["text"], 0) + 1
    recs, skipped, pairs = [], [], []
    for it in items:
        spans = _spans(m_by[it.id], it.chosen) if it.id in m_by else None
        if not spans:
            skipped.append({"id": it.id, "reason": "no_spans"})
            continue
        rej = random_swap(it.chosen, spans, pool, np.random.default_rng(stable_seed(seed, it.id)), kind)
        if rej is None:
            skipped.append({"id": it.id, "reason": "no_alternative"})
            continue
        pairs.append((it, rej))
    sims = encoder.similarity([it.chosen for it, _ in pairs], [r for _, r in pairs]) if pairs else []
    for (it, rej), s in zip(pairs, sims):
        s = round(float(s), 6)
        if tau is not None and s >= tau:
            skipped.append({"id": it.id, "reason": "none_below_tau", "similarities": [s]})
            continue
        c = it.candidates[0] if it.candidates else None
        recs.append({"id": it.id, "prompt": it.prompt, "images": [it.image],
                     "retrieved_image": c.image if c else None, "chosen": it.chosen, "rejected": rej,
                     "masked": it.masked, "similarity": s, "rank": c.rank if c else None, "similarities": [s]})
    order = {it.id: i for i, it in enumerate(items)}
    skipped.sort(key=lambda r: order[r["id"]])
    return recs, skipped


# ------------------------------------------------------------------- comparison: corrupted image
def corrupt_image(image: np.ndarray, kind: str, rng: np.random.Generator, noise_std: float = 64.0,
                  crop_area: tuple[float, float] = (0.01, 0.2)) -> np.ndarray:
    """A corrupted copy of an ``(H, W, 3)`` uint8 image, same size.

    ``"noise"``: add Gaussian noise of ``noise_std`` (0–255 scale), clipped. ``"crop"``: a random
    crop keeping a ``crop_area`` fraction of the area (aspect ratio 3/4–4/3, as mDPO's random
    resized crop), resized back to ``(H, W)`` (bilinear).
    """
    from PIL import Image

    img = np.asarray(image)
    h, w = img.shape[:2]
    if kind == "noise":
        return np.clip(img.astype(np.float32) + rng.normal(0, noise_std, img.shape), 0, 255).astype(np.uint8)
    if kind != "crop":
        raise ValueError(f"unknown corruption {kind!r}: use 'noise' or 'crop'")
    lo, hi = crop_area
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {crop_area}")
    area = rng.uniform(lo, hi) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(np.clip(round(np.sqrt(area * ratio)), 1, w))
    ch = int(np.clip(round(np.sqrt(area / ratio)), 1, h))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(img[y:y + ch, x:x + cw]))
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def corrupted_candidates(items: Sequence[Item], run_dir, folder: str, kind: str = "crop", attempts: int = 5,
                         seed: int = 0, **corrupt_kw) -> list[Item]:
    """Items whose candidates are ``attempts`` corrupted copies of their *own* image.

    Copy ``t`` of sample ``id`` is ``<run_dir>/<folder>/<id>_<t>.png``, drawn from
    ``default_rng(stable_seed(seed, kind, id, t))`` and written when first needed (atomically), so
    the τ loop (:func:`~realign_lib.induction.loop.induce`) tries them in order exactly as it tries
    retrieved images.
    """
    run = Path(run_dir)

    def maker(src: Path, dst: Path, t: int, sid: str):
        def make():
            if dst.exists():
                return
            from PIL import Image

            from realign_lib.models.vlm import to_pil
            arr = corrupt_image(np.asarray(to_pil(src)), kind, np.random.default_rng(stable_seed(seed, kind, sid, t)),
                                **corrupt_kw)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name("." + dst.name + ".tmp")
            Image.fromarray(arr).save(tmp, format="PNG")
            os.replace(tmp, dst)
        return make

    out = []
    for it in items:
        src = Path(it.image) if Path(it.image).is_absolute() else run / it.image
        cands = []
        for t in range(1, attempts + 1):
            rel = f"{folder}/{it.id}_{t}.png"
            cands.append(Candidate(t, rel, str(run / rel), maker(src, run / rel, t, it.id)))
        out.append(Item(it.id, it.prompt, it.image, it.chosen, it.masked, cands))
    return out

