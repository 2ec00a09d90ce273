"""Chosen responses as short question-answer pairs written from image captions (Re-Align §4.1).

The paper's chosen responses are "QA pairs generated from image captions and simple VQA tasks
using GPT-4o mini" (Appendix C, Figure 5: "What types of bags are seen in the image?" → "The
image shows a suitcase and a backpack."). The paper does not publish its prompt; :data:`QA_PROMPT`
is the kit's, written out in full. A *text* LLM behind an OpenAI-compatible endpoint
(:class:`realign_lib.models.endpoint.ChatEndpoint`) reads an image's caption(s) — COCO captions, or a
LLaVA-Instruct detailed description — and writes ``n`` pairs as a JSON list; the image itself is
never sent.

* Input: records ``{"image", "caption"}`` (``caption`` a text or a list of texts, e.g. COCO's five;
  optional ``id``, default the image path without its suffix; any other keys, such as
  ``image_root``, are carried into the samples). :func:`load_captions` reads COCO caption files
  and ``{"image", "caption"}`` lists or JSON lines.
* Output: samples in the kit's one shape (:mod:`realign_lib.data.llava`): ``{"id": "<id>_qa<k>",
  "image", "prompt": question, "chosen": answer}`` — what stage 00 writes to ``samples.jsonl``;
  :func:`realign_lib.data.llava.llava_records` turns them into LLaVA-Instruct records.
* Parsing (:func:`parse_qa_reply`) tolerates code fences, text around the list, a list wrapped in
  an object, and says so (``repaired``); a reply that still is no list of pairs is rejected under a
  reason of :data:`REPLY_REJECTS`, a pair under a reason of :data:`PAIR_REJECTS` (yes/no questions,
  empty answers, answers sharing no word with the caption, repeated questions, pairs beyond ``n``).
  Nothing is dropped without being counted.
* Resume (:func:`qa_from_captions`): one line per image is appended to ``caption_qa.jsonl`` batch
  by batch, so a killed run asks only for the images it has not finished; a request that failed
  after the endpoint's retries is asked again on the next run, a rejected reply is not (the
  temperature is 0: the same reply would come back). A changed caption redoes that image; a
  changed model, prompt or ``n`` (``caption_qa.settings.json``) discards the file and starts again.
  The API key is never written (the endpoint reads it from the environment and scrubs its errors).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from realign_lib.cache import digest
from realign_lib.files import append_jsonl, check_settings, iter_jsonl, read_appended, read_json

__all__ = ["QA_PROMPT", "REPLY_REJECTS", "PAIR_REJECTS", "qa_prompt", "caption_text", "parse_qa_reply",
           "load_captions", "qa_settings", "qa_from_captions"]

#: The request sent for each image: ``{n}`` becomes the number of pairs, ``{caption}`` the caption(s).
QA_PROMPT = """\
You write training data for a vision-language model. Below is the caption of a photograph, written by \
people who looked at it (several captions are on separate lines). Write exactly {n} short question-answer \
pair(s) about the photograph that the caption alone answers.

Rules:
1. Use only facts stated in the caption: the objects, their attributes (colour, size, material, state), \
how many there are, where they are and what they are doing. Never add anything the caption does not say.
2. Each question asks about something in the image, for example "What types of bags are seen in the \
image?", "How many people are sitting on the bench?", "What colour is the bus?" or "Where is the cat?".
3. No yes/no questions: do not start a question with is, are, does, do, can, was, were, has or have, and \
never answer with yes or no.
4. Each answer is one full, short sentence that names the objects, attributes, counts or positions it is \
about, for example "The image shows a suitcase and a backpack."
5. No two questions ask the same thing.

Reply with a JSON list and nothing else (no code fences, no comments), in exactly this form:
[{"question": "...", "answer": "..."}]

Caption:
{caption}"""

REPLY_REJECTS = {
    "failed": "the request failed after the endpoint's retries (asked again on the next run)",
    "cut_off": "the reply was cut off by max_tokens before its JSON ended",
    "not_json": "the reply is not JSON, even without code fences and surrounding text",
    "not_a_list": "the JSON is not a list of question-answer objects",
    "no_usable_pairs": "the list holds no usable pair (each one is counted under its pair reason)",
}
PAIR_REJECTS = {
    "not_a_pair": "an item is not an object with text fields 'question' and 'answer'",
    "empty_question": "the question is empty",
    "empty_answer": "the answer is empty",
    "yes_no": "a yes/no question (starts with is, are, do, can …) or an answer starting with yes or no",
    "not_in_caption": "the answer shares no content word with the caption (it states something else)",
    "duplicate_question": "the same question as an earlier pair of the image (case and punctuation ignored)",
    "over_cap": "a usable pair beyond the n asked for",
}
REPAIRS = {
    "code_fence": "the JSON was inside a ``` code fence",
    "surrounding_text": "text stood before or after the JSON list",
    "wrapped_in_object": "the list came inside an object ({\"pairs\": [...]})",
    "single_object": "one pair came as an object, not a list of one",
}

_AUX = {"is", "are", "am", "was", "were", "do", "does", "did", "can", "could", "will", "would", "shall", "should",
        "has", "have", "had", "may", "might", "must", "isn't", "aren't", "don't", "doesn't", "can't", "wasn't"}
_STOP = {"the", "and", "are", "is", "was", "were", "there", "this", "that", "these", "those", "with", "image",
         "picture", "photo", "photograph", "shows", "show", "shown", "seen", "see", "visible", "can", "has", "have",
         "its", "their", "they", "them", "from", "into", "onto", "for", "some", "which", "what", "who", "where",
         "how", "many", "also", "being", "been", "one", "very", "scene", "appears", "appear", "seems", "near",
         "next", "other", "another", "around", "about", "while", "than", "then", "each", "both", "all", "any",
         "his", "her", "him", "she", "our", "you", "your", "not", "but", "out", "off", "over", "under", "top"}
_NUMBERS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                            "twelve".split())}
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```", re.S)


def caption_text(caption) -> str:
    """One text from a caption or a list of captions (one per line; blank ones left out)."""
    if isinstance(caption, str):
        return caption.strip()
    if isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
        return "\n".join(c.strip() for c in caption if c.strip())
    raise TypeError(f"a caption is a text or a list of texts, got {type(caption).__name__}")


def qa_prompt(caption, n: int, prompt: str = QA_PROMPT) -> str:
    """The request for one image: ``prompt`` with ``{n}`` and ``{caption}`` filled in (in that order,
    so braces in the caption stay as they are)."""
    return prompt.replace("{n}", str(int(n))).replace("{caption}", caption_text(caption))


def _words(text: str) -> set[str]:
    """Content words: lower case, at least 3 characters, not in a small stop list; digits as number
    words; each word also without a final s or es, so "bags" meets "bag" and "dresses" "dress"."""
    out = set()
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        w = _NUMBERS.get(w, w)
        if len(w) < 3 or w in _STOP:
            continue
        out.add(w)
        if w.endswith("s") and len(w) > 3:
            out.add(w[:-1])
            if w.endswith("es") and len(w) > 4:
                out.add(w[:-2])
    return out


def _question_key(q: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", q.lower()))


def _decode(text: str) -> tuple[object, list[str]]:
    """The JSON in a reply and the repairs it took; ValueError when there is none."""
    repairs: list[str] = []
    body = text.strip()
    fence = _FENCE.search(body)
    if fence:
        repairs.append("code_fence")
        body = fence.group(1).strip()
    try:
        return json.loads(body), repairs
    except json.JSONDecodeError:
        pass
    start, end = body.find("["), body.rfind("]")
    if start >= 0 and end > start:
        try:
            value = json.loads(body[start:end + 1])
            return value, repairs + ["surrounding_text"]
        except json.JSONDecodeError:
            pass
    raise ValueError("not JSON")


def parse_qa_reply(text: str, n: int, caption=None, finish_reason: str | None = None) -> tuple[list[dict], dict]:
    """An LLM's reply → ``(pairs, report)``: at most ``n`` ``{"question", "answer"}`` pairs, stripped.

    ``report``: ``reply_rejected`` (a key of :data:`REPLY_REJECTS`, or ``None`` when at least one
    pair is usable), ``pair_rejects`` (``reason → count``, keys of :data:`PAIR_REJECTS`) and
    ``repaired`` (what was tolerated, keys of :data:`REPAIRS`). ``caption`` (text or list): answers
    that share no content word with it are rejected (``not_in_caption``); ``None`` skips that check.
    ``finish_reason="length"`` with no JSON to read is ``cut_off``, not ``not_json``.
    """
    report = {"reply_rejected": None, "pair_rejects": {}, "repaired": []}
    try:
        value, report["repaired"] = _decode(text or "")
    except ValueError:
        report["reply_rejected"] = "cut_off" if finish_reason == "length" else "not_json"
        return [], report
    if isinstance(value, dict) and {"question", "answer"} <= set(value):
        value = [value]
        report["repaired"].append("single_object")
    elif isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
        report["repaired"].append("wrapped_in_object")
    if not isinstance(value, list):
        report["reply_rejected"] = "not_a_list"
        return [], report
    known = _words(caption_text(caption)) if caption is not None else None
    rejects: Counter = Counter()
    pairs, seen = [], set()
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                and isinstance(item.get("answer"), str)):
            rejects["not_a_pair"] += 1
            continue
        q = " ".join(item["question"].replace("<image>", " ").split())
        a = " ".join(item["answer"].split())
        first_q = (q.split() or [""])[0].lower().strip(",.?!\"'")
        first_a = (a.split() or [""])[0].lower().strip(",.?!\"'")
        if not q:
            reason = "empty_question"
        elif not a:
            reason = "empty_answer"
        elif first_q in _AUX or first_a in ("yes", "no"):
            reason = "yes_no"
        elif known is not None and not (_words(a) & known):
            reason = "not_in_caption"
        elif _question_key(q) in seen:
            reason = "duplicate_question"
        elif len(pairs) >= n:
            reason = "over_cap"
        else:
            seen.add(_question_key(q))
            pairs.append({"question": q, "answer": a})
            continue
        rejects[reason] += 1
    report["pair_rejects"] = dict(rejects)
    if not pairs:
        report["reply_rejected"] = "no_usable_pairs"
    return pairs, report


def load_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``image file → captions`` from a COCO captions file (``captions_train2017.json``: ``images``
    with ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``caption``), a JSON list of
    ``{"image", "caption"}`` or JSON lines of them (``caption`` a text or a list). Captions of one
    image are gathered in file order; a malformed entry raises naming it."""
    path = Path(path)
    if path.suffix == ".jsonl":
        entries = list(iter_jsonl(path))
    else:
        entries = read_json(path)
    out: dict[str, list[str]] = {}
    if isinstance(entries, dict) and "annotations" in entries and "images" in entries:
        names = {im["id"]: im["file_name"] for im in entries["images"]}
        for i, ann in enumerate(entries["annotations"]):
            if ann.get("image_id") not in names or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path}: annotation {i} has no known image_id or no caption text")
            out.setdefault(names[ann["image_id"]], []).append(ann["caption"].strip())
        return out
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a COCO captions file or a list of {{\"image\", \"caption\"}}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "caption" not in e:
            raise ValueError(f"{path}: entry {i} is not an object with 'image' and 'caption'")
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        out.setdefault(e["image"], []).extend(caption_text(c) for c in caps)
    return out


def qa_settings(model: str, n: int, prompt: str = QA_PROMPT) -> dict:
    """What a cached reply depends on besides its caption: a change restarts the cache."""
    return {"model": model, "prompt_sha256": digest(prompt, 64), "qa_per_image": int(n)}


def _record_id(rec: dict) -> str:
    return str(rec["id"]) if rec.get("id") is not None else Path(rec["image"]).with_suffix("").as_posix()


def qa_from_captions(records: list[dict], endpoint, out_dir: str | os.PathLike, n: int, batch_size: int = 64,
                     prompt: str = QA_PROMPT, log=print) -> tuple[list[dict], dict]:
    """Samples made of ``n`` question-answer pairs per image, written by ``endpoint`` from the captions.

    ``records``: ``{"image", "caption"}`` (plus optional ``id`` and keys carried into the samples).
    ``endpoint``: a :class:`~realign_lib.models.endpoint.ChatEndpoint` (a text LLM; temperature 0). One
    line per image goes to ``out_dir/caption_qa.jsonl`` as each batch of ``batch_size`` images comes
    back (see the module docstring for resume and restart). Returns ``(samples, counts)``: samples
    in the records' order, pairs in the reply's order; ``counts`` holds ``images``, ``asked`` (this
    run), ``resumed`` (finished before), ``images_with_pairs``, ``pairs``, ``reply_rejects`` and
    ``pair_rejects`` (reason → count, over every image of ``records``), ``repaired`` and
    ``examples`` (the first ids per reject reason).
    """
    from realign_lib.models.endpoint import EndpointFailure, user_message

    if n < 1:
        raise ValueError(f"n={n}: ask for at least one question-answer pair per image")
    out_dir = Path(out_dir)
    cache = out_dir / "caption_qa.jsonl"
    check_settings(out_dir / "caption_qa.settings.json", qa_settings(endpoint.model, n, prompt), [cache], log=log)
    recs, texts = [], {}
    for rec in records:
        rid = _record_id(rec)
        if rid in texts:
            raise ValueError(f"two caption records with id {rid!r}: give each image one record (a list of captions)")
        texts[rid] = caption_text(rec["caption"])
        if not texts[rid]:
            raise ValueError(f"caption record {rid!r} has no caption text: leave such images out (and count them)")
        recs.append((rid, rec))
    done: dict[str, dict] = {}
    for row in read_appended(cache):  # a kill's half-written last line is cut; the last row of an id wins
        if row.get("id") in texts and row.get("caption_sha") == digest(texts[row["id"]]) and "failed" not in row:
            done[row["id"]] = row
    todo = [(rid, rec) for rid, rec in recs if rid not in done]
    scrub = getattr(endpoint, "scrub", lambda s: s)

    def ask(item):
        rid, _ = item
        return endpoint.complete([user_message(qa_prompt(texts[rid], n, prompt))], with_finish=True)

    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        rows = []
        for (rid, rec), out in zip(chunk, endpoint.map_each(ask, chunk)):
            row = {"id": rid, "image": rec["image"], "caption_sha": digest(texts[rid])}
            if isinstance(out, EndpointFailure):
                row["failed"] = out.detail[:300]
            else:
                reply, finish = out
                pairs, report = parse_qa_reply(reply, n, texts[rid], finish_reason=finish)
                row.update(pairs=pairs, **report)
                if report["reply_rejected"]:
                    row["reply"] = scrub(reply or "")[:500]  # to see what came back
            rows.append(row)
        append_jsonl(cache, rows)
        done.update({r["id"]: r for r in rows})

    samples: list[dict] = []
    counts = {"images": len(recs), "asked": len(todo), "resumed": len(recs) - len(todo), "images_with_pairs": 0,
              "pairs": 0, "reply_rejects": {k: 0 for k in REPLY_REJECTS},
              "pair_rejects": {k: 0 for k in PAIR_REJECTS}, "repaired": {k: 0 for k in REPAIRS}, "examples": {}}

    def example(reason: str, rid: str) -> None:
        if len(counts["examples"].setdefault(reason, [])) < 3:
            counts["examples"][reason].append(rid)

    for rid, rec in recs:
        row = done[rid]
        if "failed" in row:
            counts["reply_rejects"]["failed"] += 1
            example("failed", rid)
            continue
        for reason, k in row.get("pair_rejects", {}).items():
            counts["pair_rejects"][reason] += k
            example(reason, rid)
        for r in row.get("repaired", []):
            counts["repaired"][r] += 1
        if row.get("reply_rejected"):
            counts["reply_rejects"][row["reply_rejected"]] += 1
            example(row["reply_rejected"], rid)
            continue
        counts["images_with_pairs"] += 1
        extra = {k: v for k, v in rec.items() if k not in ("id", "image", "caption", "prompt", "chosen")}
        for k, p in enumerate(row["pairs"]):
            samples.append({"id": f"{rid}_qa{k}", "image": rec["image"], "prompt": p["question"],
                            "chosen": p["answer"], **extra})
    counts["pairs"] = len(samples)
    return samples, counts
