"""QA pairs from captions (Re-Align §4.1): a text LLM writes short question-answer pairs from each image's
caption; the local chat-completions server of ``chat_server.py`` stands in for the paid API (the real
``openai`` client talks to it over a socket). Layout, reasons for every rejection, resume after a kill,
restart on changed settings, and the key never on disk; one papermill run of ``00_real_data``."""
import json
import re

import numpy as np
import pytest
from chat_server import ChatServer, Reply, completion
from PIL import Image

from realign_lib.data import caption_qa as cq
from realign_lib.data import llava as data
from realign_lib.files import write_jsonl
from realign_lib.models.endpoint import ChatEndpoint

KEY = "sk-TEST-Zq8vX1kP7wR4mN2bY6"  # no run of 6 characters of it is a word of the outputs
ENV = "REALIGN_QA_KEY"

CAPTIONS = {  # image → caption; a capitalised word tells the stand-in LLM how to misbehave
    "a.jpg": "A red bus is parked next to two bicycles.",
    "b.jpg": ["A man holds a black umbrella on a street.", "A person with an umbrella walks in the rain."],
    "c.jpg": "A suitcase and a backpack lie on a wooden bench. FENCE",
    "d.jpg": "Three dogs run on a sandy beach. PROSE",
    "e.jpg": "A white cat sleeps on a blue sofa. BROKEN",
    "f.jpg": "A green kite flies over a park. DICT",
    "g.jpg": "Two horses graze in a field. YESNO DUP EMPTY INVENT",
    "h.jpg": "A wooden table with four chairs. NONE",
    "i.jpg": "A yellow taxi waits at a corner. LONG",
}


def caption_of(text: str) -> str:
    """The caption part of a request made with :data:`QA_PROMPT`."""
    assert "Caption:\n" in text, text[:200]
    return text.rsplit("Caption:\n", 1)[1]


def qa_pairs(caption: str, n: int) -> list[dict]:
    """n + 1 grounded pairs (one more than asked for, to be capped), one per content word of the caption."""
    words = [w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) >= 3 and w not in ("the", "and", "with", "next")]
    return [{"question": f"What can be said about the {w} in the image?", "answer": f"The image shows the {w}."}
            for w in words[:n + 1]]


def llm(req) -> Reply:
    """The stand-in LLM: pairs built from the caption text it receives, or the misbehaviour it names."""
    text = req.text
    n = int(re.search(r"Write exactly (\d+) ", text).group(1))
    cap = caption_of(text)
    pairs = qa_pairs(cap.replace("FENCE", "").replace("PROSE", ""), n)
    if "BROKEN" in cap:
        return Reply(content='[{"question": "What is on the sofa?", "answer": "A white cat"')
    if "DICT" in cap:
        return Reply(content=json.dumps({"answer": "A green kite."}))
    if "NONE" in cap:
        return Reply(content="[]")
    if "LONG" in cap:  # cut off by max_tokens: finish_reason "length", JSON unfinished
        body = json.loads(completion(json.dumps(pairs)[:40], req.body.get("model", "m")))
        body["choices"][0]["finish_reason"] = "length"
        return Reply(status=200, body=json.dumps(body))
    if "YESNO" in cap:
        pairs = [{"question": "Are there horses in the field?", "answer": "Yes, there are two horses."},
                 {"question": "How many horses are there?", "answer": "There are two horses."},
                 {"question": "How  many horses are there ?", "answer": "Two horses graze."},  # DUP
                 {"question": "What is in the field?", "answer": "  "},  # EMPTY
                 {"question": "What animal is in the sky?", "answer": "A giraffe flies by."},  # INVENT
                 "not a pair",
                 {"question": "Where do the horses graze?", "answer": "The horses graze in a field."}]
    body = json.dumps(pairs)
    if "FENCE" in cap:
        body = f"```json\n{body}\n```"
    if "PROSE" in cap:
        body = f"Here are the pairs:\n{body}\nI hope this helps."
    return Reply(content=body)


class Server(ChatServer):
    """The chat server with :func:`llm`, started; images whose caption contains a text in ``down`` get HTTP
    ``status`` (500: retried, then a failure; 400: a failure at once, its error text kept), with an error
    message that quotes the key."""

    def __init__(self, respond=llm, down=(), status=500):
        self.down, self.status = set(down), status
        super().__init__(self._respond, key=KEY)
        self.inner = respond
        self.__enter__()

    def _respond(self, req):
        if any(d in caption_of(req.text) for d in self.down):
            return Reply(status=self.status, body=json.dumps({"error": {"message": f"overloaded; your key {KEY} is fine"}}))
        return self.inner(req)

    def asked(self) -> list[str]:
        return [caption_of(r.text).split("\n")[0] for r in self.requests]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    srv = Server()
    yield srv
    srv.close()


def _endpoint(url, model="qa-llm", **kw):
    return ChatEndpoint(model, base_url=url, api_key_env=ENV, max_retries=1, backoff_base=0.01, backoff_max=0.02,
                        timeout=5.0, max_concurrency=3, **kw)


def _records(root=None, names=None):
    names = names or list(CAPTIONS)
    return [dict({"image": f"coco/{n}", "caption": CAPTIONS[n]}, **({"image_root": str(root)} if root else {}))
            for n in names]


GOOD = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


# ------------------------------------------------------------------------------------------ parsing
def test_parse_tolerates_fences_and_text_and_counts_what_it_rejects():
    pairs = [{"question": "What types of bags are seen in the image?",
              "answer": "The image shows a suitcase and a backpack."}]
    cap = "A suitcase and a backpack on a bench."
    for text, repaired in ((json.dumps(pairs), []), (f"```json\n{json.dumps(pairs)}\n```", ["code_fence"]),
                           (f"Sure! {json.dumps(pairs)} Done.", ["surrounding_text"]),
                           (json.dumps({"pairs": pairs}), ["wrapped_in_object"]),
                           (json.dumps(pairs[0]), ["single_object"])):
        got, report = cq.parse_qa_reply(text, 1, cap)
        assert got == pairs and report == {"reply_rejected": None, "pair_rejects": {}, "repaired": repaired}, text
    assert cq.parse_qa_reply("no json here", 1, cap)[1]["reply_rejected"] == "not_json"
    assert cq.parse_qa_reply('[{"question": "Wh', 1, cap, finish_reason="length")[1]["reply_rejected"] == "cut_off"
    assert cq.parse_qa_reply('"just text"', 1, cap)[1]["reply_rejected"] == "not_a_list"
    assert cq.parse_qa_reply("[]", 1, cap)[1]["reply_rejected"] == "no_usable_pairs"
    items = [{"question": "Is there a bag?", "answer": "The image shows a suitcase."},           # yes_no
             {"question": "What is on the bench?", "answer": "No, a suitcase."},               # yes_no
             {"question": "What is on the bench?", "answer": ""},                             # empty_answer
             {"question": " ", "answer": "A backpack."},                                      # empty_question
             {"question": "What is on the bench?", "answer": "A cat sleeps."},                # not_in_caption
             {"question": "What is on the bench?", "answer": "Suitcases and backpacks."},     # kept (plurals)
             {"question": "what is ON the bench", "answer": "A backpack."},                   # duplicate_question
             {"question": "What <image> bags are seen?", "answer": "A suitcase."},            # kept, tag removed
             {"question": "Which bag is larger?", "answer": "The suitcase."},                 # over_cap
             ["a list"], {"question": "Where?"}]                                              # not_a_pair ×2
    got, report = cq.parse_qa_reply(json.dumps(items), 2, cap)
    assert got == [{"question": "What is on the bench?", "answer": "Suitcases and backpacks."},
                   {"question": "What bags are seen?", "answer": "A suitcase."}]
    assert report["pair_rejects"] == {"yes_no": 2, "empty_answer": 1, "empty_question": 1, "not_in_caption": 1,
                                      "duplicate_question": 1, "over_cap": 1, "not_a_pair": 2}
    assert report["reply_rejected"] is None and set(report["pair_rejects"]) <= set(cq.PAIR_REJECTS)


def test_prompt_is_written_out_and_filled():
    p = cq.qa_prompt(["A red bus.", " ", "A bus {n} on a road."], 3)
    assert "Write exactly 3 short question-answer" in p and p.endswith("Caption:\nA red bus.\nA bus {n} on a road.")
    for rule in ("only facts stated in the caption", "No yes/no questions", "one full, short sentence",
                 "JSON list", '[{"question": "...", "answer": "..."}]'):
        assert rule in cq.QA_PROMPT, rule
    assert cq.qa_settings("m", 3)["prompt_sha256"] != cq.qa_settings("m", 3, cq.QA_PROMPT + " ")["prompt_sha256"]


def test_load_captions_reads_coco_and_json_lines(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A dog. "}, {"image_id": 2, "caption": "A cat."},
                            {"image_id": 1, "caption": "A brown dog."}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert cq.load_captions(tmp_path / "captions.json") == {"000000000001.jpg": ["A dog.", "A brown dog."],
                                                            "000000000002.jpg": ["A cat."]}
    write_jsonl(tmp_path / "caps.jsonl", [{"image": "x.jpg", "caption": "One."}, {"image": "x.jpg", "caption": ["Two."]}])
    assert cq.load_captions(tmp_path / "caps.jsonl") == {"x.jpg": ["One.", "Two."]}
    write_jsonl(tmp_path / "bad.jsonl", [{"image": "x.jpg"}])
    with pytest.raises(ValueError, match="entry 0"):
        cq.load_captions(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------- through the server
def test_samples_have_the_kit_layout_and_the_loaders_read_them(server, tmp_path):
    ep = _endpoint(server.url)
    samples, counts = cq.qa_from_captions(_records(tmp_path, GOOD), ep, tmp_path / "stage", n=2)
    ep.close()
    assert counts["images"] == counts["images_with_pairs"] == 4 and counts["pairs"] == 8 == len(samples)
    assert counts["pair_rejects"]["over_cap"] == 4  # the stand-in writes n + 1 pairs: one capped per image
    assert counts["repaired"]["code_fence"] == 1 and counts["repaired"]["surrounding_text"] == 1
    assert [s["id"] for s in samples[:4]] == ["coco/a_qa0", "coco/a_qa1", "coco/b_qa0", "coco/b_qa1"]
    assert all(set(s) == {"id", "image", "prompt", "chosen", "image_root"} for s in samples)
    assert samples[0] == {"id": "coco/a_qa0", "image": "coco/a.jpg", "image_root": str(tmp_path),
                          "prompt": "What can be said about the red in the image?", "chosen": "The image shows the red."}
    # the request: text only (no image), temperature 0, exactly the module's prompt with the caption
    req = next(r for r in server.requests if "umbrella" in r.text)
    assert req.image is None and req.body["temperature"] == 0
    assert req.text == cq.qa_prompt(CAPTIONS["b.jpg"], 2) and req.body["model"] == "qa-llm"
    # stage 00's hand-over file, read back by the chain's loader
    write_jsonl(tmp_path / "samples.jsonl", samples)
    assert data.load_samples(tmp_path / "samples.jsonl") == samples
    # the LLaVA-Instruct layout: one record per pair, "<image>\n" opens the human turn; read back the same
    recs = data.llava_records(samples)
    assert recs[0] == {"id": "coco/a_qa0", "image": "coco/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat can be said about the red in the image?"},
        {"from": "gpt", "value": "The image shows the red."}]}
    (tmp_path / "coco").mkdir()
    for n in GOOD:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "coco" / n)
    (tmp_path / "qa_llava.json").write_text(json.dumps(recs))
    again, _ = data.samples_from_llava(tmp_path / "qa_llava.json", tmp_path, records_per_image=2)
    assert sorted((s["prompt"], s["chosen"]) for s in again) == sorted((s["prompt"], s["chosen"]) for s in samples)


def test_malformed_replies_are_counted_by_reason(server, tmp_path):
    ep = _endpoint(server.url)
    samples, counts = cq.qa_from_captions(_records(), ep, tmp_path, n=2)
    ep.close()
    assert counts["reply_rejects"] == {"failed": 0, "cut_off": 1, "not_json": 1, "not_a_list": 1,
                                       "no_usable_pairs": 1}
    assert counts["pair_rejects"] == {"not_a_pair": 1, "empty_question": 0, "empty_answer": 1, "yes_no": 1,
                                      "not_in_caption": 1, "duplicate_question": 1, "over_cap": 4}
    assert counts["examples"]["not_json"] == ["coco/e"] and counts["examples"]["cut_off"] == ["coco/i"]
    # every image is accounted for: it gave pairs or its reply was rejected under one reason
    assert counts["images_with_pairs"] + sum(counts["reply_rejects"].values()) == counts["images"] == len(CAPTIONS)
    g = [s for s in samples if s["image"] == "coco/g.jpg"]
    assert [(s["prompt"], s["chosen"]) for s in g] == [
        ("How many horses are there?", "There are two horses."),
        ("Where do the horses graze?", "The horses graze in a field.")]
    rows = {r["id"]: r for r in map(json.loads, open(tmp_path / "caption_qa.jsonl"))}
    assert rows["coco/e"]["reply_rejected"] == "not_json" and rows["coco/e"]["reply"].startswith('[{"question"')
    assert rows["coco/f"]["reply_rejected"] == "not_a_list" and rows["coco/h"]["pairs"] == []


def test_a_partial_run_resumes_without_redoing_or_duplicating(monkeypatch, tmp_path):
    """Images whose requests failed (the server down for them) are asked again on the next run, and only
    they; a run killed between batches (and a half-written last line) resumes the same way. The result
    equals an uninterrupted run's."""
    monkeypatch.setenv(ENV, KEY)
    clean_srv = Server()
    ep = _endpoint(clean_srv.url)
    clean, clean_counts = cq.qa_from_captions(_records(), ep, tmp_path / "clean", n=2)
    ep.close()
    clean_srv.close()

    srv = Server(down={"bench", "beach", "kite"})  # c, d, f
    ep = _endpoint(srv.url)
    first, counts = cq.qa_from_captions(_records(), ep, tmp_path / "run", n=2)
    assert counts["reply_rejects"]["failed"] == 3 and counts["examples"]["failed"] == ["coco/c", "coco/d", "coco/f"]
    srv.down.clear()
    n = len(srv.requests)
    second, counts = cq.qa_from_captions(_records(), ep, tmp_path / "run", n=2)
    assert sorted(srv.asked()[n:]) == sorted(CAPTIONS[k] for k in ("c.jpg", "d.jpg", "f.jpg"))
    assert counts["asked"] == 3 and counts["resumed"] == 6 and second == clean
    assert {k: v for k, v in counts.items() if k not in ("asked", "resumed")} == \
        {k: v for k, v in clean_counts.items() if k not in ("asked", "resumed")}
    n = len(srv.requests)
    third, counts = cq.qa_from_captions(_records(), ep, tmp_path / "run", n=2)  # all done: nothing asked
    assert len(srv.requests) == n and third == clean and counts["asked"] == 0

    class Killed(Exception):
        pass

    class DiesAfterOneBatch:
        """The endpoint, until the second batch: then the process 'dies'."""
        model, scrub = ep.model, ep.scrub
        calls = 0

        def complete(self, *a, **kw):
            return ep.complete(*a, **kw)

        def map_each(self, fn, items):
            DiesAfterOneBatch.calls += 1
            if DiesAfterOneBatch.calls > 1:
                raise Killed
            return ep.map_each(fn, items)

    with pytest.raises(Killed):
        cq.qa_from_captions(_records(), DiesAfterOneBatch(), tmp_path / "killed", n=2, batch_size=4)
    cache = tmp_path / "killed" / "caption_qa.jsonl"
    assert len(cache.read_text().splitlines()) == 4
    with open(cache, "a") as fh:
        fh.write('{"id": "coco/e", "image": "coco/e.jpg", "pai')  # a kill in the middle of a write
    n = len(srv.requests)
    resumed, counts = cq.qa_from_captions(_records(), ep, tmp_path / "killed", n=2, batch_size=4)
    assert counts["asked"] == 5 and len(srv.requests) == n + 5 and resumed == clean
    assert len({s["id"] for s in resumed}) == len(resumed)
    assert len(cache.read_text().splitlines()) == 9  # one line per image: nothing written twice
    ep.close()
    srv.close()


def test_a_changed_prompt_model_or_caption_restarts(server, tmp_path):
    recs = _records(names=GOOD)
    ep = _endpoint(server.url)
    cq.qa_from_captions(recs, ep, tmp_path, n=1)
    n = len(server.requests)
    cq.qa_from_captions(recs, ep, tmp_path, n=1, prompt=cq.QA_PROMPT.replace("short", "brief", 1) + "\n")
    assert len(server.requests) == n + 4  # every image asked again, with the new prompt
    assert all("Write exactly 1 brief" in r.text for r in server.requests[n:])
    assert len((tmp_path / "caption_qa.jsonl").read_text().splitlines()) == 4  # the old replies discarded
    n = len(server.requests)
    _, counts = cq.qa_from_captions(recs, ep, tmp_path, n=2)  # another n
    assert counts["asked"] == 4 and len(server.requests) == n + 4
    other = _endpoint(server.url, model="another-llm")
    _, counts = cq.qa_from_captions(recs, other, tmp_path, n=2)  # another model
    assert counts["asked"] == 4 and {r.body["model"] for r in server.requests[-4:]} == {"another-llm"}
    assert json.loads((tmp_path / "caption_qa.settings.json").read_text())["model"] == "another-llm"
    recs[1] = dict(recs[1], caption="A woman holds a red umbrella.")  # one caption changed: only it redone
    n = len(server.requests)
    samples, counts = cq.qa_from_captions(recs, other, tmp_path, n=2)
    assert counts["asked"] == 1 and server.asked()[n:] == ["A woman holds a red umbrella."]
    assert [s["chosen"] for s in samples if s["image"] == "coco/b.jpg"] == ["The image shows the woman.",
                                                                            "The image shows the holds."]
    ep.close()
    other.close()


def test_the_key_is_never_written(monkeypatch, tmp_path):
    """Error bodies that quote the key (failures) and every output file: no trace of the key."""
    monkeypatch.setenv(ENV, KEY)
    srv = Server(down={"bicycles"}, status=400)
    ep = _endpoint(srv.url)
    samples, counts = cq.qa_from_captions(_records(tmp_path), ep, tmp_path / "stage", n=2)
    ep.close()
    srv.close()
    assert counts["reply_rejects"]["failed"] == 1 and all(r.authorization == f"Bearer {KEY}" for r in srv.requests)
    write_jsonl(tmp_path / "stage" / "samples.jsonl", samples)
    files = [p for p in (tmp_path / "stage").rglob("*") if p.is_file()]
    assert len(files) == 3
    for p in files:
        text = p.read_text()
        assert not any(KEY[i:i + 6] in text for i in range(len(KEY) - 5)), p
    assert "overloaded" in (tmp_path / "stage" / "caption_qa.jsonl").read_text()  # the error itself is kept


# ------------------------------------------------------------------------------------------ notebook
def test_real_data_notebook_makes_qa_pairs_from_captions(root, monkeypatch, tmp_path):
    """00_real_data with chosen_source caption_qa against the local server: COCO-layout captions for the
    sampled LLaVA-Instruct images, samples.jsonl the chain's loader reads, the prompt shown, counts by
    reason in the metrics, the key nowhere in the run folder or the executed notebook."""
    import papermill as pm

    monkeypatch.setenv(ENV, KEY)
    coco = tmp_path / "coco"
    coco.mkdir()
    recs, images, anns = [], [], []
    captions = ["A red bus is parked next to two bicycles.", "A man holds a black umbrella on a street.",
                "A suitcase and a backpack lie on a wooden bench.", "Three dogs run on a sandy beach."]
    for i in range(5):
        name = f"{i:012d}.jpg"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(coco / name, format="JPEG")
        recs.append({"id": f"{i:012d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": f"A long description of image {i}."}]})
        images.append({"id": i, "file_name": name})
        if i < 4:  # image 4 has no caption
            anns += [{"image_id": i, "caption": captions[i]}, {"image_id": i, "caption": captions[i].upper()}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    run = tmp_path / "run"
    srv = Server()
    try:
        pm.execute_notebook(str(root / "notebooks" / "00_real_data.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"run_dir": str(run), "llava_json": str(tmp_path / "llava.json"),
                                        "image_folder": str(coco), "n_samples": 10, "shuffle": False,
                                        "chosen_source": "caption_qa", "qa_per_image": 2,
                                        "captions_json": str(tmp_path / "captions.json"), "api_base_url": srv.url,
                                        "api_model": "gpt-4o-mini", "api_key_env": ENV, "max_concurrency": 2},
                            kernel_name="python3", language="python", cwd=str(root), progress_bar=False)
    finally:
        srv.close()
    assert len(srv.requests) == 4 and all(r.image is None for r in srv.requests)
    assert cq.qa_prompt([captions[0], captions[0].upper()], 2) in [r.text for r in srv.requests]
    samples = data.load_samples(run / "data" / "samples.jsonl")
    assert len(samples) == 8 and [s["id"] for s in samples[:2]] == ["000000000000_qa0", "000000000000_qa1"]
    assert all((coco / s["image"]).is_file() and s["image_root"] == str(coco.resolve()) for s in samples)
    m = json.loads((run / "00_real_data" / "metrics.json").read_text())
    ec = m["endpoint_counts"]
    assert m["chosen_source"] == "caption_qa" and m["n_samples"] == 8
    assert ec["no_caption"] == 1 and ec["images_with_pairs"] == 4 and ec["pair_rejects"]["over_cap"] == 4
    llava = json.loads((run / "00_real_data" / "caption_qa_llava.json").read_text())
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n") and len(llava) == 8
    out = (tmp_path / "out.ipynb").read_text()
    assert json.dumps(cq.QA_PROMPT.splitlines()[0])[1:-1] in out and "over_cap" in out and "Q: What can" in out
    for p in [tmp_path / "out.ipynb"] + [p for p in run.rglob("*") if p.is_file()]:
        text = p.read_text(errors="replace")
        assert not any(KEY[i:i + 6] in text for i in range(len(KEY) - 5)), p
