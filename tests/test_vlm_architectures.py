"""``realign_lib.models.vlm`` on tiny random models of five real VLM architectures.

For each of LLaVA-1.5, LLaVA-1.6, Qwen2-VL, Idefics3/SmolVLM and Janus (built offline by
``tests.support.tiny_models``): batched generation, batched response log-probabilities against a
by-hand computation on single un-padded samples, image embeddings, and save → ``load_vlm``
round trips. An architecture the environment cannot build is skipped with the reason. Without
torchvision, Qwen2-VL runs with ``testing.Qwen2VLImageOnlyProcessor`` (checked on its own below).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from realign_lib.models import vlm
from realign_lib.models.scoring import build_scoring_batch, response_logprobs, sequence_logprobs, truncate_batch
from tests.support import tiny_models as testing

NAMES = list(testing.TINY_BUILDERS)

QUESTIONS = [
    "what is in the image ?",
    "describe the picture",
    "how many red cats are there on the left of the big house in this photo ?",
]
RESPONSES = [
    "a cat",
    "there are two red cats and one big blue dog on the left .",
    "yes",
]


SHAPES = [(32, 32), (32, 48), (40, 24)]  # mixed sizes and aspect ratios: image token counts may differ


def _images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*SHAPES[i % len(SHAPES)], 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    name = request.param
    reason = testing.unavailable_reason(name)
    if reason:
        pytest.skip(f"{name}: {reason}")
    model, processor = testing.TINY_BUILDERS[name]()
    return name, model, processor


def _image_token_id(processor) -> int:
    tok = processor.tokenizer
    tid = getattr(processor, "image_token_id", None)
    return tid if tid is not None else tok.convert_tokens_to_ids(processor.image_token)


def _by_hand(model, processor, image, question: str, response: str) -> float:
    """log p(response + EOS | image, prompt) from one forward pass on the single, un-padded sample."""
    tok = processor.tokenizer
    prompt = vlm.chat_prompt(processor, question)
    sep = "" if prompt.endswith((" ", "\n")) else " "
    full = prompt + sep + response + tok.eos_token
    enc_p = processor(images=[vlm.to_pil(image)], text=[prompt], return_tensors="pt")
    enc_f = processor(images=[vlm.to_pil(image)], text=[full], return_tensors="pt")
    ids_p, ids_f = enc_p["input_ids"][0], enc_f["input_ids"][0]
    n, length = len(ids_p), len(ids_f)
    assert int(enc_f["attention_mask"].sum()) == length, "a single sample must not be padded"
    assert torch.equal(ids_f[:n], ids_p), "prompt tokens are not a prefix of prompt + response"
    expected = tok(sep + response + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ids_f[n:].tolist() == expected, "the tokens after the prompt are not exactly response + EOS"
    with torch.no_grad():
        logits = model(**enc_f).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids_f[t]] for t in range(n, length)))


def test_generate_batch(tiny):
    name, model, processor = tiny
    out = vlm.generate(model, processor, _images(), QUESTIONS, max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 3, name
    assert all(isinstance(s, str) for s in out), name
    # a single sample generates the same greedy tokens as inside the padded batch
    alone = vlm.generate(model, processor, _images()[2:], QUESTIONS[2:], max_new_tokens=4)
    assert alone == out[2:], f"{name}: left padding changed the greedy answer: {alone} vs {out[2:]}"


def test_response_logprobs_match_single_unpadded_forward(tiny):
    name, model, processor = tiny
    images = _images()
    batched = response_logprobs(model, processor, images, QUESTIONS, RESPONSES, batch_size=8)
    assert batched.shape == (3,) and torch.isfinite(batched).all()
    by_hand = torch.tensor([_by_hand(model, processor, im, q, r) for im, q, r in zip(images, QUESTIONS, RESPONSES)])
    torch.testing.assert_close(batched, by_hand, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")

    # the mask covers exactly the response (+ EOS) tokens: no image, prompt or padding token
    batch = build_scoring_batch(processor, images, QUESTIONS, RESPONSES)
    ids, mask, attn = batch["input_ids"], batch["response_mask"].bool(), batch["attention_mask"].bool()
    assert ids.shape[0] == 3 and not bool(attn.all()), f"{name}: the batch should be padded"
    assert not bool((mask & ~attn).any()), f"{name}: response mask on padding"
    assert not bool((ids[mask] == _image_token_id(processor)).any()), f"{name}: response mask on an image token"
    tok = processor.tokenizer
    for row, (q, r) in enumerate(zip(QUESTIONS, RESPONSES)):
        prompt = vlm.chat_prompt(processor, q)
        n_prompt = len(processor(images=[vlm.to_pil(images[row])], text=[prompt])["input_ids"][0])
        pos = mask[row].nonzero().flatten()
        assert int(pos.min()) == n_prompt, f"{name}: row {row} mask starts at {int(pos.min())}, prompt has {n_prompt}"
        assert tok.decode(ids[row, pos], skip_special_tokens=True).split() == r.split(), name
        assert int(ids[row, pos[-1]]) == tok.eos_token_id, f"{name}: the last scored token is not EOS"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_respected(tiny, side):
    """The requested side wins over a processor's own default (Janus pads left by default), also
    when the tokenizer was not created with ``padding_side`` (as with many hub checkpoints)."""
    name = tiny[0]
    _, processor = testing.TINY_BUILDERS[name]()
    processor.tokenizer.init_kwargs.pop("padding_side", None)
    texts = [vlm.chat_prompt(processor, q) for q in (QUESTIONS[0], QUESTIONS[2])]
    mask = vlm.model_inputs(processor, _images(2), texts, side)["attention_mask"]
    short = int(mask.sum(1).argmin())
    assert int(mask[short].sum()) < mask.shape[1], f"{name}: expected one padded row"
    pad_at = 0 if side == "left" else -1
    assert int(mask[short, pad_at]) == 0 and int(mask[short, -1 - pad_at]) == 1, f"{name}: not {side}-padded"


def test_image_changes_the_logprobs(tiny):
    name, model, processor = tiny
    a, b = _images(2, seed=1)
    lp = response_logprobs(model, processor, [a, b], QUESTIONS[:1] * 2, RESPONSES[:1] * 2)
    assert abs(float(lp[0] - lp[1])) > 1e-6, f"{name}: the image has no effect on the response log-prob"


def test_image_embeddings(tiny):
    name, model, processor = tiny
    images = _images(3, seed=2)
    emb = vlm.image_embeddings(model, processor, images)
    assert emb.ndim == 2 and emb.shape[0] == 3 and emb.shape[1] > 0, f"{name}: {emb.shape}"
    assert emb.dtype == np.float32 and np.isfinite(emb).all(), name
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(emb[i], emb[j], atol=1e-6), f"{name}: images {i} and {j} embed the same"
    # batching does not mix images: each row equals the image embedded alone
    alone = np.concatenate([vlm.image_embeddings(model, processor, [im]) for im in images])
    np.testing.assert_allclose(emb, alone, atol=1e-5, err_msg=name)


def test_save_and_load_by_path(tiny, tmp_path):
    name, model, processor = tiny
    rng = torch.get_rng_state()
    path = testing.save_tiny(name, tmp_path / name)
    assert torch.equal(torch.get_rng_state(), rng), f"{name}: building changed the global torch RNG state"
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors")), f"{name}: not saved as safetensors"
    assert not list(path.glob("*.bin")), f"{name}: pickle weights written"
    loaded, loaded_proc = vlm.load_vlm(str(path), device="cpu")
    assert type(loaded) is type(model) and type(loaded_proc) is type(processor), name
    images, texts = _images(2, seed=3), [vlm.chat_prompt(processor, q) for q in QUESTIONS[:2]]
    enc = vlm.model_inputs(processor, images, texts, "right")
    enc2 = vlm.model_inputs(loaded_proc, images, texts, "right")
    assert enc.keys() == enc2.keys(), name
    for k in enc:
        if torch.is_tensor(enc[k]):
            assert torch.equal(enc[k], enc2[k]), f"{name}: processor output {k!r} changed after save/load"
    with torch.no_grad():
        ref = model(**enc).logits
        got = loaded(**enc2).logits
    # the builder is seeded, so a fresh build (as save_tiny makes) has the fixture's weights
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def test_missing_path_raises(tiny, tmp_path):
    name = tiny[0]
    missing = tmp_path / f"no_such_{name}"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        vlm.load_vlm(str(missing), device="cpu")
    empty = tmp_path / f"empty_{name}"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        vlm.load_vlm(str(empty), device="cpu")


def test_unknown_processor_class_raises(tmp_path):
    """``AutoProcessor`` silently returns a bare tokenizer when the folder's recorded processor class is
    unknown in this process (e.g. an unregistered custom class); ``load_vlm`` must refuse that."""
    reason = testing.unavailable_reason("llava")
    if reason:
        pytest.skip(reason)
    path = testing.save_tiny("llava", tmp_path / "llava")
    config = path / "processor_config.json"
    saved = json.loads(config.read_text())
    saved["processor_class"] = "NoSuchProcessor"
    config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not an image-text processor"):
        vlm.load_vlm(str(path), device="cpu")


def test_qwen2_vl_image_only_processor(tmp_path):
    """Without torchvision, Qwen2-VL's processor is the stock one minus its video slot: genuine image
    processor and image-token expansion, a clear error for videos, and a save/load round trip."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed: tiny_qwen2_vl uses the stock Qwen2VLProcessor")
    reason = testing.unavailable_reason("qwen2_vl")
    if reason:
        pytest.skip(reason)
    _, processor = testing.tiny_qwen2_vl()
    cls = testing.Qwen2VLImageOnlyProcessor
    assert type(processor) is cls and isinstance(processor, Qwen2VLProcessor)
    assert cls.get_attributes() == ["image_processor", "tokenizer"]
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    images, texts = _images(), [vlm.chat_prompt(processor, q) for q in QUESTIONS]
    enc = vlm.model_inputs(processor, images, texts, "right")
    per_image = [int(n) for n in enc["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2]
    assert len(set(per_image)) > 1, "the test images should differ in token count"
    assert (enc["input_ids"] == processor.image_token_id).sum(1).tolist() == per_image
    assert enc["mm_token_type_ids"].eq(1).sum(1).tolist() == per_image
    with pytest.raises(ValueError, match="no video processor"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 32, 32, 3), np.uint8)])
    processor.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.chat_template == processor.chat_template
    enc2 = vlm.model_inputs(loaded, images, texts, "right")
    assert enc.keys() == enc2.keys() and all(torch.equal(enc[k], enc2[k]) for k in enc)


# ------------------------------------------------------------------- scoring batch: one preprocessing
def test_scoring_batch_preprocesses_each_image_once(tiny):
    """The response mask equals the one found with a second, prompt-only processor call, while the
    images go through the image processor once (counted on its ``preprocess``)."""
    name, model, processor = tiny
    images = _images()
    ip = processor.image_processor
    real, calls = ip.preprocess, []

    def counting(imgs, *a, **k):
        calls.append(len(imgs))
        return real(imgs, *a, **k)

    ip.preprocess = counting
    try:
        batch = build_scoring_batch(processor, images, QUESTIONS, RESPONSES)
    finally:
        del ip.preprocess
    assert len(calls) == 1, calls
    texts = [vlm.chat_prompt(processor, q) for q in QUESTIONS]
    prompt_len = vlm.model_inputs(processor, images, texts, "right")["attention_mask"].sum(1)
    want = torch.zeros_like(batch["attention_mask"])
    for row, n in enumerate(prompt_len.tolist()):
        want[row, n:] = batch["attention_mask"][row, n:]
    assert torch.equal(batch["response_mask"], want), name


def test_truncate_batch_cuts_responses_not_images(tiny):
    name, model, processor = tiny
    images = _images()
    full = build_scoring_batch(processor, images, QUESTIONS, RESPONSES)
    prompt_len = int((full["attention_mask"] - full["response_mask"]).sum(1).max())
    cut = build_scoring_batch(processor, images, QUESTIONS, RESPONSES, max_length=prompt_len + 1)
    assert cut["input_ids"].shape[1] == prompt_len + 1 < full["input_ids"].shape[1]
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :prompt_len + 1])
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    inputs = {k: v for k, v in cut.items() if k != "response_mask"}
    with torch.no_grad():
        lp = sequence_logprobs(model(**inputs).logits, cut["input_ids"], cut["response_mask"])
    assert torch.isfinite(lp).all() and cut["response_mask"].sum() < full["response_mask"].sum()
    with pytest.raises(ValueError, match="model_max_length"):
        truncate_batch(full, 3)


# ----------------------------------------------------------------------------- LoRA targets per architecture
LM_PREFIX = {"llava": "model.language_model.", "llava_next": "model.language_model.", "janus": "model.language_model.",
             "qwen2_vl": "model.language_model.", "idefics3": "model.text_model."}
PROJECTOR = {"llava": "model.multi_modal_projector", "llava_next": "model.multi_modal_projector",
             "janus": "model.aligner", "qwen2_vl": "model.visual.merger", "idefics3": "model.connector"}


def test_lora_targets_by_architecture(tiny):
    """``language_model`` (the default): every linear layer of the language model and nothing of the
    vision tower, the connector, a generation head or the output head; the projector only when asked."""
    from realign_lib.training import config as training

    name, model, _ = tiny
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lm = training.lora_target_names(model, "language_model")
    assert set(lm) == {n for n in linear if n.startswith(LM_PREFIX[name])}, name
    assert not [n for n in lm if any(w in n for w in ("vision", "visual", "projector", "connector", "aligner",
                                                       "generation", "lm_head"))]
    qkvo = training.lora_target_names(model, "q_proj,k_proj,v_proj,o_proj")
    assert {n.split(".")[-1] for n in qkvo} == {"q_proj", "k_proj", "v_proj", "o_proj"} and set(qkvo) < set(lm)
    every = training.lora_target_names(model, "all_linear")
    assert set(lm) < set(every) and any(n.startswith(PROJECTOR[name]) for n in every)
    cfg = training.PreferenceConfig(train_projector=True)
    assert cfg.lora_config(model).modules_to_save == [PROJECTOR[name]]
    assert not training.PreferenceConfig().lora_config(model).modules_to_save


# ---------------------------------------------------------------- old-style processor configs
@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_load_vlm_fills_processor_fields_of_an_old_config(name, tmp_path):
    """A llava-hf snapshot saved before ``patch_size`` / ``num_additional_image_tokens`` /
    ``vision_feature_select_strategy`` were processor fields loads with them filled from the model
    config, and scores exactly as the complete folder does."""
    folder = testing.save_tiny(name, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "processor_config.json").read_text())
    for key in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy"):
        del cfg[key]
    (old / "processor_config.json").write_text(json.dumps(cfg))
    model, full = vlm.load_vlm(folder, device="cpu")
    with pytest.warns(UserWarning, match="patch_size, vision_feature_select_strategy, num_additional_image_tokens"):
        _, filled = vlm.load_vlm(old, device="cpu")
    assert (filled.patch_size, filled.num_additional_image_tokens, filled.vision_feature_select_strategy) == \
        (full.patch_size, full.num_additional_image_tokens, full.vision_feature_select_strategy) == (8, 1, "default")
    images = _images()
    want = response_logprobs(model, full, images, QUESTIONS, RESPONSES)
    got = response_logprobs(model, filled, images, QUESTIONS, RESPONSES)
    torch.testing.assert_close(got, want)
    import warnings

    with warnings.catch_warnings(record=True) as seen:  # a complete config: nothing filled, no warning
        warnings.simplefilter("always")
        vlm.load_vlm(folder, device="cpu")
    assert not [w for w in seen if "filled from the model config" in str(w.message)]


def test_chat_prompt_system_turn_is_a_choice():
    _, processor = testing.tiny_llava()
    plain = vlm.chat_prompt(processor, "is there a dog ?")
    assert plain == "USER: <image>\nis there a dog ? ASSISTANT:"  # llava-hf style: no system turn by default
    with_system = vlm.chat_prompt(processor, "is there a dog ?", system=vlm.VICUNA_V1_SYSTEM)
    assert with_system == vlm.VICUNA_V1_SYSTEM + " " + plain  # the original vicuna_v1 layout
