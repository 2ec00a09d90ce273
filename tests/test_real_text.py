"""Issue 20: real data and real text in stages 00-03.

LLaVA-Instruct sampled by image; the rule masker on paragraphs, sentence ends and set phrases; the
validity check on the harmless and harmful shapes of real API replies (the API is the local
chat-completions server of ``chat_server.py``); induction's token budget, length guard and a
similarity that sees the whole of a long text; multi-paragraph descriptions with ground truth.
"""
import json
from collections import Counter

import numpy as np
import pytest
from chat_server import ChatServer, Reply
from PIL import Image

from realign_lib.data import llava as data
from realign_lib.induction import fillers
from realign_lib.induction import loop as induction
from realign_lib.masking import core as M
from realign_lib.masking import driver as D
from realign_lib.masking import rule as maskers
from realign_lib.masking.llm import OpenAIMasker
from tests.support.freeform import freeform_descriptions, masking_quality

# ------------------------------------------------------------------------ 1 · LLaVA-Instruct by image


def _llava(tmp_path, n_images=4, per_image=3, corrupt=()):
    root = tmp_path / "coco"
    root.mkdir()
    recs = []
    for k in range(per_image):
        for i in range(n_images):
            name = f"{i:012d}.jpg"
            recs.append({"id": f"{i:012d}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\nQuestion {k} about image {i}?"},
                {"from": "gpt", "value": f"Answer {k} about image {i}."}]})
    for i in range(n_images):
        path = root / f"{i:012d}.jpg"
        if i in corrupt:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(np.full((8, 8, 3), (7 * i) % 250, np.uint8)).save(path, format="JPEG")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(recs))
    return path, root


def test_llava_one_record_per_image_and_counts(tmp_path):
    path, root = _llava(tmp_path)
    samples, counts = data.samples_from_llava(path, root)
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids)) == 4 and all(s["prompt"].startswith("Question 0") for s in samples)
    assert counts["records"] == 12 and counts["images"] == 4 and counts["duplicate_records"] == 8


def test_llava_several_records_per_image_get_unique_ids(tmp_path):
    path, root = _llava(tmp_path)
    samples, counts = data.samples_from_llava(path, root, records_per_image=2)
    ids = [s["id"] for s in samples]
    assert len(ids) == 8 and len(set(ids)) == 8 and "000000000000_1" in ids
    assert counts["duplicate_records"] == 4
    with pytest.raises(ValueError, match="records_per_image"):
        data.samples_from_llava(path, root, records_per_image=0)


def test_llava_samples_first_then_opens_only_the_sampled_images(tmp_path):
    path, root = _llava(tmp_path, n_images=30, per_image=1, corrupt=(29,))
    samples, counts = data.samples_from_llava(path, root, limit=5, shuffle_seed=0)
    assert len(samples) == 5 and counts["images_opened"] < 30
    again, _ = data.samples_from_llava(path, root, limit=5, shuffle_seed=0)
    other, _ = data.samples_from_llava(path, root, limit=5, shuffle_seed=1)
    assert [s["id"] for s in again] == [s["id"] for s in samples] != [s["id"] for s in other]
    everything, counts_all = data.samples_from_llava(path, root)
    assert len(everything) == 29 and counts_all["corrupt_image"] == 1 and counts_all["images_opened"] == 30


# --------------------------------------------------------------------------------- 2 · rule masker
@pytest.fixture(scope="module")
def rule():
    return maskers.RuleMasker()


def test_rule_never_chains_across_a_paragraph_break(rule):
    text = "Many travelers are present.\n\nSeveral people stand near the door."
    out = rule.mask_batch([text])[0]
    assert "\n\n" in out and ".\n\n" in out
    spans = M.check_masking(text, out)
    assert all("\n" not in s.text and "." not in s.text for s in spans)


def test_rule_never_masks_a_sentence_end(rule):
    texts = [d.text for d in freeform_descriptions(40, seed=5)]
    for text, out in zip(texts, rule.mask_batch(texts)):
        assert out.count(".") == text.count(".") and out.count("\n\n") == text.count("\n\n")


def test_rule_stoplist_leaves_set_phrases_and_abstract_words(rule):
    text = "In addition, there is a total of five dogs. Overall, it conveys excitement and teamwork."
    out = rule.mask_batch([text])[0]
    for phrase in ("In addition", "a total of", "excitement", "teamwork"):
        assert phrase in out, out
    assert "five dogs" not in out
    bare = maskers.RuleMasker(nlp=rule.nlp, stoplist=False).mask_batch([text])[0]
    assert "excitement" not in bare and "a total of" not in bare
    extra = maskers.RuleMasker(nlp=rule.nlp, extra_stoplist=["dogs"]).mask_batch([text])[0]
    assert "dogs" in extra
    assert "teamwork" in maskers.STOPLIST and "in addition" in maskers.STOPLIST


# ------------------------------------------------------------------------------ 3 · validity check
ORIG = ("A man in a “red” jacket stands near the bus.\n\nTwo dogs sleep under a wooden bench. "
        "The sky is blue.")
CANON = "A [MASK] in a “[MASK]” [MASK] stands [MASK] the [MASK].\n\nTwo dogs sleep under a wooden bench. The sky is blue."
GOOD = "A [MASK] in a “[MASK]” [MASK] stands [MASK] the [MASK].\n\nTwo dogs sleep under a wooden bench. The sky is blue."


@pytest.mark.parametrize("reply", [
    "Masked text: " + GOOD,
    "Here is the masked description:\n\n" + GOOD,
    GOOD.replace("[MASK]", "[mask]"),
    GOOD.replace("“", '"').replace("”", '"'),
    GOOD.replace("\n\n", " "),
    GOOD.replace(" stands", "  stands").replace("\n\n", "\n"),
    GOOD + "\n\n" + GOOD,
])
def test_harmless_reply_formats_are_normalised(reply):
    chk = M.validate_masking(ORIG, reply)
    assert chk.ok, chk
    assert chk.masked == CANON  # rebuilt from the original: its quotes and paragraph break


@pytest.mark.parametrize("reply, reason", [
    ("A [MASK] in a “red” jacket stands near the bus.\n\nTwo dogs sleep under a wooden bench. [MASK]", "crosses_sentence"),
    ("A man in a “red” jacket stands near the [MASK]. The sky is blue.", "crosses_sentence"),
    ("A man in a “red” jacket stands near the bus.\n\nTwo dogs sleep under a wooden bench. The [MASK] is blue.", None),
    ("A [MASK] bench. The sky is blue.", "crosses_sentence"),
])
def test_masks_may_not_swallow_a_sentence(reply, reason):
    chk = M.validate_masking(ORIG, reply)
    assert chk.reason == reason, chk


def test_mask_size_is_bounded():
    text = "a small red car with a long silver roof rack and two black bikes parked by the road ."
    masked = "a [MASK] parked by the road ."
    assert M.validate_masking(text, masked).reason == "long_mask"
    assert M.validate_masking(text, masked, max_mask_words=20).ok
    assert M.validate_masking(text, masked, max_mask_words=0).ok


#: Scripted realistic API replies: (reply, finish_reason) and the expected outcome (None: valid).
SCRIPTED = [
    (GOOD, "stop", None),
    ("Masked text: " + GOOD, "stop", None),
    ("Here is the masked description:\n\n" + GOOD, "stop", None),
    (GOOD.replace("[MASK]", "[mask]"), "stop", None),
    (GOOD.replace("“", '"').replace("”", '"'), "stop", None),
    (GOOD.replace("\n\n", " "), "stop", None),
    (GOOD + "\n\n" + GOOD, "stop", None),
    ("A [MASK] in a “red” jacket stands near the [MASK]", "length", "truncated"),
    ("A [MASK] in a “red” jacket stands near the bus.\n\nTwo dogs sleep under a wooden bench. [MASK]", "stop",
     "crosses_sentence"),
    ("A man in a red coat stands near the [MASK].\n\nTwo dogs sleep under a wooden bench. The sky is blue.", "stop",
     "text_changed"),
    (ORIG, "stop", "no_mask"),
    ("Sure! I can help with that. " + GOOD, "stop", "text_changed"),
    ("A [MASK] in a “red” jacket stands near the bus.\n\nTwo [MASK] The sky is blue.", "stop", "crosses_sentence"),
]


def test_scripted_api_replies_are_counted_by_reason(monkeypatch):
    """The OpenAI masker against the local server: each scripted reply (with its finish_reason)
    comes back valid or refused for the expected reason, and the reasons are counted."""
    queue = {"i": 0}

    def respond(req):
        content, finish, _ = SCRIPTED[queue["i"]]
        queue["i"] += 1
        body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}]}
        return Reply(status=200, body=json.dumps(body))

    monkeypatch.setenv("REALIGN_TEST_KEY", "k")
    with ChatServer(respond) as srv:
        m = OpenAIMasker("m", base_url=srv.url, api_key_env="REALIGN_TEST_KEY", max_concurrency=1,
                                 max_retries=0)
        results = D.mask_texts([ORIG] * len(SCRIPTED), m, max_attempts=1)
        m.close()
    got = [r.reason for r in results]
    assert got == [want for _, _, want in SCRIPTED]
    summary = D.summarize_results(results)
    assert summary["valid"] == 7
    assert summary["invalid_by_reason"] == {"truncated": 1, "crosses_sentence": 2, "text_changed": 2, "no_mask": 1}
    assert all(r in M.REASONS for r in summary["invalid_by_reason"])
    assert m.stats["finish_length"] == 1


# --------------------------------------------------------------------------------- 4 · induction
def test_new_token_budget_follows_the_masked_text():
    from transformers import AutoTokenizer

    from realign_lib.induction.similarity import default_sentence_model

    tok = AutoTokenizer.from_pretrained(default_sentence_model())
    short, long = "a [MASK] car .", " ".join(["a [MASK] car is parked near the [MASK] ."] * 60)
    assert fillers.new_token_budget(tok, [short]) < 64 < 256 < fillers.new_token_budget(tok, [long])
    assert fillers.new_token_budget(tok, [long], cap=300) == 300


def test_length_guard_refuses_cut_candidates(tmp_path):
    from realign_lib.induction.similarity import SentenceEncoder

    docs = freeform_descriptions(6, seed=11)
    items = [induction.Item(f"s{i}", "Describe.", "x.png", d.text, d.text.replace("dog", "[MASK]", 1) if "dog" in
                            d.text else "[MASK] " + d.text.split(" ", 1)[1],
                            [induction.Candidate(1, "a.png", "a.png"), induction.Candidate(2, "b.png", "b.png")])
             for i, d in enumerate(docs)]

    def cut_fill(images, prompts, masked):  # a reply cut off after 12 words, as with a fixed token limit
        return [" ".join(m.replace("[MASK]", "cat").split()[:12]) for m in masked]

    enc = SentenceEncoder(batch_size=8)
    off = induction.induce(items, cut_fill, enc, 0.95, tmp_path / "a.jsonl", tmp_path / "as.jsonl", progress=False,
                           min_length_ratio=0.0)
    on = induction.induce(items, cut_fill, enc, 0.95, tmp_path / "b.jsonl", tmp_path / "bs.jsonl", progress=False,
                          require_any=False)
    assert off["pairs"] == len(items) and off["too_short"] == 0
    assert on["pairs"] == 0 and on["too_short"] == 2 * len(items)
    skipped = [json.loads(x) for x in (tmp_path / "bs.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in skipped} == {"too_short"}
    assert induction.too_short("one two three four", "one") and not induction.too_short("one two", "one")


def test_similarity_sees_a_change_at_the_end_of_a_long_text():
    from realign_lib.induction.similarity import SentenceEncoder

    enc = SentenceEncoder(batch_size=8)
    base = " ".join(d.text for d in freeform_descriptions(4, seed=3))
    a = base + " A red bus is parked beside the old church."
    b = base + " A green tractor is parked beside the old church."
    assert len(enc.model.tokenizer(a)["input_ids"]) > enc.model.max_seq_length  # the window would cut the change
    sim = enc.similarity([a], [b])[0]
    assert sim < 0.999
    assert enc.similarity([a], [a])[0] == 1.0
    short = ["A red bus is parked.", "A green tractor is parked."]
    assert np.allclose(enc.encode(short), SentenceEncoder(batch_size=8).encode(short))  # short texts as before


# ------------------------------------------------------------------- multi-paragraph descriptions
def test_freeform_descriptions_are_deterministic_multi_paragraph_with_truth():
    docs = freeform_descriptions(200, seed=0)
    assert [d.text for d in docs[:5]] == [d.text for d in freeform_descriptions(5, seed=0)]
    assert all("\n\n" in d.text for d in docs) and len({d.text for d in docs}) == 200
    d = docs[0]
    assert all(d.text[a:b].isalnum() or "_" in d.text[a:b] for a, b, _ in d.words)
    assert Counter(c for d in docs for _, _, c in d.words)["object"] > 1000


def test_rule_masker_on_200_multi_paragraph_descriptions(rule):
    docs = freeform_descriptions(200, seed=0)
    results = D.mask_texts([d.text for d in docs], rule)
    assert sum(r.ok for r in results) == 200
    q = masking_quality(docs, [[(s.start, s.end) for s in r.spans] for r in results])
    assert q["object_recall"] > 0.95 and q["content_share"] > 0.9 and 0.3 < q["mask_rate"] < 0.6
