"""One interface to any Hugging Face image-text-to-text model: the tiny VLM and a 7B alike.

* :func:`load_vlm` — model + processor by hub id or local path (dtype, device, safetensors only,
  ``trust_remote_code`` off unless asked);
* :func:`chat_prompt` — a user turn with one image, rendered by the processor's chat template;
* :func:`generate` — batched greedy decoding for (image, question) lists;
* :func:`build_scoring_batch` + :func:`sequence_logprobs` — the summed log-probability of a given
  response, over the response tokens only (prompt and image tokens masked); differentiable, so
  the trainer uses the same two functions; :func:`response_logprobs` is the batched no-grad form;
* :func:`image_embeddings` — pooled image features from the model's own vision tower;
* :func:`to_device` — a processor batch moved to the model's device (floats in the model's dtype);
* :data:`LLAVA_CHAT_TEMPLATE` — the LLaVA-1.5 chat template (llava-hf style) the tiny models carry.

Nothing here knows which architecture it serves: tests run it on tiny random LLaVA-1.5,
LLaVA-1.6, Qwen2-VL, Idefics3/SmolVLM and Janus models.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "load_vlm", "fill_processor_fields", "check_local_checkpoint", "to_pil", "chat_prompt", "generate", "build_scoring_batch", "truncate_batch",
    "sequence_logprobs", "VICUNA_V1_SYSTEM",
    "response_logprobs", "image_embeddings", "model_inputs", "to_device", "LLAVA_CHAT_TEMPLATE",
]

ImageLike = Any  # PIL image, path, or HxWx3 uint8 array

# LLaVA-1.5 chat template in the llava-hf style: "USER: <image>\n{text} ASSISTANT:" — an optional system
# text first, each user turn "USER: ", its image placeholder (where the user put the image) followed by a
# newline, its text and a space; each assistant turn "ASSISTANT: {reply}</s> "; the generation prompt
# "ASSISTANT:". The tiny VLM (realign_lib.tinyvlm) and the tiny random LLaVA (realign_lib.testing) use it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _looks_like_path(name: str) -> bool:
    """Hub ids look like ``org/name``; anything starting with ``.``, ``/``, ``~`` or deeper is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_vlm(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | None = None,
             trust_remote_code: bool = False, adapter: str | os.PathLike | None = None):
    """Load ``(model, processor)`` from a hub id or a local folder.

    ``dtype``: ``"auto"`` (bf16 on a GPU that supports it, fp32 on CPU), a ``torch.dtype`` or its
    name. ``device``: ``"cuda"``, ``"cpu"``, …; default GPU if available. Weights load from
    safetensors only. ``adapter``: optional PEFT adapter folder applied on top.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = str(name_or_path)
    path = Path(name).expanduser()
    if _looks_like_path(name) and not path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist; pass a folder made by save_pretrained "
                                f"(for the tiny world: <run>/model/tiny_vlm) or a hub id")
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here; is this the folder written by save_pretrained?")
    if path.is_dir():
        check_local_checkpoint(path, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        if getattr(processor, "image_processor", None) is None:
            # AutoProcessor falls back to a bare tokenizer when it cannot resolve the recorded processor class
            raise ValueError(f"{name!r}: AutoProcessor loaded a {type(processor).__name__}, not an image-text "
                             f"processor; is its processor class (processor_config.json) unknown to this "
                             f"transformers? Custom classes must first be registered with AutoProcessor.register")
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as err:
        raise OSError(f"could not load {name!r}: {err}\nOffline? Download the checkpoint on a machine with network "
                      f"access and pass its local folder; weights must be safetensors.") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(f"{name!r} needs its own Python code to load (trust_remote_code); the kit keeps that "
                             f"off: use a checkpoint transformers supports natively, or pass "
                             f"trust_remote_code=True once you have read its code") from err
        raise
    fill_processor_fields(processor, model, _saved_processor_config(name))
    model.to(device)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: no adapter_config.json; pass the folder a LoRA run saved")
        if not (adapter / "adapter_model.safetensors").is_file():
            raise ValueError(f"{adapter}: no adapter_model.safetensors (weights are loaded from safetensors only: "
                             f"pickle files can run code); save the adapter with safe_serialization=True")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, processor


def _saved_processor_config(name: str) -> dict | None:
    """The top-level entries of the checkpoint's ``processor_config.json``; None if it has none."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(name, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def fill_processor_fields(processor, model, saved: dict | None = None) -> list[str]:
    """Fill the image-token fields an older LLaVA-style processor config lacks from the model's config.

    LLaVA / LLaVA-NeXT processors count the image tokens they insert from ``patch_size``,
    ``vision_feature_select_strategy`` and ``num_additional_image_tokens``; snapshots saved before
    those were processor fields have none, which fails at ``height // None`` or miscounts (576 vs
    575 tokens). ``patch_size`` comes from the vision config, the strategy from the model config,
    and — only when ``saved`` (the processor config as written) lacks it — the additional-token
    count from the vision tower: 1 for CLIP (its CLS token), else 0. Returns the names filled
    (a warning lists them); processors without these fields are left alone.
    """
    import warnings

    if not hasattr(processor, "patch_size"):
        return []
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    filled = []
    if getattr(processor, "patch_size", None) is None and getattr(vision, "patch_size", None):
        processor.patch_size = vision.patch_size
        filled.append("patch_size")
    if getattr(processor, "vision_feature_select_strategy", None) is None and \
            getattr(cfg, "vision_feature_select_strategy", None):
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        filled.append("vision_feature_select_strategy")
    if saved is not None and "num_additional_image_tokens" not in saved and vision is not None:
        processor.num_additional_image_tokens = 1 if getattr(vision, "model_type", "") == "clip_vision_model" else 0
        filled.append("num_additional_image_tokens")
    if filled:
        warnings.warn(f"the processor config lacks {', '.join(filled)}; filled from the model config: "
                      + ", ".join(f"{k}={getattr(processor, k)!r}" for k in filled), stacklevel=3)
    return filled


def check_local_checkpoint(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse a local checkpoint folder that would run code or unpickle weights.

    Raises ``ValueError`` when a config in ``path`` maps classes to the folder's own Python files
    (``auto_map``) and ``trust_remote_code`` is off, or when the folder has weight files but none of
    them is ``.safetensors`` (``pytorch_model.bin`` and other pickles can run code when loaded).
    """
    import json

    if not trust_remote_code:
        for cfg in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            f = path / cfg
            try:
                has_map = f.is_file() and "auto_map" in json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{f}: not valid JSON ({err}); the checkpoint folder is damaged") from err
            if has_map:
                raise ValueError(f"{f} maps classes to code shipped in {path} (auto_map): loading it would run that "
                                 f"code, and trust_remote_code is off. Use a checkpoint transformers supports natively "
                                 f"or pass trust_remote_code=True once you have read the code")
    weights = [f.name for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if weights and not any(w.endswith(".safetensors") for w in weights):
        raise ValueError(f"{path}: weights only as {', '.join(sorted(weights))}; the kit loads safetensors only (pickle "
                         f"files can run code when loaded). Convert once, e.g. model.save_pretrained(folder, "
                         f"safe_serialization=True) on a trusted machine")


def to_pil(image: ImageLike):
    """A path, array or PIL image → RGB PIL image (clear error naming a missing or corrupt file)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    p = Path(image)
    if not p.is_file():
        raise FileNotFoundError(f"image file {p} not found")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {p} is not a readable image ({err})") from err


def _tok(processor):
    return getattr(processor, "tokenizer", processor)


# The system text of LLaVA-1.5's original conversation template (vicuna_v1). llava-hf's chat templates and
# lmms-eval's llava_hf model send no system turn, and neither does the kit (chat_prompt's default): a stated
# choice that matches the Hugging Face checkpoints and lmms-eval, not the original LLaVA evaluation scripts
# (docs/gpu.md, "Prompts"). Pass system=VICUNA_V1_SYSTEM to chat_prompt to match those.
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions.")


def chat_prompt(processor, text: str, image: bool = True, system: str = "") -> str:
    """One user turn (an image, then ``text``) with the assistant's turn opened; ``system``: an optional
    system turn first (none by default, as llava-hf's templates and lmms-eval; see :data:`VICUNA_V1_SYSTEM`)."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return processor.apply_chat_template(turns + [{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def _images_arg(processor, images):
    """Idefics3/SmolVLM processors want one list of images per sample."""
    name = type(processor).__name__
    if name.startswith(("Idefics", "SmolVLM")):
        return [[im] for im in images]
    return list(images)


def model_inputs(processor, images: Sequence[ImageLike], texts: Sequence[str], padding_side: str):
    """Run the processor on (image, text) pairs with the given padding side; returns a BatchFeature."""
    tok = _tok(processor)
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        # also passed explicitly: some processors (Janus, InternVL, Llama 4, ...) default to left padding
        # in their own text kwargs, which beats the tokenizer attribute unless the tokenizer was
        # created with padding_side in its init kwargs
        return processor(images=_images_arg(processor, [to_pil(i) for i in images]), text=list(texts),
                         padding=True, padding_side=padding_side, return_tensors="pt")
    finally:
        tok.padding_side = old


def to_device(batch, model) -> dict:
    """``batch`` (a processor's ``BatchFeature`` or any mapping) as a plain dict on ``model.device``.

    Tensors move to the model's device, floating-point tensors (pixel values) are also cast to the
    model's dtype so a bf16 model gets bf16 images; integer tensors (ids, masks) keep their dtype;
    anything else is passed through unchanged. The input is not modified.
    """
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(model.device)
            if v.is_floating_point():
                v = v.to(model.dtype)
        out[k] = v
    return out


@torch.no_grad()
def generate(model, processor, images: Sequence[ImageLike], questions: Sequence[str], max_new_tokens: int = 64,
             batch_size: int = 16, chat: bool = True, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers (temperature 0) for each (image, question), batched with left padding."""
    from tqdm.auto import tqdm

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    tok = _tok(processor)
    answers: list[str] = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, disable=not progress, mininterval=5):
        qs = questions[start:start + batch_size]
        texts = [chat_prompt(processor, q) if chat else q for q in qs]
        batch = to_device(model_inputs(processor, images[start:start + batch_size], texts, "left"), model)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return answers


def _text_token_counts(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` as the processor's tokenizer call makes them, before any image token
    is expanded (the same special tokens, no padding)."""
    return tok(list(texts), padding=False)["input_ids"]


def build_scoring_batch(processor, images: Sequence[ImageLike], prompts: Sequence[str], responses: Sequence[str],
                        add_eos: bool = True, chat: bool = True, max_length: int = 0) -> dict:
    """Tensors to score ``responses`` given (image, prompt): the processor's inputs plus ``response_mask``.

    The full text is the chat prompt followed by the response (and the tokenizer's EOS if
    ``add_eos``), right-padded; each image is preprocessed once. ``response_mask`` ``(B, L)`` is 1
    on the response's tokens and 0 on padding, prompt and image tokens: a row's response is its
    last ``n`` real tokens, ``n`` counted on the text alone (image placeholders only ever expand
    inside the prompt). Raises if a prompt's tokens are not a prefix of its full text.
    ``max_length`` > 0 cuts every row to that many tokens (image tokens included) from the end
    (:func:`truncate_batch`).
    """
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(responses)} responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"response {i} is empty; every sample needs a non-empty response to score")
    tok = _tok(processor)
    texts = [chat_prompt(processor, p) if chat else p for p in prompts]
    eos = tok.eos_token if add_eos and tok.eos_token else ""
    full = [t + ("" if t.endswith((" ", "\n")) else " ") + r.strip() + eos for t, r in zip(texts, responses)]
    enc = model_inputs(processor, images, full, "right")
    ids_p, ids_f = _text_token_counts(tok, texts), _text_token_counts(tok, full)
    mask = enc["attention_mask"]
    response_mask = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        p, f = ids_p[row], ids_f[row]
        if f[:len(p)] != p:
            raise ValueError(f"sample {row}: the prompt's tokens are not a prefix of prompt+response; "
                             f"the tokenizer merges across the boundary (prompt ends {texts[row][-20:]!r})")
        n, length = len(f) - len(p), int(mask[row].sum())
        response_mask[row, length - n:length] = 1
    if int(response_mask.sum(1).min()) == 0:
        raise ValueError("a response has no tokens after the prompt; check the chat template")
    out = dict(enc)
    out["response_mask"] = response_mask
    return truncate_batch(out, max_length) if max_length else out


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask", "token_type_ids", "mm_token_type_ids",
                  "position_ids")


def truncate_batch(batch: dict, max_length: int) -> dict:
    """A right-padded scoring batch with every row cut to ``max_length`` tokens (columns past it
    dropped from the ``(B, L)`` sequence tensors), as LLaVA's ``model_max_length`` cuts the
    sequence after the image tokens are inserted. Raises if a row would lose all of its response
    (the prompt and image tokens are never cut)."""
    length = batch["input_ids"].shape[1]
    if not max_length or length <= max_length:
        return batch
    kept = batch["response_mask"][:, :max_length].sum(1)
    if int(kept.min()) == 0:
        row = int(kept.argmin())
        raise ValueError(f"model_max_length {max_length} cuts every response token of row {row} (its prompt and "
                         f"image tokens alone take {int(batch['attention_mask'][row].sum()) - int(batch['response_mask'][row].sum())}"
                         f" tokens); raise model_max_length")
    out = dict(batch)
    for k in _SEQUENCE_KEYS:
        v = out.get(k)
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length:
            out[k] = v[:, :max_length]
    return out


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the response tokens.

    Args:
        logits: ``(B, L, V)`` model outputs; position ``t`` predicts token ``t + 1``.
        input_ids: ``(B, L)`` token ids.
        response_mask: ``(B, L)`` 1 where the token belongs to the response, else 0.
    Returns:
        ``(B,)`` — ``sum_t mask[t] · log softmax(logits[t-1])[input_ids[t]]``, in float32.
    """
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (picked * mask).sum(-1)


def forward_logprobs(model, batch: dict) -> torch.Tensor:
    """``(B,)`` summed response log-probs for a batch from :func:`build_scoring_batch` (keeps grad)."""
    inputs = {k: v for k, v in to_device(batch, model).items() if k != "response_mask"}
    logits = model(**inputs).logits
    return sequence_logprobs(logits, inputs["input_ids"], batch["response_mask"].to(logits.device))


@torch.no_grad()
def response_logprobs(model, processor, images: Sequence[ImageLike], prompts: Sequence[str],
                      responses: Sequence[str], batch_size: int = 8, add_eos: bool = True,
                      chat: bool = True) -> torch.Tensor:
    """``(N,)`` summed log p(response | image, prompt) over response tokens, batched, no grad."""
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = build_scoring_batch(processor, images[s:s + batch_size], prompts[s:s + batch_size],
                                    responses[s:s + batch_size], add_eos=add_eos, chat=chat)
        out.append(forward_logprobs(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _image_features_fn(model):
    """``get_image_features`` of the model, or of its inner base model (Janus keeps it only there)."""
    for m in (model, getattr(model, "model", None)):
        fn = getattr(m, "get_image_features", None) if m is not None else None
        if callable(fn):
            return fn
    raise AttributeError(f"{type(model).__name__} has no get_image_features (nor does its .model); "
                         f"image_embeddings needs the model's own vision features")


@torch.no_grad()
def image_embeddings(model, processor, images: Sequence[ImageLike], batch_size: int = 64,
                     normalize: bool = True, progress: bool = False) -> np.ndarray:
    """``(N, D)`` float32 image embeddings: the model's image features, mean-pooled over tokens.

    Uses ``model.get_image_features`` — the vision tower and projector, i.e. the image as the
    language model sees it — so it works for every architecture; L2-normalised if ``normalize``.
    """
    from tqdm.auto import tqdm

    ip = processor.image_processor
    get_features = _image_features_fn(model)
    params = set(inspect.signature(get_features).parameters)
    chunks = []
    for s in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress, mininterval=5):
        pil = [to_pil(i) for i in images[s:s + batch_size]]
        if type(processor).__name__.startswith(("Idefics", "SmolVLM")):
            feats_in = ip([[im] for im in pil], return_tensors="pt")
        else:
            feats_in = ip(pil, return_tensors="pt")
        kwargs = {k: v for k, v in to_device(feats_in, model).items() if k in params}
        out = get_features(**kwargs)
        feats = getattr(out, "pooler_output", out)
        if torch.is_tensor(feats):
            feats = feats.reshape(len(pil), -1, feats.shape[-1]) if feats.dim() >= 2 else feats
            pooled = feats.float().mean(1) if feats.dim() == 3 else feats.float()
        else:  # list / tuple: one tensor of tokens per image
            pooled = torch.stack([f.float().reshape(-1, f.shape[-1]).mean(0) for f in feats])
        chunks.append(pooled.cpu())
    emb = torch.cat(chunks).numpy().astype(np.float32) if chunks else np.zeros((0, 0), np.float32)
    if normalize and emb.size:
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)
    return emb
