"""One interface to any Hugging Face image-text-to-text model: the tiny VLM and a 7B alike.

* :func:`load_vlm` — model + processor by hub id or local path (dtype, device, safetensors only,
  ``trust_remote_code`` off unless asked);
* :func:`chat_prompt` — a user turn with one image, rendered by the processor's chat template;
* :func:`generate` — batched greedy decoding for (image, question) lists;
* scoring a given response (summed log-probability over its tokens): :mod:`realign_lib.models.scoring`;
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
    "load_vlm", "fill_processor_fields", "check_local_checkpoint", "to_pil", "chat_prompt", "generate",
    "VICUNA_V1_SYSTEM", "image_embeddings", "tokenizer_of", "model_inputs", "to_device", "LLAVA_CHAT_TEMPLATE",
]

ImageLike = Any  # PIL image, path, or HxWx3 uint8 array

# LLaVA-1.5 chat template in the llava-hf style: "USER: <image>\n{text} ASSISTANT:" — an optional system
# text first, each user turn "USER: ", its image placeholder (where the user put the image) followed by a
# newline, its text and a space; each assistant turn "ASSISTANT: {reply}</s> "; the generation prompt
# "ASSISTANT:". The tiny VLM (realign_lib.tinyworld.training) and the tiny random LLaVA (tests.support.tiny_models) use it.
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


def tokenizer_of(processor):
    """The tokenizer inside a processor (a bare tokenizer is returned as it is)."""
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
    tok = tokenizer_of(processor)
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
    tok = tokenizer_of(processor)
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
