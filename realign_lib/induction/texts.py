"""Masked-text helpers of stage 03, pure functions of strings: split a masked text into its
scaffold segments, join fills back in, recover the masked spans, mark the words a rejected
response changed, and a seed that does not depend on ``PYTHONHASHSEED``.
"""
from __future__ import annotations

import difflib
import re
import zlib
from typing import Any, Sequence

from realign_lib.prompts import MASK

__all__ = ["split_masked", "join_filled", "spans_from_masked", "slot_texts", "changed_words", "stable_seed"]


# ------------------------------------------------------------------------------ pure text helpers
def split_masked(masked: str, mask: str = MASK) -> tuple[list[str], list[int]]:
    """Split a masked text into scaffold segments around its slots.

    Masks separated only by whitespace form one slot. Returns ``(segments, masks_per_slot)`` with
    ``len(segments) == len(masks_per_slot) + 1``; segments keep their exact characters (possibly
    empty at the ends). ``"a [MASK] [MASK] at the top ."`` → ``(["a ", " at the top ."], [2])``.
    """
    parts = re.split(r"((?:" + re.escape(mask) + r")(?:\s*" + re.escape(mask) + r")*)", masked)
    segments = parts[0::2]
    slots = [p.count(mask) for p in parts[1::2]]
    return segments, slots


def join_filled(segments: Sequence[str], fills: Sequence[str]) -> str:
    """Interleave scaffold segments and slot fills: ``seg0 + fill0 + seg1 + … + seg_n``."""
    if len(segments) != len(fills) + 1:
        raise ValueError(f"{len(segments)} segments need {len(segments) - 1} fills, got {len(fills)}")
    out = [segments[0]]
    for f, s in zip(fills, segments[1:]):
        out += [f, s]
    return "".join(out)


def spans_from_masked(chosen: str, masked: str, mask: str = MASK) -> list[dict] | None:
    """Recover the ``{"start", "end", "text"}`` spans of ``chosen`` that ``masked`` replaced.

    Aligns the scaffold segments left to right (one span per slot, merged masks give one span);
    returns None if the masked text is not ``chosen`` with spans replaced.
    """
    segments, _ = split_masked(masked, mask)
    if not chosen.startswith(segments[0]):
        return None
    pos, spans = len(segments[0]), []
    for k, seg in enumerate(segments[1:]):
        last = k == len(segments) - 2
        if last:
            end = len(chosen) - len(seg) if seg else len(chosen)
            if seg and not chosen.endswith(seg) or end <= pos:
                return None
        else:
            end = chosen.find(seg, pos + 1) if seg else -1
            if end <= pos:
                return None
        spans.append({"start": pos, "end": end, "text": chosen[pos:end]})
        pos = end + len(seg)
    return spans


def _word_flags(a: Sequence[str], b: Sequence[str]) -> list[bool]:
    flags = [True] * len(b)
    for block in difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            flags[j] = False
    return flags


def slot_texts(text: str, masked: str, mask: str = MASK) -> list[str] | None:
    """The texts standing in the slots of ``masked`` within ``text`` (None if the scaffold differs)."""
    segments, _ = split_masked(masked, mask)
    pattern = "".join(re.escape(s) + ("(.+?)" if i < len(segments) - 1 else "") for i, s in enumerate(segments))
    m = re.fullmatch(pattern, text, flags=re.S)
    return list(m.groups()) if m else None


def changed_words(chosen: str, rejected: str, masked: str | None = None) -> list[tuple[str, bool]]:
    """The words of ``rejected``, each flagged True where it differs from ``chosen``.

    With ``masked`` and both texts on its scaffold, only slot words can be flagged, each slot
    compared with the same slot of ``chosen``; otherwise a word-level diff of the whole texts.
    """
    if masked is not None:
        old, new = slot_texts(chosen, masked), slot_texts(rejected, masked)
        if old is not None and new is not None:
            segments, _ = split_masked(masked)
            out = []
            for k, seg in enumerate(segments):
                out += [(w, False) for w in seg.split()]
                if k < len(new):
                    a, b = old[k].split(), new[k].split()
                    out += list(zip(b, _word_flags(a, b)))
            return out
    b = rejected.split()
    return list(zip(b, _word_flags(chosen.split(), b)))


def stable_seed(*parts: Any) -> list[int]:
    """A seed sequence from ints and strings (crc32), independent of ``PYTHONHASHSEED``."""
    return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]

