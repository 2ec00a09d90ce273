"""The tiny VLM: tokenizer, processor, chat template, training signal, save/load like a hub model."""
import json

import numpy as np
import pytest
import torch

from realign_lib.models import vlm
from realign_lib.models.scoring import response_logprobs
from realign_lib.prompts import FIXED_PROMPTS
from realign_lib.tinyworld import training as tv
from realign_lib.tinyworld import world as tw


@pytest.fixture(scope="module")
def parts():
    cfg = tv.TinyVLMConfig(tower_steps=30, sft_steps=40, tower_batch=32, sft_batch=16, seed=1)
    tok = tv.build_tokenizer(tw.world_vocabulary())
    return cfg, tok, tv.build_processor(tok, cfg), tv.build_model(tok, cfg)


def test_tokenizer_round_trips_world_text(parts):
    _, tok, _, _ = parts
    for s in tw.sample_scenes(50, seed=0):
        text = tw.describe(s)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    for prompt in FIXED_PROMPTS:
        assert tok.unk_token_id not in tok(prompt, add_special_tokens=False)["input_ids"], prompt
    assert tok.tokenize("a [MASK] star") == ["a", "[MASK]", "star"]


def test_pixels_equal_the_processor(parts):
    _, _, proc, _ = parts
    imgs = np.stack([tw.render_scene(s) for s in tw.sample_scenes(4, seed=0)])
    ref = proc.image_processor(list(imgs), return_tensors="pt")["pixel_values"]
    assert torch.allclose(tv.images_to_pixels(imgs), ref, atol=1e-6)


def test_encoding_matches_chat_template_and_masks_prompts(parts):
    _, tok, _, _ = parts
    rng = np.random.default_rng(0)
    scenes = tw.sample_scenes(10, seed=0)
    convs = [tw.llava_record(s, "x.png", rng, 2)["conversations"] for s in scenes]
    image_id = tok.convert_tokens_to_ids("<image>")
    for conv, (ids, labels) in zip(convs, tv.encode_conversations(convs, tok, 16)):
        rendered = tok.apply_chat_template(tv._messages(conv), tokenize=False)
        assert "".join(tv._render(m) for m in tv._messages(conv)) == rendered
        ref = tok(rendered, add_special_tokens=False)["input_ids"]
        expanded = [t for r in ref for t in ([image_id] * 16 if r == image_id else [r])]
        assert ids == expanded
        assert ids.count(image_id) == 16 and len(ids) == len(labels)
        learnt = tok.decode([i for i in labels if i != -100])
        answers = " ".join(t["value"].lower().replace(".", " .").replace("  ", " ").strip() + " </s>"
                           for t in conv if t["from"] == "gpt")
        assert sorted(learnt.split(" </s>")) == sorted(answers.split(" </s>"))  # only assistant replies are learnt


def test_one_llava_template_shared_with_the_tiny_random_llava(parts):
    from tests.support import tiny_models as testing

    _, tok, proc, _ = parts
    assert tok.chat_template == proc.chat_template == vlm.LLAVA_CHAT_TEMPLATE
    assert testing.tiny_llava()[1].chat_template == vlm.LLAVA_CHAT_TEMPLATE
    prompt = vlm.chat_prompt(proc, "Is there a star in the image?")
    assert prompt == "USER: <image>\nIs there a star in the image? ASSISTANT:"
    # the word-level tokenizer splits on any whitespace: "<image>\n" and the earlier "<image> " give the same ids
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tok(prompt.replace("<image>\n", "<image> "), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


def test_training_lowers_loss_and_saves_a_hub_style_checkpoint(small_world, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = tv.TinyVLMConfig(tower_steps=40, sft_steps=60, tower_batch=32, sft_batch=16, seed=2)
    summary = tv.train_tiny_vlm(small_world, tmp_path / "m", cfg)
    log = [json.loads(x) for x in open(tmp_path / "m" / "train_log.jsonl")]
    for phase in ("tower", "sft"):
        losses = [r["loss"] for r in log if r["phase"] == phase]
        assert losses[-1] < 0.7 * losses[0], (phase, losses)
    assert 0.5e6 < summary["parameters"] < 3e6
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(proc).__name__ == "LlavaProcessor"
    q = json.loads(open(small_world["pope"]["random"]).readline())
    ans = vlm.generate(model, proc, [f"{small_world['test_images']}/{q['image']}"], [q["text"]], max_new_tokens=4)
    assert ans[0].split()[0] in ("yes", "no"), ans  # already answers in the yes/no format after 60 steps
    # the summary marks completion: a second call with the same config returns without training
    again = tv.train_tiny_vlm(small_world, tmp_path / "m", cfg)
    assert again.pop("reused") is True and again == summary  # returned from the folder, not trained again
    # the same settings on another world (here: the same files under another seed's config) is another
    # model: trained again, not returned from the folder (two steps per phase keep this quick)
    quick = tv.TinyVLMConfig(**{**cfg.__dict__, "sft_steps": 2, "tower_steps": 2})
    first = tv.train_tiny_vlm(small_world, tmp_path / "q", quick)
    other_world = dict(small_world, config={**small_world["config"], "seed": small_world["config"]["seed"] + 1})
    second = tv.train_tiny_vlm(other_world, tmp_path / "q", quick)
    assert (first["world"], second["world"]) == (small_world["config"], other_world["config"])
    third = tv.train_tiny_vlm(other_world, tmp_path / "q", quick)
    assert third.pop("reused") is True and third == second  # complete for that world now


def test_logprob_of_tiny_model_equals_manual_sum(parts):
    _, tok, proc, model = parts
    imgs = [tw.render_scene(s) for s in tw.sample_scenes(2, seed=0)]
    prompts, responses = ["Is there a star in the image?", "Describe the image in detail."], ["yes .", "a red ball ."]
    got = response_logprobs(model, proc, imgs, prompts, responses)
    for i in range(2):
        p = vlm.chat_prompt(proc, prompts[i])
        full = proc(images=[imgs[i]], text=[p + " " + responses[i] + "</s>"], return_tensors="pt")
        n_prompt = proc(images=[imgs[i]], text=[p], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logp = model(**full).logits[0].log_softmax(-1)
        ids = full["input_ids"][0]
        manual = sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))
        assert got[i].item() == pytest.approx(manual, abs=1e-4)
        assert len(ids) - n_prompt == len(responses[i].split()) + 1  # response words + </s>


def test_warm_restarts_run_while_the_check_misses_and_a_reused_model_continues_them(small_world, tmp_path):
    """train_tiny_vlm with a check: a restart cycle per missed check (at most sft_restarts), each check
    recorded; a model that met its target is reused without checking; allowing more restarts continues
    from the saved model; other restart steps train again."""
    from dataclasses import replace

    from realign_lib.files import read_jsonl

    cfg = tv.TinyVLMConfig(tower_steps=6, sft_steps=6, tower_batch=16, sft_batch=8, seed=2, cpu_threads=1,
                           sft_restarts=1, sft_restart_steps=4)
    calls = []

    def check(model, processor, restarts):  # misses its target until two restarts were made
        calls.append(restarts)
        assert not model.training and processor.tokenizer is not None
        return ["not yet"] if restarts < 2 else []

    out = tmp_path / "m"
    first = tv.train_tiny_vlm(small_world, out, cfg, check=check, checkpoint_every=0)
    assert calls == [0, 1] and [r["cycle"] for r in first["restarts"]] == [1]  # at most one restart allowed
    assert [c["missed"] for c in first["checks"]] == [["not yet"], ["not yet"]]
    phases = [r["phase"] for r in read_jsonl(out / "train_log.jsonl")]
    assert phases.index("restart1") > phases.index("sft") and "restart2" not in phases
    weights = (out / "model.safetensors").read_bytes()

    calls.clear()  # two restarts allowed now: the saved model is checked again and one more cycle runs
    second = tv.train_tiny_vlm(small_world, out, replace(cfg, sft_restarts=2), check=check, checkpoint_every=0)
    assert calls == [1, 2] and [r["cycle"] for r in second["restarts"]] == [1, 2] and not second.get("reused")
    assert (out / "model.safetensors").read_bytes() != weights

    calls.clear()  # on target: reused without a check
    third = tv.train_tiny_vlm(small_world, out, replace(cfg, sft_restarts=2), check=check, checkpoint_every=0)
    assert calls == [] and third["reused"] and len(third["restarts"]) == 2

    marker = json.loads((out / "tiny_vlm.json").read_text())  # a model saved before warm restarts existed:
    plain = tmp_path / "plain"                                 # no restarts or checks in its marker
    tv.train_tiny_vlm(small_world, plain, replace(cfg, sft_restarts=0), checkpoint_every=0)
    old = {k: v for k, v in json.loads((plain / "tiny_vlm.json").read_text()).items() if k not in ("restarts", "checks")}
    (plain / "tiny_vlm.json").write_text(json.dumps(old))
    calls.clear()
    again = tv.train_tiny_vlm(small_world, plain, cfg, check=check, checkpoint_every=0)
    assert calls == [0, 1] and [r["cycle"] for r in again["restarts"]] == [1] and not again.get("reused")
    calls.clear()  # checked again (its last check missed, no restart is left), nothing changed: reused
    assert tv.train_tiny_vlm(small_world, plain, cfg, check=check, checkpoint_every=0)["reused"] and calls == [1]
    assert marker["restarts"] == third["restarts"]

    calls.clear()  # other restart steps: the restarted weights are not what they would make: trained again
    fourth = tv.train_tiny_vlm(small_world, out, replace(cfg, sft_restarts=2, sft_restart_steps=3), check=check,
                               checkpoint_every=0)
    assert not fourth.get("reused") and calls == [0, 1, 2] and [r["steps"] for r in fourth["restarts"]] == [3, 3]
