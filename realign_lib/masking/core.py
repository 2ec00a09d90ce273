"""Stage 2 of Re-Align, *strategic masking*: hide the words that name what the image shows.

Algorithm 1, step 2: ``y_m = V(P_m, y_w)`` — the chosen response ``y_w`` with the words or
segments naming objects, attributes and logical relationships replaced by ``[MASK]``, using the
paper's prompt :data:`~realign_lib.prompts.MASK_PROMPT` verbatim. Three interchangeable backends
(:mod:`realign_lib.masking.rule`: spaCy rules, a local Hugging Face LLM, an OpenAI-compatible endpoint)
share one interface (:class:`Masker`: ``mask_batch(texts, attempt) -> list[str | BackendFailure]``).

Every output passes ONE check, :func:`check_masking`: the masked text must be the original with
some whole-word spans replaced by ``[MASK]`` and nothing else changed. Invalid outputs are counted,
retried once with a one-shot example where a retry can help (the LLM backends), then skipped —
never passed on. What is written is rebuilt from the original and the spans
(:func:`apply_spans`), so tolerated whitespace differences never reach later stages.

This module is the method: the validity check, the spans, the extraction of the masked text from
an LLM reply and the backend interface. :func:`~realign_lib.masking.driver.run_masking` drives a
backend over samples into a resumable, append-only ``masked.jsonl`` (one record per valid sample)
and ``masking_failures.jsonl`` (one per skipped sample, with reason).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from realign_lib.prompts import MASK

__all__ = [
    "REASONS", "MAX_MASK_WORDS", "Span", "InvalidMasking", "MaskCheck", "normalize_reply", "check_masking",
    "validate_masking", "apply_spans", "word_count", "extract_reply", "is_viable_prefix", "BackendFailure", "Masker",
]

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
    "too_long": "the text is longer than the backend reads (spaCy: 1,000,000 characters); shorten it",
    "truncated": "the reply was cut off by the token limit (finish_reason length); its last mask would swallow the rest",
    "long_mask": "a mask covers more words than max_mask_words (a dropped sentence, a cut-off reply)",
    "crosses_sentence": "a mask covers a sentence end or a paragraph break (a dropped or merged sentence)",
}

#: Default bound on the words one ``[MASK]`` may cover (the rule masker's longest span on 200
#: multi-paragraph descriptions is 5 words; a dropped sentence is 12-30).
MAX_MASK_WORDS = 10

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


# ------------------------------------------------------------------ harmless formats, normalised
_CURLY = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
_MASK_VARIANT = re.compile(r"\[\s*mask\s*\]", re.I)
_PREAMBLE = re.compile(r"^\s*(?:(?:sure|okay|ok|certainly)[,!.]?\s*)?(?:here(?:'s|\u2019s| is)\b[^\n:]{0,60}"
                       r"|(?:the\s+)?masked\s+(?:text|description|version|response|sentence|caption|output)s?)"
                       r"\s*:\s*", re.I)
_SENTENCE_INSIDE = re.compile(r"[.!?][\"')\]]*\s+\S|\n\s*\n|\s.*[.!?][\"')\]]*$", re.S)


def _squeeze(text: str) -> tuple[str, list[int]]:
    """``text`` with each whitespace run as one space and curly quotes straight, and for each of its
    characters (plus one past the end) the index in ``text`` it comes from."""
    out, where, i = [], [], 0
    while i < len(text):
        where.append(i)
        if text[i].isspace():
            while i < len(text) and text[i].isspace():
                i += 1
            out.append(" ")
        else:
            out.append(text[i].translate(_CURLY))
            i += 1
    where.append(len(text))
    return "".join(out), where


def normalize_reply(original: str, masked: str) -> str:
    """``masked`` with the harmless formats of real LLM replies undone, ready for :func:`check_masking`.

    A preamble ("Masked text:", "Here is the masked description:") that the original does not
    have is dropped; ``[mask]``/``[ Mask ]`` become ``[MASK]``; curly quotes become straight; each
    whitespace run becomes one space (paragraph breaks removed or added, spaces doubled); a reply
    that is the same text twice is taken once. The original is compared in the same squeezed form
    and spans are mapped back to its own characters, so nothing of the reply reaches the data.
    """
    text = _MASK_VARIANT.sub(MASK, masked or "")
    if not _PREAMBLE.match(original):
        text = _PREAMBLE.sub("", text, count=1)
    text = _squeeze(text)[0].strip()
    n, o = len(text), _squeeze(original)[0].strip()
    if n % 2 and text[n // 2] == " " and text[:n // 2] == text[n // 2 + 1:] and o != text:
        text = text[:n // 2]
    return text


def check_masking(original: str, masked: str, max_mask_words: int = MAX_MASK_WORDS) -> list[Span]:
    """The spans of ``original`` that ``masked`` replaces by ``[MASK]``; raises :class:`InvalidMasking`.

    Valid means: ``masked`` is ``original`` with one or more spans of whole words replaced by
    ``[MASK]``, and nothing else changed — same words, case and punctuation, in order. Tolerated,
    because LLMs do it and it changes no word: whitespace at the two ends of the text and
    whitespace directly around a ``[MASK]`` (a missing, extra or different space next to a mask).
    ``[MASK][MASK]`` with nothing between counts as one mask. At least one word must be left
    unmasked. Spans are trimmed of surrounding whitespace and never empty. The harmless formats of
    :func:`normalize_reply` (preamble, ``[mask]``, curly quotes, whitespace, a doubled reply) are
    accepted. Bounded: a mask may not cover more than ``max_mask_words`` words (0: no bound) nor a
    sentence end followed by more text, a paragraph break, nor end several words with a sentence
    end (a dropped sentence; ``crosses_sentence``).
    """
    if MASK in original:
        raise InvalidMasking("original_has_mask", "the original already contains [MASK]")
    if not masked or not masked.strip():
        raise InvalidMasking("empty_output", "empty text")
    masked = normalize_reply(original, masked)
    squeezed, where = _squeeze(original)
    if MASK not in masked:
        if masked.strip() == squeezed.strip():
            raise InvalidMasking("no_mask", "unchanged text")
        raise InvalidMasking("text_changed", "no [MASK] and the text differs from the original")
    pieces = _pieces(masked)
    gaps = _match(squeezed, pieces, words=True)
    if isinstance(gaps, str):
        loose = _match(squeezed, pieces, words=False)
        if not isinstance(loose, str):
            raise InvalidMasking("partial_word", gaps)
        raise InvalidMasking("text_changed", gaps)
    spans = []
    for a, b in gaps:
        a, b = where[a], where[b - 1] + 1 if b > a else where[a]
        while a < b and original[a].isspace():
            a += 1
        while b > a and original[b - 1].isspace():
            b -= 1
        spans.append(Span(a, b, original[a:b]))
    kept = apply_spans(original, spans).replace(MASK, " ")
    if not _WORD.search(kept):
        raise InvalidMasking("all_masked", f"{len(spans)} mask(s) cover every word")
    for s in spans:
        if _SENTENCE_INSIDE.search(s.text):
            raise InvalidMasking("crosses_sentence", f"a mask covers {s.text[:80]!r}")
        if max_mask_words and word_count(s.text) > max_mask_words:
            raise InvalidMasking("long_mask", f"a mask covers {word_count(s.text)} words (at most {max_mask_words}): "
                                              f"{s.text[:80]!r}")
    return spans


def validate_masking(original: str, masked: str | None, max_mask_words: int = MAX_MASK_WORDS) -> MaskCheck:
    """Non-raising :func:`check_masking`: a :class:`MaskCheck` with the canonical masked text or the reason."""
    try:
        spans = check_masking(original, masked or "", max_mask_words)
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
    a preamble stays here; :func:`check_masking` drops the known ones (:func:`normalize_reply`)."""
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


# -------------------------------------------------------------------------- the backend interface
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
