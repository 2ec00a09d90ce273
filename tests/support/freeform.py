"""Multi-paragraph, LLaVA-style detailed descriptions with word-level ground truth, for measuring maskers.

Real LLaVA-Instruct "detailed description" answers run to several paragraphs: an overview, the
objects with their attributes and places, and a closing paragraph about the mood ("Overall, the
scene conveys a sense of excitement and teamwork."). :func:`freeform_descriptions` writes such
texts deterministically from a seed, and records for every word what it names: ``object`` (a noun
of a thing in the image), ``attribute`` (colour, size, material, count), ``relation`` (a spatial
word or phrase) or ``other`` (function words, verbs, abstract words, set phrases). With it,
:func:`masking_quality` says how much of what a masker hides is image content (share of masked
words that are objects, attributes or relations) and how many object nouns it hides (recall).
Nothing here is read from disk or a network; the same seed gives the same texts on any machine.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["Described", "freeform_descriptions", "masking_quality", "CATEGORIES"]

CATEGORIES = ("object", "attribute", "relation", "other")

_SCENES = {
    "kitchen": ("kitchen", "table chair bowl plate cup knife oven sink kettle apple banana bottle cabinet"),
    "street": ("city street", "car bus bicycle truck building lamp sign bench tree dog umbrella motorcycle"),
    "park": ("park", "bench tree dog ball kite fountain bicycle fence frisbee bird path flower"),
    "beach": ("beach", "umbrella towel surfboard boat chair ball bucket shell dog kite wave rock"),
    "living": ("living room", "sofa cushion lamp television rug table plant bookshelf clock vase window curtain"),
    "office": ("office", "desk monitor keyboard mouse laptop chair phone mug notebook printer lamp plant"),
    "farm": ("farm", "cow horse sheep barn tractor fence chicken dog haystack gate tree bucket"),
    "harbour": ("harbour", "boat ship crane lighthouse pier rope buoy seagull container flag dock net"),
    "station": ("train station", "train platform clock bench suitcase sign bag ticket machine pillar stairs cart"),
    "field": ("soccer field", "ball goal player net flag bench bottle jersey whistle fence referee crowd"),
}
_PLURAL = {"bus": "buses", "bench": "benches", "knife": "knives", "glass": "glasses", "shelf": "shelves",
           "bookshelf": "bookshelves", "sheep": "sheep", "box": "boxes", "bucket": "buckets", "sandwich": "sandwiches"}
_COLOURS = "red blue green yellow white black brown gray orange pink purple silver".split()
_SIZES = "small large tall little big long short round".split()
_MATERIALS = "wooden metal plastic glass leather ceramic".split()
_COUNTS = "two three four five several six".split()
_PEOPLE = [("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"), ("child", "children")]
_ACTIONS = ["standing", "sitting", "walking", "waiting", "looking around", "talking", "resting"]
_RELATIONS = ["next to", "behind", "near", "on", "under", "beside", "in front of", "on top of", "above",
              "on the left side of", "on the right side of", "between the table and"]
_ABSTRACT = "excitement teamwork fun relaxation joy leisure activity energy community adventure".split()


@dataclass
class Described:
    """A generated description: ``text`` and, per word, ``(start, end, category)`` character spans."""

    text: str
    words: list[tuple[int, int, str]] = field(default_factory=list)

    def object_nouns(self) -> list[str]:
        return [self.text[a:b] for a, b, c in self.words if c == "object"]


class _Writer:
    """Builds one text from ``(piece, category)`` parts, keeping the character span of each word."""

    def __init__(self):
        self.text, self.words = "", []

    def add(self, piece: str, cat: str = "other") -> None:
        glue = piece[:1] in ",.;:" or not self.text or self.text.endswith("\n")
        if not glue:
            self.text += " "
        for m in re.finditer(r"\w+", piece):
            self.words.append((len(self.text) + m.start(), len(self.text) + m.end(), cat))
        self.text += piece

    def break_paragraph(self) -> None:
        self.text += "\n\n"


def _plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s"))


def _np(w: _Writer, rng: random.Random, noun: str, det: str = "a", plural: bool = False) -> None:
    """A noun phrase: determiner or count, zero to two attributes, the noun."""
    if plural:
        w.add(rng.choice(_COUNTS), "attribute")
    elif det:
        w.add(det)
    attrs = rng.sample([rng.choice(_SIZES), rng.choice(_COLOURS), rng.choice(_MATERIALS)], rng.choice((0, 1, 1, 2)))
    if det == "a" and not plural and attrs and attrs[0][0] in "aeiou":
        w.text = w.text[:-1] + "n"
    for a in attrs:
        w.add(a, "attribute")
    if det == "a" and not plural and not attrs and noun[0] in "aeiou":
        w.text = w.text[:-1] + "n"
    w.add(_plural(noun) if plural else noun, "object")


def _sentence(w: _Writer, rng: random.Random, scene: str, objs: list[str]) -> None:
    kind = rng.randrange(7)
    o1, o2 = rng.sample(objs, 2)
    person, people = rng.choice(_PEOPLE)
    if kind == 0:
        w.add("The image shows a")
        w.add(rng.choice(["busy", "quiet", "sunny", "crowded"]), "attribute")
        w.add(scene, "object")
        w.add("with")
        _np(w, rng, o1, plural=True)
        w.add(rng.choice(_RELATIONS), "relation")
        _np(w, rng, o2, det="the")
    elif kind == 1:
        w.add(rng.choice(["In the foreground,", "In the background,", "Nearby,", "In the middle of the scene,"]))
        _np(w, rng, o1)
        w.add("is placed")
        w.add(rng.choice(_RELATIONS), "relation")
        _np(w, rng, o2, det="the")
    elif kind == 2:
        w.add("In addition, there are")
        _np(w, rng, o1, det="", plural=True)
        w.add(rng.choice(_RELATIONS), "relation")
        _np(w, rng, o2, det="the")
    elif kind == 3:
        w.add("A")
        w.add(person, "object")
        w.add("is")
        w.add(rng.choice(_ACTIONS))
        w.add(rng.choice(_RELATIONS), "relation")
        _np(w, rng, o1, det="the")
        w.add(", holding")
        _np(w, rng, o2)
    elif kind == 4:
        w.add("There is a total of")
        w.add(rng.choice(_COUNTS), "attribute")
        w.add(_plural(o1), "object")
        w.add("visible in the image")
    elif kind == 5:
        _np(w, rng, o1, det="The")
        w.add("can be seen")
        w.add(rng.choice(_RELATIONS), "relation")
        _np(w, rng, o2, det="the")
        w.add(", and a few")
        w.add(people, "object")
        w.add("are")
        w.add(rng.choice(_ACTIONS))
        w.add("nearby", "relation")
    else:
        w.add("The")
        w.add(o1, "object")
        w.add("appears to be")
        w.add(rng.choice(_COLOURS), "attribute")
        w.add("and")
        w.add(rng.choice(_SIZES), "attribute")
    w.add(".")


def _closing(w: _Writer, rng: random.Random) -> None:
    a, b = rng.sample(_ABSTRACT, 2)
    w.add(rng.choice(["Overall, the scene conveys a sense of", "The atmosphere suggests", "The picture captures the"]))
    w.add(a)
    w.add("and")
    w.add(b)
    w.add(".")


def freeform_descriptions(n: int = 200, seed: int = 0) -> list[Described]:
    """``n`` descriptions of two to four paragraphs (two to four sentences each, the last paragraph
    sometimes a closing remark about the mood), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene, objs = rng.choice(list(_SCENES.values()))
        objs = objs.split()
        w = _Writer()
        n_par = rng.randint(2, 4)
        for p in range(n_par):
            if p:
                w.break_paragraph()
            if p == n_par - 1 and p >= 2 and rng.random() < 0.7:
                _closing(w, rng)
                continue
            for _ in range(rng.randint(2, 4)):
                _sentence(w, rng, scene, objs)
        out.append(Described(w.text, w.words))
    return out


def masking_quality(docs: Sequence[Described], masked_spans: Sequence[Sequence[tuple[int, int]]]) -> dict:
    """How much of what a masker hid is image content, and how many object nouns it hid.

    ``masked_spans[i]``: the ``(start, end)`` character spans masked in ``docs[i]``. A word counts
    as masked when it lies inside a span. Returns ``content_share`` (masked words that are
    objects, attributes or relations / masked words), ``object_recall`` (masked object nouns /
    object nouns), ``mask_rate`` (masked words / words) and the masked words per category.
    """
    by_cat = {c: 0 for c in CATEGORIES}
    objects = objects_hit = words = 0
    for doc, spans in zip(docs, masked_spans):
        for a, b, cat in doc.words:
            words += 1
            hit = any(s <= a and b <= e for s, e in spans)
            by_cat[cat] += hit
            objects += cat == "object"
            objects_hit += hit and cat == "object"
    masked = sum(by_cat.values())
    return {"texts": len(docs), "words": words, "masked_words": masked,
            "mask_rate": masked / words if words else None,
            "content_share": (masked - by_cat["other"]) / masked if masked else None,
            "object_recall": objects_hit / objects if objects else None, "masked_by_category": by_cat}
