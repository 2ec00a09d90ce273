"""Bad input, one test each: a clear error that names the file, line or sample and says what to do,
or a counted, reported skip — never a deep library traceback for a user's mistake, never a silent drop.

Real parts throughout: PIL decodes the images, spaCy masks, the real ``openai`` client talks to a
local HTTP server (tests/chat_server.py), the tiny LLaVA is a real transformers model. Cases covered
elsewhere (config keys/types, POPE duplicate ids and labels, MME folder layouts, wrong API key,
missing key variable, unknown processor class) are listed in the issue note with their tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from chat_server import ChatServer, Reply
from PIL import Image

from realign_lib.data import llava as data
from realign_lib.evaluation import pope
from realign_lib.files import read_jsonl
from realign_lib.masking import driver as D
from realign_lib.masking import rule as maskers
from realign_lib.masking.llm import HFMasker, OpenAIMasker

KEY_ENV = "REALIGN_BAD_INPUT_KEY"


# -------------------------------------------------------------------------- LLaVA-Instruct → samples
def _png(path: Path, colour=(200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(path)
    return path


def _record(i, image, answer="A red car is parked by the house ."):
    return {"id": f"r{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                              {"from": "gpt", "value": answer}]}


@pytest.fixture
def llava(tmp_path):
    """An image folder with two good images and a writer for a LLaVA-Instruct JSON beside it."""
    root = tmp_path / "coco"
    _png(root / "good0.png")
    _png(root / "good1.png", (30, 30, 200))

    def write(extra):
        recs = [_record(0, "good0.png"), _record(1, "good1.png")] + extra
        path = tmp_path / "llava.json"
        path.write_text(json.dumps(recs))
        return path, root

    return write


def _load(path, root):
    samples, counts = data.samples_from_llava(path, root)
    assert [s["id"] for s in samples[:2]] == ["r0", "r1"]  # the good records are kept
    return samples, counts


def test_missing_image_file_is_a_counted_skip(llava):
    samples, counts = _load(*llava([_record(2, "gone.png")]))
    assert len(samples) == 2 and counts["missing_image"] == 1 and counts["examples"]["missing_image"] == ["record 2 (id r2)"]


def test_corrupt_image_is_a_counted_skip(llava, tmp_path):
    (tmp_path / "coco" / "junk.jpg").write_bytes(b"this is not a jpeg at all")
    samples, counts = _load(*llava([_record(2, "junk.jpg")]))
    assert len(samples) == 2 and counts["corrupt_image"] == 1


def test_a_decompression_bomb_is_a_counted_skip_not_the_end_of_the_load(llava, tmp_path, monkeypatch):
    """Pillow refuses images over its pixel limit; the loader counts such a file and goes on. (The
    limit is lowered here so that the test image can stay small.)"""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    _png(tmp_path / "coco" / "bomb.png", size=64)   # 4,096 px: over twice the limit (an error)
    _png(tmp_path / "coco" / "large.png", size=40)  # 1,600 px: over the limit (a warning)
    samples, counts = _load(*llava([_record(2, "bomb.png"), _record(3, "large.png")]))
    assert len(samples) == 2 and counts["huge_image"] == 2


def test_truncated_image_is_a_counted_skip(llava, tmp_path):
    whole = _png(tmp_path / "coco" / "whole.png").read_bytes()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "coco" / "cut.png")
    data_cut = (tmp_path / "coco" / "cut.png").read_bytes()
    (tmp_path / "coco" / "cut.png").write_bytes(data_cut[: len(data_cut) // 2])  # header fine, pixels cut
    assert whole
    samples, counts = _load(*llava([_record(2, "cut.png")]))
    assert len(samples) == 2 and counts["corrupt_image"] == 1 and counts["examples"]["corrupt_image"] == ["record 2 (id r2)"]


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_image_path_escaping_the_image_root_is_a_counted_skip(llava, tmp_path, name):
    outside = _png(tmp_path / "outside.png")  # exists, but outside the image folder
    name = str(outside) if name == "ABSOLUTE" else name
    samples, counts = _load(*llava([_record(2, name)]))
    assert len(samples) == 2 and counts["unsafe_path"] == 1


def test_empty_chosen_and_missing_exchange_are_counted_skips(llava):
    no_gpt = {"id": "r3", "image": "good0.png", "conversations": [{"from": "human", "value": "Describe it."}]}
    samples, counts = _load(*llava([_record(2, "good0.png", answer="   "), no_gpt, {"id": "t", "conversations": []},
                                    "not a record"]))
    assert len(samples) == 2
    assert counts["empty_chosen"] == 1 and counts["no_exchange"] == 1 and counts["not_a_record"] == 2
    assert set(data.SKIP_REASONS) <= set(counts)  # every reason is reported, zero or not


def test_llava_file_that_is_not_json_or_not_a_list(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    bad = tmp_path / "llava.json"
    bad.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match=r"llava.json: not valid JSON"):
        data.samples_from_llava(bad, root)
    bad.write_text('{"id": 1}')
    with pytest.raises(ValueError, match=r"llava.json: expected a JSON list of LLaVA-Instruct records"):
        data.samples_from_llava(bad, root)


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere not found"):
        data.samples_from_llava(tmp_path / "llava.json", tmp_path / "nowhere")


# ------------------------------------------------------------------------------------ samples.jsonl
def _samples_file(tmp_path, lines) -> Path:
    _png(tmp_path / "img" / "a.png")
    path = tmp_path / "samples.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"id": "a", "image": "a.png", "image_root": "IMG", "prompt": "Describe.", "chosen": "A red car ."}


def _good(tmp_path, **kw):
    return dict(GOOD, image_root=str(tmp_path / "img"), **kw)


def test_samples_malformed_json_line_names_file_and_line(tmp_path):
    path = _samples_file(tmp_path, [_good(tmp_path), '{"id": "b", "image": '])
    with pytest.raises(ValueError, match=r"samples.jsonl:2: malformed JSON line .*fix or delete that line"):
        data.load_samples(path)


def test_samples_missing_keys_name_the_record_and_the_keys(tmp_path):
    rec = _good(tmp_path, id="b")
    del rec["chosen"], rec["prompt"]
    path = _samples_file(tmp_path, [_good(tmp_path), rec])
    with pytest.raises(ValueError, match=r"samples.jsonl: record 2 lacks prompt, chosen; each sample needs"):
        data.load_samples(path)


def test_samples_wrong_type_is_named(tmp_path):
    path = _samples_file(tmp_path, [_good(tmp_path, chosen=["a", "list"])])
    with pytest.raises(ValueError, match=r"record 1: chosen=\['a', 'list'\] must be text"):
        data.load_samples(path)


def test_samples_duplicate_id(tmp_path):
    path = _samples_file(tmp_path, [_good(tmp_path), _good(tmp_path)])
    with pytest.raises(ValueError, match=r"record 2: duplicate id 'a' \(first at record 1\)"):
        data.load_samples(path)


def test_samples_image_escaping_the_root(tmp_path):
    path = _samples_file(tmp_path, [_good(tmp_path, image="../../etc/passwd")])
    with pytest.raises(ValueError, match=r"record 1 \(id a\): image path '../../etc/passwd' leads outside"):
        data.load_samples(path)


def test_samples_file_missing_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run stage 00 \(00_tiny_world or 00_real_data\) first"):
        data.load_samples(tmp_path / "samples.jsonl")


def test_corrupt_image_given_to_a_model_names_the_file(tmp_path):
    from realign_lib.models.vlm import to_pil

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"image file .*bad.png is not a readable image"):
        to_pil(bad)
    with pytest.raises(FileNotFoundError, match=r"image file .*none.png not found"):
        to_pil(tmp_path / "none.png")


# ------------------------------------------------------------------------------------------ masking
@pytest.fixture(scope="module")
def rule():
    return maskers.RuleMasker()


def test_empty_chosen_is_a_counted_masking_failure_not_sent_to_the_backend(tmp_path, rule):
    samples = [{"id": "ok", "chosen": "a red car is on the left ."}, {"id": "empty", "chosen": ""},
               {"id": "blank", "chosen": "  "}, {"id": "dots", "chosen": "..."}]
    counts = D.run_masking(samples, rule, tmp_path / "masked.jsonl")
    assert counts["valid"] == 1 and counts["invalid_by_reason"] == {"empty_input": 3}
    fails = read_jsonl(tmp_path / "masking_failures.jsonl")
    assert {f["id"]: f["reason"] for f in fails} == {"empty": "empty_input", "blank": "empty_input", "dots": "empty_input"}
    assert all(f["attempts"] == 0 for f in fails)


def test_a_response_with_no_maskable_words_is_a_counted_failure(tmp_path, rule):
    samples = [{"id": "ok", "chosen": "a red car is on the left ."}, {"id": "yes", "chosen": "Yes, it is."}]
    counts = D.run_masking(samples, rule, tmp_path / "masked.jsonl")
    assert counts["valid"] == 1 and counts["invalid_by_reason"] == {"no_mask": 1}
    assert read_jsonl(tmp_path / "masking_failures.jsonl")[0]["id"] == "yes"


def _api_masker(url, **kw):
    return OpenAIMasker("fake", base_url=url, api_key_env=KEY_ENV, max_retries=kw.pop("max_retries", 2),
                                backoff_base=0.01, backoff_max=0.02, **kw)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-bad-input-test")
    return "sk-bad-input-test"


TEXT = "a red car is on the left of a green tree ."
MASKED = "a [MASK] is on the [MASK] of a [MASK] ."


def _mask_one(url, tmp_path, **kw):
    masker = _api_masker(url, **kw)
    counts = D.run_masking([{"id": "s1", "chosen": TEXT}], masker, tmp_path / "masked.jsonl", require_any=False)
    fails = read_jsonl(tmp_path / "masking_failures.jsonl") if (tmp_path / "masking_failures.jsonl").exists() else []
    return counts, fails, masker


def test_masker_reply_that_is_not_a_masking_is_a_counted_invalid_sample(key, tmp_path):
    with ChatServer(lambda r: Reply(content="A scarlet automobile waits beside a tree."), key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path)
    assert counts["valid"] == 0 and counts["invalid_by_reason"] == {"text_changed": 1}
    assert fails[0]["reason"] == "text_changed" and fails[0]["output"].startswith("A scarlet")
    assert fails[0]["attempts"] == 2 and len(srv.requests) == 2  # retried once with the one-shot example


def test_endpoint_429_is_retried_and_then_succeeds(key, tmp_path):
    seen = []

    def respond(req):
        seen.append(1)
        return Reply(status=429, body='{"error": {"message": "slow down"}}') if len(seen) == 1 else Reply(content=MASKED)

    with ChatServer(respond, key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path)
    assert counts["valid"] == 1 and not fails
    assert masker.stats["http_429"] == 1 and masker.stats["retries"] == 1


def test_endpoint_500_every_time_is_a_counted_api_error(key, tmp_path):
    with ChatServer(lambda r: Reply(status=500, body='{"error": {"message": "boom"}}'), key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path)
    assert counts["valid"] == 0 and fails[0]["reason"] == "api_error" and fails[0]["kind"] == "backend_error"
    assert "gave up after 3 tries; last: HTTP 500" in fails[0]["detail"] and len(srv.requests) == 3


def test_endpoint_garbage_reply_is_a_counted_api_error(key, tmp_path):
    with ChatServer(lambda r: Reply(status=200, body="<html>upstream proxy error</html>", ctype="text/html"),
                    key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path)
    assert fails[0]["reason"] == "api_error" and "unreadable reply" in fails[0]["detail"]
    assert masker.stats["bad_response"] == 3


def test_endpoint_timeout_is_a_counted_api_error(key, tmp_path):
    with ChatServer(lambda r: Reply(content=MASKED, sleep=1.5), key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path, timeout=0.3, max_retries=1)
    assert fails[0]["reason"] == "api_error" and "last: timeout" in fails[0]["detail"]
    assert masker.stats["timeout"] == 2
    # a rerun retries samples that failed on backend errors (not invalid ones) and records them once
    with ChatServer(lambda r: Reply(content=MASKED), key=key) as srv:
        counts = D.run_masking([{"id": "s1", "chosen": TEXT}], _api_masker(srv.url), tmp_path / "masked.jsonl")
    assert counts["valid"] == 1 and len(read_jsonl(tmp_path / "masked.jsonl")) == 1


def test_endpoint_error_quoting_the_key_is_scrubbed(key, tmp_path):
    with ChatServer(lambda r: Reply(status=422, body=json.dumps({"error": {"message": f"bad input for {key}"}})),
                    key=key) as srv:
        counts, fails, masker = _mask_one(srv.url, tmp_path)
    assert fails[0]["reason"] == "api_error" and "***" in fails[0]["detail"]
    assert key not in (tmp_path / "masking_failures.jsonl").read_text()


# ---------------------------------------------------------------------------------- POPE evaluation
def test_pope_answer_that_is_neither_yes_nor_no_is_counted():
    assert [pope.answer_kind(t) for t in ("Yes, there is.", "No.", "There is not a dog.", "A red car.", "",
                                          "yes", "Nope")] == ["yes", "no", "no", "other", "other", "yes", "other"]
    assert pope.parse_yes_no("A red car.") == "yes"  # the official rule still scores it "yes"


@pytest.fixture(scope="module")
def tiny():
    from tests.support.tiny_models import tiny_llava
    return tiny_llava()


def _pope_file(tmp_path, images):
    qs = [{"question_id": i, "image": im, "text": "Is there a car in the image?", "label": "yes" if i % 2 else "no"}
          for i, im in enumerate(images)]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return pope.load_pope_questions(path)


def test_pope_images_missing_under_the_image_root_are_named_up_front(tiny, tmp_path):
    _png(tmp_path / "val" / "a.png")
    qs = _pope_file(tmp_path, ["a.png", "b.png", "c.png"])
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) of these POPE questions are not in .*val \(first: "
                                                r"b.png, c.png\); point image_root at the folder"):
        pope.answer_pope(*tiny, qs, tmp_path / "val", tmp_path / "answers.jsonl")
    assert not (tmp_path / "answers.jsonl").exists()  # nothing answered before the check


def test_pope_image_path_escaping_the_root_names_the_question(tiny, tmp_path):
    _png(tmp_path / "val" / "a.png")
    _png(tmp_path / "secret.png")
    qs = _pope_file(tmp_path, ["a.png", "../secret.png"])
    with pytest.raises(ValueError, match=r"POPE question 1: image path '../secret.png' leads outside"):
        pope.answer_pope(*tiny, qs, tmp_path / "val", tmp_path / "answers.jsonl")


def test_pope_answers_are_resumed_only_for_the_same_model_prompt_and_image(tiny, tmp_path):
    """A rerun into the same answers file after the model, a question's text or its image changed
    (a world rebuilt with another seed keeps the file names) asks those questions again."""
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "val" / name)
    qs, out = _pope_file(tmp_path, ["a.png", "b.png", "c.png"]), tmp_path / "answers.jsonl"
    pope.answer_pope(*tiny, qs, tmp_path / "val", out, model_key="model-1")
    first = out.read_text()
    assert pope.answer_pope(*tiny, qs, tmp_path / "val", out, model_key="model-1") and out.read_text() == first
    qs[1] = dict(qs[1], text="Is there a dog in the image?")
    qs[2] = dict(qs[2], image="a.png")
    again = pope.answer_pope(*tiny, qs, tmp_path / "val", out, model_key="model-1")
    assert [a["question_id"] for a in again] == [0, 1, 2] and out.read_text().startswith(first.splitlines()[0])
    assert (again[1]["prompt"], again[2]["image"]) == ("Is there a dog in the image?", "a.png")
    marked = [dict(a, text="MARK") for a in again]  # answers recognisable as the earlier model's
    out.write_text("".join(json.dumps(a) + "\n" for a in marked))
    assert [a["text"] for a in pope.answer_pope(*tiny, qs, tmp_path / "val", out, model_key="model-1")] == ["MARK"] * 3
    other = pope.answer_pope(*tiny, qs, tmp_path / "val", out, model_key="model-2")  # other weights: all again
    assert len(other) == 3 and "MARK" not in out.read_text()
    assert json.loads(out.with_name("answers.settings.json").read_text())["model"] == "model-2"
    default = pope.answer_pope(*tiny, qs, tmp_path / "val", out)  # default key: the model's identity
    assert len(default) == 3 and json.loads(out.with_name("answers.settings.json").read_text())["model"]["weights"]


def test_pope_image_folder_missing(tiny, tmp_path):
    qs = _pope_file(tmp_path, ["a.png"])
    with pytest.raises(FileNotFoundError, match=r"POPE image folder .*nowhere not found \(COCO val2014"):
        pope.answer_pope(*tiny, qs, tmp_path / "nowhere", tmp_path / "answers.jsonl")


def test_pope_answers_file_with_a_damaged_line_names_it(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "te\n{"question_id": 3, "text": "no"}\n')
    from realign_lib.files import read_appended

    with pytest.raises(ValueError, match=r"answers.jsonl:2: malformed JSON line"):
        read_appended(path)


# ------------------------------------------------------------------------------------------ training
def _prefs(tmp_path, recs):
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _pref(i, **kw):
    return {"id": f"p{i}", "prompt": "describe", "images": ["v.png"], "retrieved_image": "r.png", "chosen": "a red car",
            "rejected": "a blue car", **kw}


def test_preferences_missing_keys_name_the_record(tmp_path):
    from realign_lib.training.batches import PreferenceDataset

    _png(tmp_path / "v.png"), _png(tmp_path / "r.png")
    rec = _pref(1)
    del rec["rejected"]
    with pytest.raises(ValueError, match=r"preferences.jsonl: record 1 lacks 'rejected'"):
        PreferenceDataset(_prefs(tmp_path, [_pref(0), rec]))


def test_preferences_with_a_missing_image_name_the_record_and_the_root(tmp_path):
    from realign_lib.training.batches import PreferenceDataset

    _png(tmp_path / "v.png")
    path = _prefs(tmp_path, [_pref(0)])
    with pytest.raises(FileNotFoundError, match=r"record 0 \(id p0\): image .*r.png not found; image paths are "
                                                r"relative to"):
        PreferenceDataset(path)
    assert len(PreferenceDataset(path, need_retrieved=False)) == 1  # DPO does not need the retrieved image


def test_train_cli_reports_a_bad_preferences_file_without_a_traceback(root, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "preferences.jsonl"
    path.write_text('{"id": "p0", "prompt": "x"\n')
    res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "train", "--preferences", str(path), "--model", "m",
                          "--output-dir", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "preferences.jsonl:1: malformed JSON line" in res.stderr


def test_empty_preferences_file(tmp_path):
    from realign_lib.training.batches import PreferenceDataset

    with pytest.raises(ValueError, match=r"no preference pairs \(did stage 03 accept none\? see its skipped.jsonl\)"):
        PreferenceDataset(_prefs(tmp_path, []))


@pytest.mark.parametrize("field, value, message", [
    ("beta", "high", "beta='high': must be a number"),
    ("use_lora", "yes", "use_lora='yes': must be true or false"),
    ("max_steps", 2.5, "max_steps=2.5: must be an integer"),
    ("per_device_train_batch_size", True, "per_device_train_batch_size=True: must be an integer"),
])
def test_training_config_wrong_types_name_the_field(field, value, message):
    from realign_lib.run.cli import main

    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from realign_lib.training.config import PreferenceConfig
        PreferenceConfig(**{field: value})
    assert main(["train", "--preferences", "p", "--model", "m", "--output-dir", "o",
                 "--set", f"{field}={json.dumps(value)}"]) == 2


def test_train_cli_unknown_field_lists_the_valid_ones(capsys):
    from realign_lib.run.cli import main

    assert main(["train", "--preferences", "p", "--model", "m", "--output-dir", "o", "--set", "learning_rat=1e-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown PreferenceConfig field(s) ['learning_rat']" in err and " learning_rate," in err


# --------------------------------------------------------------------------------- models and trust
def _saved_tiny(tmp_path):
    from tests.support.tiny_models import tiny_llava

    model, processor = tiny_llava()
    out = tmp_path / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, model


def test_model_weights_as_pickle_only_are_refused(tmp_path):
    import torch

    from realign_lib.models.vlm import load_vlm

    out, model = _saved_tiny(tmp_path)
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights only as pytorch_model.bin; the kit loads safetensors only"):
        load_vlm(out, device="cpu")


def test_model_with_its_own_code_is_refused_unless_trusted(tmp_path):
    from realign_lib.models.vlm import load_vlm

    out, _ = _saved_tiny(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match=r"config.json maps classes to code shipped in .* trust_remote_code is off"):
        load_vlm(out, device="cpu")


def test_adapter_without_safetensors_is_refused(tmp_path):
    from realign_lib.models.vlm import load_vlm

    out, _ = _saved_tiny(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors \(weights are loaded from safetensors only"):
        load_vlm(out, device="cpu", adapter=adapter)


def test_nonexistent_model_path(tmp_path):
    from realign_lib.models.vlm import load_vlm

    with pytest.raises(FileNotFoundError, match=r"model path .*no_model' does not exist; pass a folder made by "
                                                r"save_pretrained"):
        load_vlm(tmp_path / "no_model")


def test_sentence_model_not_loadable_offline(monkeypatch):
    from realign_lib.induction.similarity import SentenceEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"(?s)could not load sentence model 'sentence-transformers/all-mpnet-base-v2'.*"
                                      r"Offline\? Pass a local sentence-transformers folder"):
        SentenceEncoder("sentence-transformers/all-mpnet-base-v2")


def test_masking_llm_not_loadable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"(?s)could not load 'no-org/no-such-llm'.*Offline\? Pass a local folder"):
        HFMasker("no-org/no-such-llm")


def test_run_config_with_unknown_keys_and_wrong_types(tmp_path):
    from realign_lib.run.config import load_config

    p = tmp_path / "run.yaml"
    p.write_text("run_dir: r\nstages:\n  '04_training':\n    los: dpo\n")
    with pytest.raises(ValueError, match=r"run.yaml: stages.04_training: unknown parameter 'los'; 04_training takes:"):
        load_config(p)
    p.write_text("run_dir: r\nstages:\n  '04_training':\n    max_steps: many\n")
    with pytest.raises(TypeError, match=r"stages.04_training: 04_training.max_steps='many': must be an integer \(default -1\)"):
        load_config(p)


# ------------------------------------------------------------------------ records that are wrong but passed
def test_llava_records_with_values_that_are_not_text_are_counted_skips(llava):
    odd = [_record(2, "good0.png"), _record(3, "good1.png"), _record(4, "good0.png"), _record(5, ""),
           _record(6, "good1.png")]
    odd[0]["conversations"][1]["value"] = {"text": "a red car", "type": "text"}  # a dict, not its repr
    odd[1]["id"] = None
    odd[2]["conversations"][0]["value"] = "<image>\n"  # no question
    odd[4]["conversations"][0]["value"] = ["<image>", "what is it?"]
    samples, counts = _load(*llava(odd))
    assert len(samples) == 2 and not any("{" in s["chosen"] or s["id"] == "None" for s in samples)
    assert (counts["not_text"], counts["bad_id"], counts["empty_prompt"], counts["not_a_record"]) == (2, 1, 1, 1)
    assert counts["examples"]["not_text"] == ["record 2 (id r2)", "record 6 (id r6)"]


def test_preference_pairs_with_chosen_equal_to_rejected_are_counted_not_trained_on(tmp_path):
    from realign_lib.training.batches import PreferenceDataset

    _png(tmp_path / "v.png"), _png(tmp_path / "r.png")
    ds = PreferenceDataset(_prefs(tmp_path, [_pref(0), _pref(1, rejected="a red car ")]))
    assert [r["id"] for r in ds.records] == ["p0"] and ds.skipped == {"chosen_equals_rejected": 1}


@pytest.mark.parametrize("name", ["../outside.png", "/abs/outside.png", "link/outside.png"])
def test_preference_images_outside_the_root_name_the_record(tmp_path, name):
    from realign_lib.training.batches import PreferenceDataset

    run = tmp_path / "run"
    _png(run / "v.png"), _png(run / "r.png"), _png(tmp_path / "outside.png")
    (run / "link").symlink_to(tmp_path, target_is_directory=True)  # a link inside the root that leads out
    with pytest.raises(ValueError, match=r"record 1 \(id p1\): image path .* leads outside the image folder"):
        PreferenceDataset(_prefs(run, [_pref(0), _pref(1, images=[name])]))
    with pytest.raises(ValueError, match=r"record 0 \(id p0\): image path .* leads outside"):
        PreferenceDataset(_prefs(run, [_pref(0, retrieved_image=name)]))


def test_an_mme_folder_without_subtasks_is_an_error_not_a_silent_drop(tmp_path):
    from realign_lib.evaluation.mme import load_mme

    (tmp_path / "mme").mkdir()
    (tmp_path / "mme" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"MME folder .*mme holds no subtask folders .* set mme_root to \"none\""):
        load_mme(tmp_path / "mme")


@pytest.mark.parametrize("qid, message", [([1, 2], r"record 2 has question_id \[1, 2\]; it must be a number or text"),
                                          (None, r"record 2 has question_id None")])
def test_a_pope_question_id_that_is_not_a_number_or_text_names_the_line(tmp_path, qid, message):
    good = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}
    path = tmp_path / "x_random.json"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, question_id=qid)) + "\n")
    with pytest.raises(ValueError, match=message):
        pope.load_pope_questions(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, question_id=2, image="")) + "\n")
    with pytest.raises(ValueError, match=r"record 2 \(question_id 2\) has image ''"):
        pope.load_pope_questions(path)


def test_a_link_in_a_run_relative_image_folder_that_leads_out_is_refused(tmp_path):
    """samples.jsonl at <run>/data/ with image_root relative to the run folder: the image path is checked
    there, links resolved, so a link inside the run's image folder that points outside it is refused."""
    run = tmp_path / "run"
    _png(run / "data" / "imgs" / "a.png"), _png(tmp_path / "outside.png")
    (run / "data" / "imgs" / "evil.png").symlink_to(tmp_path / "outside.png")
    rec = {"id": "a", "image": "a.png", "image_root": "data/imgs", "prompt": "Describe.", "chosen": "A red car ."}
    path = run / "data" / "samples.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, id="b", image="evil.png")) + "\n")
    with pytest.raises(ValueError, match=r"record 2 \(id b\): image path 'evil.png' leads outside the image folder"):
        data.load_samples(path)
    path.write_text(json.dumps(rec) + "\n")
    assert [s["id"] for s in data.load_samples(path)] == ["a"]  # the run-relative root itself is fine
