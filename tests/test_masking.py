"""Stage 2 strategic masking: one validity check for every backend, the three backends, resumable driver.

The API backend is tested against a real HTTP server speaking the chat-completions protocol (the real
``openai`` client talks to it over a socket), not against a patched client.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from chat_server import ChatServer as SharedChatServer
from chat_server import Reply

from realign_lib.masking import core as M
from realign_lib.masking import driver as D
from realign_lib.masking import rule as maskers
from realign_lib.masking.backends import make_masker
from realign_lib.masking.core import InvalidMasking, check_masking, validate_masking
from realign_lib.masking.llm import HFMasker, OpenAIMasker, default_smollm2_gguf
from realign_lib.prompts import MASK, MASK_PROMPT, ONE_SHOT_EXAMPLE

ORIG = "in this field scene there is a red house at the bottom , a green tree on the left ."


# ------------------------------------------------------------------------------ validity check
@pytest.mark.parametrize("masked, spans", [
    ("in this [MASK] scene there is a [MASK] at the [MASK] , a [MASK] on the [MASK] .",
     ["field", "red house", "bottom", "green tree", "left"]),
    ("in this field scene there is a red house at the bottom , a green tree on the [MASK] .", ["left"]),
    ("[MASK] this field scene there is a red house at the bottom , a green tree on the left .", ["in"]),
    ("in this field scene there is a [MASK] [MASK] at the bottom , a green tree on the left .", ["red", "house"]),
    # tolerated: whitespace next to a mask and at the two ends
    ("  in this [MASK]scene there is a[MASK] at the bottom , a green tree on the left .\n", ["field", "red house"]),
    ("in this [MASK][MASK] scene there is a red house at the bottom , a green tree on the left .", ["field"]),
])
def test_check_accepts_real_maskings(masked, spans):
    got = check_masking(ORIG, masked)
    assert [s.text for s in got] == spans
    assert all(ORIG[s.start:s.end] == s.text for s in got)
    canonical = M.apply_spans(ORIG, got)
    assert check_masking(ORIG, canonical) == got  # the canonical text is itself valid, same spans
    assert validate_masking(ORIG, masked).masked == canonical


@pytest.mark.parametrize("masked, reason", [
    ("in this [MASK] scene there is a blue house at the bottom , a green tree on the left .", "text_changed"),
    ("In this [MASK] scene there is a red house at the bottom , a green tree on the left .", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom ; a green tree on the left .", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom , a green tree on the left", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom .", "text_changed"),
    ("Sure! in this [MASK] scene there is a red house at the bottom , a green tree on the left .", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom , a green tree on the left . [MASK]", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom , a green tree on the left . The end.", "text_changed"),
    ("in this [MASK] scene there is a red house at the bottom , a green tree on the left . on the [MASK] .",
     "text_changed"),
    ("in [MASK] on the left .", "long_mask"),
    (ORIG, "no_mask"),
    ("  " + ORIG + "\n", "no_mask"),
    ("[MASK] .", "all_masked"),
    ("[MASK]", "all_masked"),
    ("in this fi[MASK] scene there is a red house at the bottom , a green tree on the left .", "partial_word"),
    ("", "empty_output"),
    ("   ", "empty_output"),
])
def test_check_rejects_everything_else(masked, reason):
    with pytest.raises(InvalidMasking) as err:
        check_masking(ORIG, masked)
    assert err.value.reason == reason, err.value
    assert reason in M.REASONS
    chk = validate_masking(ORIG, masked)
    assert not chk.ok and chk.reason == reason and chk.masked is None


def test_check_refuses_an_original_that_holds_a_mask_and_counts_words():
    assert validate_masking("a [MASK] here", "a [MASK] [MASK]").reason == "original_has_mask"
    assert M.word_count("a red-house , two cars .") == 5
    with pytest.raises(ValueError, match="overlap"):
        M.apply_spans("abcdef", [(0, 3), (2, 4)])


def test_extract_reply_strips_only_wrapping():
    o = "a red car ."
    assert M.extract_reply('  "a [MASK] car ."\n', o) == "a [MASK] car ."
    assert M.extract_reply("```\na [MASK] car .\n```", o) == "a [MASK] car ."
    assert M.extract_reply("Here it is: a [MASK] car .", o) == "Here it is: a [MASK] car ."
    assert M.extract_reply('"quoted" text', '"quoted" text') == '"quoted" text'


def test_viable_prefix_is_necessary_for_validity():
    masked = "in this [MASK] scene there is a [MASK] at the [MASK] , a [MASK] on the [MASK] ."
    for i in range(len(masked) + 1):  # every prefix of a valid masking stays viable
        assert M.is_viable_prefix(ORIG, masked[:i]), masked[:i]
    assert M.is_viable_prefix(ORIG, '```\n"in this [MA')
    assert not M.is_viable_prefix(ORIG, "The")
    assert not M.is_viable_prefix(ORIG, "in this [MASK] scene there is a [MASK] hoose")


def test_one_shot_and_free_form_constants():
    assert MASK_PROMPT == ("Please mask any words of the segments related to the objects, attributes, and logical "
                           "relationships of the input image in the following description by replacing them with "
                           "[MASK].")
    check_masking(*ONE_SHOT_EXAMPLE)
    assert len(D.FREE_FORM_EXAMPLES) >= 20 and all(MASK not in t for t in D.FREE_FORM_EXAMPLES)


# ------------------------------------------------------------------------------ rule backend
@pytest.fixture(scope="module")
def rule():
    return maskers.RuleMasker()


def _masked_words(text, spans):
    return {w for s in spans for w in re.findall(r"\w+", s.text)}


def test_rule_masks_objects_attributes_relations_on_tiny_world(rule):
    from realign_lib.tinyworld.scenes import sample_scenes
    from realign_lib.tinyworld.world import describe

    scenes = sample_scenes(60, seed=5)
    texts = [describe(s) for s in scenes]
    results = D.mask_texts(texts, rule)
    assert all(r.ok for r in results), [(r.text, r.reason) for r in results if not r.ok]
    for s, r in zip(scenes, results):
        assert check_masking(r.text, r.masked) == r.spans
        masked = _masked_words(r.text, r.spans)
        kept = re.findall(r"\w+", r.masked.replace(MASK, " "))
        for o in s.objects:
            assert {o.type, o.colour, o.position} <= masked, (r.text, r.masked)  # object, colour, position
            if o.size_word:
                assert o.size_word in masked
        assert s.scene in masked  # the kind of scene ("field", "night") is an attribute of the image
        for rel in ("above", "below"):
            if f" is {rel} " in r.text:
                assert rel in masked
        assert {"there", "is", "a", "the"} & set(kept) or "shows" in kept  # the scaffold stays
        assert not {"the", "a", "and", "is", "with", "on", "at", "in"} & masked
    stats = D.summarize_results(results)
    assert stats["validity_rate"] == 1.0 and 0.25 < stats["mask_rate"] < 0.6
    assert set(rule.category_counts) == {"object", "attribute", "relation"}


def test_rule_masks_free_form_text(rule):
    text = ("Two giraffes are standing next to a tall acacia tree on a dry savanna. The larger giraffe is eating "
            "leaves from the upper branches, while a small white bird sits above it.")
    r = D.mask_texts([text], rule)[0]
    assert r.ok, r.reason
    masked = _masked_words(text, r.spans)
    assert {"Two", "giraffes", "tall", "acacia", "tree", "dry", "savanna", "larger", "giraffe", "leaves", "upper",
            "branches", "small", "white", "bird", "above", "next", "to"} <= masked
    assert not {"are", "standing", "is", "eating", "while", "sits", "The", "a", "from", "it"} & masked
    assert "next to" in [s.text for s in r.spans]  # a relation is its own segment
    word = maskers.RuleMasker(nlp=rule.nlp, granularity="word").mask_batch([text])[0]
    assert word.count(MASK) > r.masked.count(MASK)
    stats = D.summarize_results(D.mask_texts(list(D.FREE_FORM_EXAMPLES), rule))
    assert stats["validity_rate"] == 1.0 and 0.25 < stats["mask_rate"] < 0.7


def test_rule_does_not_mask_verbs_like_left(rule):
    r = D.mask_texts(["The man left the room through a wooden door on the left ."], rule)[0]
    assert r.masked == "The [MASK] left the [MASK] through a [MASK] on the [MASK] ."


# ------------------------------------------------------------------------------ HF backend
@pytest.fixture(scope="module")
def smollm2():
    try:
        default_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF file not found ({err})")
    return HFMasker(batch_size=4)


def test_hf_masker_runs_smollm2_and_passes_on_only_valid_output(smollm2, tmp_path):
    assert smollm2.name == "hf:SmolLM2-135M-Instruct.Q4_1.gguf"
    prompt = smollm2.prompt("a red car .", attempt=1)
    assert MASK_PROMPT in prompt and ONE_SHOT_EXAMPLE[1] in prompt and prompt.rstrip().endswith("assistant")
    samples = [{"id": "t1", "chosen": ORIG},
               {"id": "t2", "chosen": "the image shows a sea background with a white boat on the left ."},
               {"id": "t3", "chosen": "A black cat sits on a wooden fence."}]
    counts = D.run_masking(samples, smollm2, tmp_path / "masked.jsonl", batch_size=3, require_any=False)
    assert counts["tried"] == 3 and counts["valid"] + counts["invalid"] == 3
    assert counts["retried"] == counts["invalid"] + counts["recovered_by_retry"]  # every invalid one had a 2nd try
    recs = [json.loads(x) for x in open(tmp_path / "masked.jsonl")]
    fails = [json.loads(x) for x in open(tmp_path / "masking_failures.jsonl")] if counts["invalid"] else []
    assert len(recs) == counts["valid"] and len(fails) == counts["invalid"]
    for rec in recs:  # whatever SmolLM2 says, only valid maskings get through
        spans = check_masking(rec["chosen"], rec["masked"])
        assert [s.to_dict() for s in spans] == rec["spans"]
    for f in fails:
        assert f["attempts"] == 2 and f["kind"] == "invalid" and not validate_masking(f["chosen"], f["output"]).ok


# ------------------------------------------------------------------------------ API backend
KEY = "sk-test-0123456789-secret"


class ChatServer(SharedChatServer):
    """The shared chat server (tests/chat_server.py) with replies per input text following a script:
    ``("ok", content)``, ``("status", code)``, ``("garbage",)`` (a cut-off JSON body), ``("sleep", s,
    content)``, ``("body", text, content_type)``; the last action of a text repeats."""

    def __init__(self, script=None, default=None):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default = default or (lambda text: ("ok", text))
        super().__init__(self._respond, key=KEY)

    @staticmethod
    def text_of(req) -> str:
        return req.text.split("\n\n", 1)[1]

    def count(self, text: str) -> int:
        return sum(self.text_of(r) == text for r in self.requests)

    def _respond(self, req) -> Reply:
        if not req.text.startswith(MASK_PROMPT):
            return Reply(status=400, body=json.dumps({"error": {"message": "unexpected request"}}))
        text = self.text_of(req)
        with self.lock:
            queue = self.script.get(text)
            action = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else None
        action = action or self.default(text)
        kind = action[0]
        if kind == "sleep":
            return Reply(content=action[2], sleep=action[1])
        if kind == "status":
            return Reply(status=action[1], body=json.dumps({"error": {"message": f"status {action[1]}"}}))
        if kind == "garbage":
            return Reply(status=200, body='{"id": "x", "choices": [ {"message": ')
        if kind == "body":  # a well-formed reply of the wrong shape
            return Reply(status=200, body=action[1], ctype=action[2])
        return Reply(content=action[1])


def _api_masker(url, **kw):
    kw = {"api_key_env": "REALIGN_TEST_KEY", "max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05,
          "timeout": 5.0, "max_concurrency": 3, **kw}
    return OpenAIMasker("test-model", base_url=url, **kw)


TEXTS = {
    "good": "a big red car is parked next to a small tree .",
    "wrong": "two dogs are running on the grass .",
    "limited": "a white boat floats below a yellow moon .",
    "broken": "the kitchen has a blue table and three chairs .",
    "garbage": "a black cat sits on a wooden fence .",
    "slow": "a green kite flies above the beach .",
    "down": "three birds sit on a power line .",
}
GOOD = {
    TEXTS["good"]: "a [MASK] is parked [MASK] a [MASK] .",
    TEXTS["wrong"]: "[MASK] are running on the [MASK] .",
    TEXTS["limited"]: "a [MASK] floats [MASK] a [MASK] .",
    TEXTS["broken"]: "the [MASK] has a [MASK] and [MASK] .",
    TEXTS["garbage"]: "a [MASK] sits on a [MASK] .",
    TEXTS["slow"]: "a [MASK] flies [MASK] the [MASK] .",
}


def test_openai_masker_against_a_real_http_server(tmp_path, monkeypatch):
    monkeypatch.setenv("REALIGN_TEST_KEY", KEY)
    script = {
        TEXTS["good"]: [("ok", GOOD[TEXTS["good"]])],
        TEXTS["wrong"]: [("ok", "Sure! Here is the masked description: [MASK] are running."),
                         ("ok", "two cats are running on the grass .")],  # never a masking of the input
        TEXTS["limited"]: [("status", 429), ("ok", GOOD[TEXTS["limited"]])],
        TEXTS["broken"]: [("status", 500), ("status", 503), ("ok", GOOD[TEXTS["broken"]])],
        TEXTS["garbage"]: [("garbage",), ("ok", "```\n" + GOOD[TEXTS["garbage"]] + "\n```")],
        TEXTS["slow"]: [("sleep", 1.5, GOOD[TEXTS["slow"]]), ("ok", GOOD[TEXTS["slow"]])],
        TEXTS["down"]: [("status", 502)],  # fails every time
    }
    samples = [{"id": k, "chosen": v} for k, v in TEXTS.items()]
    out = tmp_path / "02_masking" / "masked.jsonl"
    with ChatServer(script) as srv:
        masker = _api_masker(srv.url, timeout=0.5)
        assert KEY not in repr(masker)
        counts = D.run_masking(samples, masker, out, batch_size=7)
        stats = dict(masker.stats)
        masker.close()
        assert {r.authorization for r in srv.requests} == {f"Bearer {KEY}"}  # key from the environment, as Bearer
        assert all(r.body["temperature"] == 0 and r.body["model"] == "test-model" for r in srv.requests)
        assert srv.count(TEXTS["good"]) == 1
        assert srv.count(TEXTS["wrong"]) == 2  # invalid -> retried once with the one-shot example -> skipped
        second = [r for r in srv.requests if srv.text_of(r) == TEXTS["wrong"]][1].body["messages"]
        assert len(second) == 3 and second[1]["content"] == ONE_SHOT_EXAMPLE[1]
        assert srv.count(TEXTS["limited"]) == 2 and srv.count(TEXTS["broken"]) == 3
        assert srv.count(TEXTS["garbage"]) == 2 and srv.count(TEXTS["slow"]) == 2
        assert srv.count(TEXTS["down"]) == 4  # 1 + max_retries, then given up
    recs = {r["id"]: r for r in map(json.loads, open(out))}
    assert set(recs) == {"good", "limited", "broken", "garbage", "slow"}
    for r in recs.values():
        assert r["masked"] == GOOD[r["chosen"]] and r["backend"] == "openai:test-model"
        assert check_masking(r["chosen"], r["masked"])
    fails = {r["id"]: r for r in map(json.loads, open(out.parent / "masking_failures.jsonl"))}
    assert fails["wrong"]["reason"] == "text_changed" and fails["wrong"]["kind"] == "invalid"
    assert fails["wrong"]["attempts"] == 2 and fails["wrong"]["output"] == "two cats are running on the grass ."
    assert fails["down"]["reason"] == "api_error" and fails["down"]["kind"] == "backend_error"
    assert counts["tried"] == 7 and counts["valid"] == 5 and counts["retried"] == 1
    assert counts["invalid_by_reason"] == {"text_changed": 1, "api_error": 1}
    assert stats["http_429"] == 1 and stats["http_500"] == 1 and stats["http_503"] == 1 and stats["http_502"] == 4
    assert stats["timeout"] == 1 and stats["bad_response"] == 1 and stats["retries"] == 1 + 2 + 1 + 1 + 3
    for f in tmp_path.rglob("*"):  # the key is never written anywhere
        if f.is_file():
            assert KEY not in f.read_text(errors="replace"), f

    # rerun: valid ids and invalid ones are skipped; the backend error is tried again (server is up now)
    with ChatServer(default=lambda text: ("ok", "three [MASK] sit on a [MASK] .")) as srv:
        masker = _api_masker(srv.url)
        again = D.run_masking(samples, masker, out)
        masker.close()
        assert [srv.text_of(r) for r in srv.requests] == [TEXTS["down"]]
    assert again["tried"] == 1 and again["valid"] == 1 and again["skipped_done"] == 5 and again["skipped_failed"] == 1
    summary = D.summarize_files(out)
    assert summary["valid"] == 6 and summary["failed"] == 1 and summary["failures_by_reason"] == {"text_changed": 1}


def test_openai_masker_key_only_from_environment_and_bad_key_aborts(monkeypatch):
    monkeypatch.delenv("REALIGN_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="REALIGN_TEST_KEY"):
        _api_masker("http://127.0.0.1:9/v1")
    monkeypatch.setenv("REALIGN_TEST_KEY", "sk-wrong")
    with ChatServer() as srv:
        masker = _api_masker(srv.url)
        with pytest.raises(RuntimeError, match="AuthenticationError") as err:
            masker.mask_batch(["a red car ."])
        assert "sk-wrong" not in str(err.value)
        masker.close()


@pytest.mark.parametrize("body, ctype", [('{"unexpected": true}', "application/json"),
                                         ('{"choices": []}', "application/json"),
                                         ("internal proxy page", "text/html")])
def test_openai_masker_gives_up_on_replies_of_the_wrong_shape(monkeypatch, body, ctype):
    monkeypatch.setenv("REALIGN_TEST_KEY", KEY)
    with ChatServer(default=lambda text: ("body", body, ctype)) as srv:
        masker = _api_masker(srv.url, max_retries=1)
        out = masker.mask_batch(["a red car ."])
        masker.close()
    assert isinstance(out[0], M.BackendFailure) and out[0].reason == "api_error"
    assert "unreadable reply" in out[0].detail and masker.stats["bad_response"] == 2 and len(srv.requests) == 2


def test_openai_masker_bounds_concurrency(monkeypatch):
    monkeypatch.setenv("REALIGN_TEST_KEY", KEY)
    live, peak, lock = [0], [0], threading.Lock()

    def slow_echo(text):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.15)
        with lock:
            live[0] -= 1
        return ("ok", text.replace("car", "[MASK]"))

    with ChatServer(default=slow_echo) as srv:
        masker = _api_masker(srv.url, max_concurrency=2)
        outs = masker.mask_batch([f"a red car number {i} ." for i in range(6)])
        masker.close()
    assert outs == [f"a red [MASK] number {i} ." for i in range(6)]
    assert peak[0] == 2


# ------------------------------------------------------------------------------ resumability
def _mask_second_word(text: str) -> str:
    words = text.split(" ")
    return " ".join(words[:1] + ["[MASK]"] + words[2:])


class SecondWordMasker(M.Masker):
    """Masks the second word (deterministic, no model)."""

    name = "second-word"

    def mask_batch(self, texts, attempt=0):
        return [_mask_second_word(t) for t in texts]


def _samples(n):
    return [{"id": f"s{i:02d}", "chosen": f"word{i} and a red car number {i} ."} for i in range(n)]


def test_run_masking_resumes_after_an_interruption(tmp_path, rule):
    samples = _samples(10) + [{"id": "one", "chosen": "apples"}]  # "apples" -> all masked -> failure
    full = tmp_path / "full" / "masked.jsonl"
    first = D.run_masking(samples, rule, full, batch_size=3)
    assert first["valid"] == 10 and first["invalid_by_reason"] == {"all_masked": 1} and first["retried"] == 0

    part = tmp_path / "part" / "masked.jsonl"
    D.run_masking(samples, rule, part, batch_size=3)
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # 4 records + a half-written line
    again = D.run_masking(samples, rule, part, batch_size=3)
    assert again["repaired_bytes"] > 0 and again["skipped_done"] == 4 and again["tried"] == 6
    recs = [json.loads(x) for x in part.read_text().splitlines()]
    assert len(recs) == len({r["id"] for r in recs}) == 10
    assert part.read_text() == full.read_text()  # identical to the uninterrupted run

    third = D.run_masking(samples, rule, part)  # nothing left to do
    assert third["tried"] == 0 and third["skipped_done"] == 10 and third["skipped_failed"] == 1
    with pytest.raises(ValueError, match="another backend"):
        D.run_masking(samples, SecondWordMasker(), part)
    with pytest.raises(ValueError, match="duplicate"):
        D.run_masking(samples + samples[:1], rule, tmp_path / "x.jsonl")


class DownMasker(M.Masker):
    """An endpoint that is down for every request until ``up`` is set."""

    name = "down-then-up"

    def __init__(self):
        self.up = False

    def mask_batch(self, texts, attempt=0):
        if not self.up:
            return [M.BackendFailure("api_error", "connection refused") for _ in texts]
        return [_mask_second_word(t) for t in texts]


def test_a_masking_stage_that_did_no_work_fails_and_a_rerun_retries(tmp_path):
    masker, out = DownMasker(), tmp_path / "masked.jsonl"
    with pytest.raises(RuntimeError, match=r"no valid masking for any of the 4 samples \(failed: api_error 4\)"):
        D.run_masking(_samples(4), masker, out, max_attempts=1)
    masker.up = True  # the endpoint is back: the rerun retries every backend failure
    done = D.run_masking(_samples(4), masker, out, max_attempts=1)
    assert done["valid"] == 4 and len(out.read_text().splitlines()) == 4


def test_run_masking_masks_a_changed_sample_again(tmp_path):
    out = tmp_path / "masked.jsonl"
    D.run_masking(_samples(4), SecondWordMasker(), out)
    changed = _samples(4)
    changed[2]["chosen"] = "another text about a blue boat ."  # stage 00 re-ran with other settings
    again = D.run_masking(changed, SecondWordMasker(), out)
    assert again["stale_dropped"] == 1 and again["tried"] == 1 and again["skipped_done"] == 3
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs) == 4 and recs["s02"]["chosen"] == changed[2]["chosen"] and recs["s02"]["masked"] == "another [MASK] about a blue boat ."


def test_run_masking_masks_everything_again_when_its_settings_change(tmp_path, rule):
    """Records made under another ``max_mask_words`` or another stoplist are never resumed."""
    out, samples, log = tmp_path / "masked.jsonl", _samples(5), []
    D.run_masking(samples, rule, out)
    same = D.run_masking(samples, rule, out, log=log.append)
    assert same["tried"] == 0 and same["skipped_done"] == 5 and not log
    tighter = D.run_masking(samples, rule, out, max_mask_words=1, require_any=False, log=log.append)
    assert tighter["tried"] == 5 and tighter["skipped_done"] == 0 and "max_mask_words" in log[0]
    assert tighter["invalid_by_reason"] == {"long_mask": 5}  # each masking has a span of two or more words
    no_stoplist = maskers.RuleMasker(nlp=rule.nlp, stoplist=False)
    again = D.run_masking(samples, no_stoplist, out, log=log.append)
    assert again["tried"] == 5 and again["skipped_failed"] == 0 and "stop_phrases" in log[1]
    assert json.loads(out.with_name("masked.settings.json").read_text())["stop_phrases"] == []
    assert len(out.read_text().splitlines()) == again["valid"] == 5  # nothing of the earlier runs is left


def test_run_masking_survives_sigkill(tmp_path, root):
    out = tmp_path / "masked.jsonl"
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from realign_lib.masking import core as M, driver as D\n"
        "class Slow(M.Masker):\n"
        "    name = 'second-word'\n"
        "    def mask_batch(self, texts, attempt=0):\n"
        "        time.sleep(0.1)\n"
        "        return [' '.join(t.split(' ')[:1] + ['[MASK]'] + t.split(' ')[2:]) for t in texts]\n"
        "samples = [{'id': f's{i:02d}', 'chosen': f'word{i} and a red car number {i} .'} for i in range(40)]\n"
        "D.run_masking(samples, Slow(), sys.argv[1], batch_size=2)\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=root, env=env)
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = out.read_text().count("\n")
    assert 6 <= n_before < 40, "the job finished before it could be killed"
    counts = D.run_masking(_samples(40), SecondWordMasker(), out, batch_size=7)
    assert counts["skipped_done"] == n_before and counts["tried"] == 40 - n_before
    ref = tmp_path / "ref.jsonl"
    D.run_masking(_samples(40), SecondWordMasker(), ref, batch_size=5)
    assert out.read_text() == ref.read_text()


def test_make_masker_names_backends(monkeypatch):
    with pytest.raises(ValueError, match="rule, hf, constrained or openai"):
        make_masker("gpt")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        make_masker("openai", api_model="m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(ValueError, match="model name"):
        make_masker("openai", api_model="")


def test_a_text_too_long_for_spacy_is_one_counted_failure_not_the_end_of_the_batch(rule, tmp_path):
    samples = _samples(3)
    samples[1]["chosen"] = "a red car . " * 100  # over the (lowered) limit below
    old = rule.nlp.max_length
    rule.nlp.max_length = 500
    try:
        counts = D.run_masking(samples, rule, tmp_path / "masked.jsonl")
    finally:
        rule.nlp.max_length = old
    assert counts["valid"] == 2 and counts["invalid_by_reason"] == {"too_long": 1}
    fail = json.loads((tmp_path / "masking_failures.jsonl").read_text())
    assert fail["id"] == "s01" and "1,200 characters; spaCy reads at most 500" in fail["detail"]


# ------------------------------------------------------------------------------ notebook helpers
def test_masked_pieces_tags_what_the_rule_masker_hides(rule):
    text = "A black-and-white dog sits next to 3 cups on a wooden table."
    chk = validate_masking(text, rule.mask_batch([text])[0])
    pieces = maskers.masked_pieces(text, chk.spans, rule.nlp)
    assert "".join(p for p, _ in pieces) == text
    tags = {p: c for p, c in pieces if c}
    assert tags["dog"] == tags["cups"] == tags["table"] == "object"
    assert tags["black"] == tags["white"] == tags["wooden"] == "attribute"
    assert tags["3"] == "count" and tags["next"] == "relation" and tags["-"] == "other"
    assert all(c is None for p, c in pieces if p in ("A ", " sits ", " on a "))
    as_dicts = [s.to_dict() for s in chk.spans]  # as stored in masked.jsonl; without spaCy: one piece a span
    assert maskers.masked_pieces(text, as_dicts) == maskers.masked_pieces(text, [(s.start, s.end) for s in chk.spans])
    assert [p for p, c in maskers.masked_pieces(text, as_dicts) if c] == [s.text for s in chk.spans]
    assert maskers.masked_pieces(text, []) == [(text, None)]


def test_set_aside_other_backend_moves_only_another_backends_output(tmp_path):
    out, fails = tmp_path / "masked.jsonl", tmp_path / "masking_failures.jsonl"
    assert D.set_aside_other_backend(out, fails, "rule") == (None, [])  # nothing there
    D.run_masking(_samples(3), SecondWordMasker(), out)
    fails.write_text(json.dumps({"id": "x", "backend": "second-word"}) + "\n")
    assert D.set_aside_other_backend(out, fails, "second-word") == (None, ["second-word"])  # its own: kept
    old, found = D.set_aside_other_backend(out, fails, "rule", now=123)
    assert found == ["second-word"] and old == tmp_path / "previous_second-word_123"
    assert not out.exists() and not fails.exists()
    assert len((old / "masked.jsonl").read_text().splitlines()) == 3 and (old / "masking_failures.jsonl").is_file()


def test_evaluate_backends_caches_each_result(tmp_path, rule):
    cache = tmp_path / "backend_eval.json"
    sets = {"rule": {"tiny_world": ["a red car is on the left ."], "free_form": list(D.FREE_FORM_EXAMPLES[:2])}}
    summary = {"valid": 9, "failed": 1, "validity_rate": 0.9, "mask_rate": 0.4, "failures_by_reason": {"all_masked": 1}}
    ev = D.evaluate_backends(sets, cache, "rule", rule, summary)
    assert ev["rule"]["tiny_world"] == {"n": 10, "validity_rate": 0.9, "mask_rate": 0.4,
                                        "invalid_by_reason": {"all_masked": 1}, "source": "this run's output"}
    ff = ev["rule"]["free_form"]
    assert ff["n"] == 2 and ff["validity_rate"] == 1.0 and ff["source"] == "evaluation subset"
    stored = json.loads(cache.read_text())
    assert list(stored) == [next(k for k in stored if k.startswith("rule||free_form|"))]

    class Refuses(M.Masker):
        name = "rule"

        def mask_batch(self, texts, attempt=0):
            raise AssertionError("a cached result was computed again")

    assert D.evaluate_backends(sets, cache, "rule", Refuses(), summary) == ev  # from the cache
    with pytest.raises(AssertionError, match="computed again"):  # other settings: not the cached result
        D.evaluate_backends(sets, cache, "rule", Refuses(), summary, max_mask_words=2)
    D.evaluate_backends(sets, cache, "rule", rule, summary, max_mask_words=2)
    assert [k.split("|")[3] for k in json.loads(cache.read_text())] == ["max_mask_words=2"]  # the old one dropped
    other = D.evaluate_backends({"hf": {"free_form": ["a red car ."]}}, cache, "rule", rule, summary,
                                hf_model=str(tmp_path / "no_such_model"))
    assert "unavailable" in other["hf"]["free_form"]
