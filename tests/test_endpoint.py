"""The OpenAI-compatible endpoint as a VLM: induction fills and chosen responses through a real local
HTTP server that speaks chat completions (the real `openai` client talks to it), images as data URLs."""
import base64
import io
import json

import numpy as np
import pytest
from chat_server import ChatServer, Reply
from PIL import Image

from realign_lib.data import llava as data
from realign_lib.induction import loop as ind
from realign_lib.induction.fillers import EndpointFiller
from realign_lib.induction.similarity import SentenceEncoder
from realign_lib.models.endpoint import ChatEndpoint, EndpointFailure, image_data_url, user_message
from realign_lib.prompts import COMPLETION_PROMPT

KEY = "sk-test-endpoint-0123456789"


def colour_of(image) -> str:
    return "red" if np.asarray(image)[..., 0].mean() > 128 else "blue"


class VLMServer(ChatServer):
    """The shared chat server (tests/chat_server.py), started, as a VLM with one image per request:
    replies ``reply(text, image_colour)``; ``fail`` maps a text to a queue of HTTP statuses to return
    first."""

    def __init__(self, reply, fail=None):
        self.reply, self.fail = reply, {k: list(v) for k, v in (fail or {}).items()}
        super().__init__(self._respond, key=KEY)
        self.__enter__()

    def _respond(self, req) -> Reply:
        assert req.image is not None  # the image arrived as a PNG data URL
        with self.lock:
            queue = self.fail.get(req.text)
            status = queue.pop(0) if queue else None
        if status:
            return Reply(status=status, body=json.dumps({"error": {"message": f"status {status}"}}))
        return Reply(content=self.reply(req.text, colour_of(req.image)))


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for name, rgb in (("red.png", (220, 30, 30)), ("blue.png", (30, 30, 220))):
        Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(tmp_path / "img" / name)
    return tmp_path


def _endpoint(url, **kw):
    return ChatEndpoint("vlm", base_url=url, api_key_env="REALIGN_EP_KEY", max_retries=2, backoff_base=0.01,
                        backoff_max=0.02, timeout=5.0, **kw)


def test_data_url_and_message_shape(images):
    url = image_data_url(images / "img" / "red.png")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (16, 16)
    msg = user_message("what colour?", image=images / "img" / "red.png")
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == ["image_url", "text"]
    assert user_message("hi") == {"role": "user", "content": "hi"}


def test_induction_fills_through_a_vlm_server(images, monkeypatch, tmp_path):
    """The τ loop with an endpoint filler: the server sees each retrieved image, a failing request
    gives no candidate (next rank tried), and the accepted pairs name the right retrieved image."""
    monkeypatch.setenv("REALIGN_EP_KEY", KEY)

    def reply(text, colour):
        masked = text.split("\n", 1)[1]
        return masked.replace("[MASK]", colour)

    prompt_of = lambda m: f"{COMPLETION_PROMPT}\n{m}"  # noqa: E731
    srv = VLMServer(reply, fail={prompt_of("a [MASK] kite ."): [500, 500, 500]})  # every try of rank 1 fails
    try:
        ep = _endpoint(srv.url, max_concurrency=2)
        filler = EndpointFiller(ep)
        red, blue = str(images / "img" / "red.png"), str(images / "img" / "blue.png")
        items = [
            ind.Item("s0", "describe", str(images / "img" / "red.png"), "a red ball .", "a [MASK] ball .",
                     [ind.Candidate(1, "img/red.png", red), ind.Candidate(2, "img/blue.png", blue)]),
            ind.Item("s1", "describe", str(images / "img" / "red.png"), "a red kite .", "a [MASK] kite .",
                     [ind.Candidate(1, "img/blue.png", blue), ind.Candidate(2, "img/blue.png", blue)]),
        ]
        enc = SentenceEncoder(batch_size=8)
        summary = ind.induce(items, filler, enc, 0.95, tmp_path / "p.jsonl", tmp_path / "s.jsonl", progress=False)
        recs = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
        by = {r["id"]: r for r in recs}
        # s0: rank 1 (red image) reproduces the chosen text → rejected by τ; rank 2 (blue) accepted
        assert by["s0"]["rank"] == 2 and by["s0"]["rejected"] == "a blue ball ." and by["s0"]["similarities"][0] > 0.95
        # s1: rank 1 failed three times (no candidate, similarity null); rank 2 accepted
        assert by["s1"]["rank"] == 2 and by["s1"]["similarities"][0] is None and by["s1"]["rejected"] == "a blue kite ."
        assert ep.stats["failed"] == 1 and ep.stats["http_500"] == 3 and summary["pairs"] == 2
        assert {r.body.get("temperature") for r in srv.requests} == {0}
        assert [colour_of(r.image) for r in srv.requests if r.text == prompt_of("a [MASK] ball .")] == ["red", "blue"]
        ep.close()
    finally:
        srv.close()


def test_chosen_responses_from_an_endpoint_resume_and_count_failures(images, monkeypatch, tmp_path):
    monkeypatch.setenv("REALIGN_EP_KEY", KEY)
    srv = VLMServer(lambda text, colour: f"The image is {colour}." if "empty" not in text else "",
                    fail={"bad question": [400]})
    try:
        samples = [{"id": f"s{i}", "image": name, "image_root": str(images / "img"), "prompt": q, "chosen": "old"}
                   for i, (name, q) in enumerate([("red.png", "what colour?"), ("blue.png", "what colour?"),
                                                  ("red.png", "bad question"), ("blue.png", "empty please")])]
        ep = _endpoint(srv.url)
        cache = tmp_path / "chosen.jsonl"
        kept, counts = data.chosen_from_endpoint(samples[:2], ep, cache)
        assert [s["chosen"] for s in kept] == ["The image is red.", "The image is blue."]
        n = len(srv.requests)
        kept, counts = data.chosen_from_endpoint(samples, ep, cache)  # resumes: only s2, s3 are asked
        assert len(srv.requests) == n + 2
        assert counts == {"answered": 2, "failed": 1, "empty": 1} and [s["id"] for s in kept] == ["s0", "s1"]
        assert KEY not in cache.read_text() and KEY not in repr(ep)
        ep.close()
    finally:
        srv.close()


def test_wrong_key_aborts_and_missing_key_is_refused(images, monkeypatch):
    srv = VLMServer(lambda t, c: "x")
    try:
        monkeypatch.setenv("REALIGN_EP_KEY", "sk-wrong-key-987")
        ep = _endpoint(srv.url)
        with pytest.raises(RuntimeError, match="AuthenticationError") as err:
            ep.complete([user_message("hi", image=images / "img" / "red.png")])
        assert "sk-wrong-key-987" not in str(err.value)
        monkeypatch.delenv("REALIGN_EP_KEY")
        with pytest.raises(ValueError, match="REALIGN_EP_KEY.*not set"):
            _endpoint(srv.url)
    finally:
        srv.close()


def test_a_client_error_is_a_counted_failure_not_a_retry(images, monkeypatch):
    monkeypatch.setenv("REALIGN_EP_KEY", KEY)
    srv = VLMServer(lambda t, c: "fine", fail={"q": [422]})
    try:
        ep = _endpoint(srv.url)
        out = ep.complete([user_message("q", image=images / "img" / "red.png")])
        assert isinstance(out, EndpointFailure) and "HTTP 422" in out.detail and len(srv.requests) == 1
        assert ep.complete([user_message("q", image=images / "img" / "red.png")]) == "fine"
    finally:
        srv.close()


def test_scrub_secret_catches_the_key_however_it_is_quoted():
    from realign_lib.models.endpoint import scrub_secret

    key = "sk-proj-A1b2C3d4E5f6G7h8"
    forms = [key, json.dumps(key), repr(key + "\r"), json.dumps(key + "\r\n"), f"Bearer {key}",
             f"{key[:10]}****************{key[-6:]}", key.replace("-", "\\-"), f"<{key}>"]
    for form in forms:
        out = scrub_secret(f"error: invalid key {form} given", key)
        assert not any(key[i:i + 6] in out for i in range(len(key) - 5)), (form, out)
        assert out.startswith("error: invalid key ") and out.endswith(" given")
    assert scrub_secret("nothing secret here", key) == "nothing secret here"
    assert scrub_secret("a short key abc here", "abc") == "a short key *** here"


@pytest.mark.parametrize("tail", ["\r", "\n", " ", "\r\n"])
def test_a_key_with_whitespace_around_it_is_stripped_and_never_quoted(images, monkeypatch, tail):
    """A key read from a .env with CRLF endings (``sk-…\\r``): stripped before use (the server sees the
    bare key, no retry storm), and an error body that quotes it, in any form, leaves no trace of it."""
    quoted = f"bad request for key {KEY!r} ({json.dumps(KEY + tail)}; {KEY[:9]}****{KEY[-5:]})"
    srv = ChatServer(lambda req: Reply(status=400, body=json.dumps({"error": {"message": quoted}})), key=KEY)
    monkeypatch.setenv("REALIGN_EP_KEY", KEY + tail)
    with srv:
        ep = _endpoint(srv.url)
        out = ep.complete([user_message("q", image=images / "img" / "red.png")])
        assert [r.authorization for r in srv.requests] == [f"Bearer {KEY}"]  # stripped, sent once
        assert isinstance(out, EndpointFailure) and "HTTP 400" in out.detail
        assert not any(KEY[i:i + 6] in out.detail for i in range(len(KEY) - 5)), out.detail
        ep.close()
