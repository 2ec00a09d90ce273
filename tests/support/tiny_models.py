"""Test support: tiny, randomly initialised models of real VLM architectures, built fully offline.

For tests and benchmarks only (nothing in the pipeline imports it).

Each builder returns ``(model, processor)``: a genuine ``transformers`` model class of the named
architecture (hidden size 32, one or two layers, 32-pixel images, seeded weights) and the
architecture's real processor around a small word-level tokenizer made with ``tokenizers``. The
tokenizers carry the architecture's special tokens and a chat template in the model's own style,
so :mod:`realign_lib.models.vlm` drives them exactly as it drives a hub checkpoint. Nothing is
downloaded; nothing is trained. They exist to test code paths (padding, masking, image-token
handling, save/load), not to answer questions.

* :func:`tiny_llava` — LLaVA-1.5: ``LlavaForConditionalGeneration`` (CLIP tower) + ``LlavaProcessor``
  with :data:`realign_lib.models.vlm.LLAVA_CHAT_TEMPLATE`, the tiny VLM's template too;
* :func:`tiny_llava_next` — LLaVA-1.6: ``LlavaNextForConditionalGeneration`` (any-resolution tiles);
* :func:`tiny_qwen2_vl` — Qwen2-VL: ``Qwen2VLForConditionalGeneration`` (dynamic resolution, M-RoPE);
  without torchvision its processor is :class:`Qwen2VLImageOnlyProcessor` (see there);
* :func:`tiny_idefics3` — Idefics3 / SmolVLM: ``Idefics3ForConditionalGeneration`` (no image splitting);
* :func:`tiny_janus` — Janus: ``JanusForConditionalGeneration`` (SigLIP-style tower + VQ image head).

``TINY_BUILDERS`` maps short names to the builders; :func:`save_tiny` writes one with
``save_pretrained`` (safetensors) so that ``AutoProcessor`` / ``AutoModelForImageTextToText``
— and hence :func:`realign_lib.models.vlm.load_vlm` — load it back from the folder.

Importing this module imports no ``transformers`` class; each builder imports what it needs
(``testing.Qwen2VLImageOnlyProcessor`` is created on first access).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

__all__ = [
    "TINY_VOCAB", "TINY_SEED", "tiny_llava", "tiny_llava_next", "tiny_qwen2_vl", "tiny_idefics3", "tiny_janus",
    "register_qwen2_vl_image_only_processor", "TINY_BUILDERS", "TINY_CLASSES", "unavailable_reason", "build_tiny",
    "save_tiny", "arch_of", "write_preferences",
]

TINY_SEED = 0

# Words the tests and chat templates use; anything else maps to the unknown token.
TINY_VOCAB: tuple[str, ...] = tuple(
    "a an the is are was of in on at to and or with what which who where how many much there this that it "
    "image picture photo describe detail briefly colour color shape size left right top bottom middle "
    "red blue green yellow black white cat dog car tree house person ball cup table sky "
    "cats dogs cars trees houses people balls cups tables "
    "one two three four five yes no not some small large big you helpful assistant user system "
    "chat between curious human artificial intelligence answers questions question answer please "
    "do does can see shown show".split()
) + tuple("0123456789") + (".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "[", "]", "/", "<", ">", "|")


# ----------------------------------------------------------------------------------- shared parts
def _tokenizer(specials: Sequence[str], chat_template: str, *, unk: str, pad: str, eos: str,
               bos: str | None = None, extra: dict[str, str] | None = None, padding_side: str = "left"):
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over :data:`TINY_VOCAB` + ``specials``.

    ``specials`` are added as special tokens (matched before splitting, never lower-cased);
    ``extra`` names some of them as attributes (e.g. ``{"image_token": "<image_placeholder>"}``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in list(specials) + list(TINY_VOCAB):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    # registered on the backend itself so every special token is matched whole, named or not
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    named = {"unk_token": unk, "pad_token": pad, "eos_token": eos}
    if bos is not None:
        named["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, padding_side=padding_side,
                                   **named, **({"extra_special_tokens": dict(extra)} if extra else {}))
    fast.chat_template = chat_template
    return fast


def _llama(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def _finish(model, tokenizer):
    """Greedy, short generation defaults with the tokenizer's special ids; eval mode."""
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample, gc.max_new_tokens = False, 16
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    model.eval()
    return model


def _init(model_cls, config, seed: int):
    """``model_cls(config)`` with weights drawn from ``seed``, leaving the caller's RNG state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------- LLaVA-1.5
def tiny_llava(seed: int = TINY_SEED, image_size: int = 32, patch_size: int = 8, hidden: int = 32):
    """LLaVA-1.5: CLIP vision tower (CLS + 16 patches), GELU projector, Llama LM; ``LlavaProcessor``."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from realign_lib.models.vlm import LLAVA_CHAT_TEMPLATE

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], LLAVA_CHAT_TEMPLATE,
                     unk="<unk>", pad="<pad>", bos="<s>", eos="</s>", extra={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size},
                               image_mean=_MEAN, image_std=_STD, do_convert_rgb=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    config = LlavaConfig(vision_config=vision, text_config=_llama(tok, hidden),
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    return _finish(_init(LlavaForConditionalGeneration, config, seed), tok), proc


# ---------------------------------------------------------------------------------- LLaVA-1.6
LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral style: "[INST] <image>\n{text} [/INST]"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)


def tiny_llava_next(seed: int = TINY_SEED, image_size: int = 32, patch_size: int = 8, hidden: int = 32):
    """LLaVA-1.6 ("NeXT"): any-resolution tiling over 32-px tiles (pinpoints up to 64 px) with
    ``image_newline``; ``LlavaNextProcessor``."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"], LLAVA_NEXT_TEMPLATE,
                     unk="<unk>", pad="<pad>", bos="<s>", eos="</s>", extra={"image_token": "<image>"})
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                    image_grid_pinpoints=pinpoints, image_mean=_MEAN, image_std=_STD,
                                    do_convert_rgb=True)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_NEXT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                              num_attention_heads=2, image_size=s, patch_size=patch_size, projection_dim=hidden)
    config = LlavaNextConfig(vision_config=vision, text_config=_llama(tok, hidden),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, image_seq_length=(s // patch_size) ** 2,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             projector_hidden_act="gelu")
    return _finish(_init(LlavaNextForConditionalGeneration, config, seed), tok), proc


# ------------------------------------------------------------------------------------ Qwen2-VL
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-*-Instruct style (ChatML)
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _qwen2_vl_image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` for images only: an image processor and a tokenizer, no video processor.

        In transformers 5 the stock ``Qwen2VLProcessor`` cannot be built, saved or loaded without
        torchvision, even for images only: its ``video_processor`` slot is validated against
        ``VideoProcessorMixin``, which needs torchvision (huggingface/transformers#48558). This
        subclass changes only which sub-processors it has: ``ProcessorMixin`` derives them
        (``get_attributes()``) from the ``__init__`` signature, and this one names just
        ``image_processor`` and ``tokenizer`` — so construction checks, ``save_pretrained`` and
        ``from_pretrained`` handle those two and never touch the video slot. Everything else is
        the stock class's: its ``__init__`` (image/video token set-up), the image-token expansion
        (``replace_image_token``: ``grid_t·grid_h·grid_w / merge_size²`` pads per image),
        ``mm_token_type_ids`` and the chat template handling; the image processor is the real
        Qwen2-VL one (PIL backend without torchvision). Passing ``videos`` raises ``ValueError``.

        Loading a saved one: ``Qwen2VLImageOnlyProcessor.from_pretrained(folder)``, or
        ``AutoProcessor`` once :func:`register_qwen2_vl_image_only_processor` has run (the
        builder does that when torchvision is missing).
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # The stock __init__ forwards (image_processor, tokenizer, None) positionally;
            # ProcessorMixin binds positional arguments to get_attributes() == [image_processor,
            # tokenizer], so the empty video slot is neither bound nor class-checked.
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
            if videos is not None:
                raise ValueError(f"{type(self).__name__} has no video processor and cannot process videos; "
                                 f"install torchvision and use Qwen2VLProcessor for video input")
            super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    Qwen2VLImageOnlyProcessor.__module__ = __name__
    Qwen2VLImageOnlyProcessor.__qualname__ = "Qwen2VLImageOnlyProcessor"
    return Qwen2VLImageOnlyProcessor


def __getattr__(name: str):
    if name == "Qwen2VLImageOnlyProcessor":  # created lazily: importing this module imports no transformers class
        return _qwen2_vl_image_only_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_qwen2_vl_image_only_processor() -> None:
    """Let ``AutoProcessor`` (hence :func:`realign_lib.models.vlm.load_vlm`) load folders saved with
    :class:`Qwen2VLImageOnlyProcessor` in this process.

    ``AutoProcessor`` finds a processor class recorded in ``processor_config.json`` by name among
    the registered ones (``AutoProcessor.register``); registration needs a config class, so this
    also makes the image-only processor the fallback for Qwen2-VL folders that record no processor
    class at all. Only call it without torchvision, where the stock ``Qwen2VLProcessor`` cannot be
    built anyway; folders that record ``Qwen2VLProcessor`` (hub checkpoints) still get the stock class.
    """
    from transformers import AutoProcessor, Qwen2VLConfig

    AutoProcessor.register(Qwen2VLConfig, _qwen2_vl_image_only_processor_class(), exist_ok=True)


def tiny_qwen2_vl(seed: int = TINY_SEED, hidden: int = 32, patch_size: int = 8, image_size: int = 32):
    """Qwen2-VL: ViT over 8-px patches with 2×2 merging (a 32-px image → 4 tokens), M-RoPE LM;
    ``Qwen2VLProcessor`` with min/max pixels (``image_size``/2)² and 2·``image_size``², so images
    keep their own aspect ratio and token count (dynamic resolution) but stay tiny.

    Without torchvision the processor is :class:`Qwen2VLImageOnlyProcessor` (the stock class minus
    its video slot), registered with ``AutoProcessor`` so :func:`save_tiny` folders load back."""
    reason = unavailable_reason("qwen2_vl")
    if reason:
        raise ImportError(reason)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        processor_cls = Qwen2VLProcessor
    else:
        processor_cls = _qwen2_vl_image_only_processor_class()
        register_qwen2_vl_image_only_processor()

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, QWEN2_VL_TEMPLATE, unk="<|endoftext|>", pad="<|endoftext|>", eos="<|im_end|>",
                     extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ip = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": (image_size // 2) ** 2, "longest_edge": 2 * image_size ** 2},
                                  image_mean=_MEAN, image_std=_STD, do_convert_rgb=True)
    proc = processor_cls(image_processor=ip, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    heads = 2
    half = hidden // heads // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=hidden, hidden_size=hidden, num_heads=heads, mlp_ratio=2,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return _finish(_init(Qwen2VLForConditionalGeneration, config, seed), tok), proc


# ---------------------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS3_TEMPLATE = (  # HuggingFaceTB/SmolVLM-Instruct style
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_idefics3(seed: int = TINY_SEED, hidden: int = 32, image_size: int = 32, patch_size: int = 8):
    """Idefics3 / SmolVLM: SigLIP-style tower, pixel-shuffle connector (scale 2: a 32-px image →
    4 tokens), Llama LM; ``Idefics3Processor`` with image splitting off."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    specials = ["<unk>", "<|im_start|>", "<|endoftext|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>"]
    tok = _tokenizer(specials, IDEFICS3_TEMPLATE, unk="<unk>", pad="<|endoftext|>", bos="<|im_start|>",
                     eos="<end_of_utterance>", extra={"image_token": "<image>"})
    scale = 2
    seq = (image_size // patch_size) ** 2 // scale ** 2
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                   max_image_size={"longest_edge": image_size}, image_mean=_MEAN, image_std=_STD,
                                   do_convert_rgb=True)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=IDEFICS3_TEMPLATE)
    vision = Idefics3VisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    config = Idefics3Config(vision_config=vision, text_config=_llama(tok, hidden), scale_factor=scale,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    return _finish(_init(Idefics3ForConditionalGeneration, config, seed), tok), proc


# --------------------------------------------------------------------------------------- Janus
JANUS_TEMPLATE = (  # deepseek-community/Janus-Pro style: "<|User|>: <image_placeholder>\n{text}\n\n<|Assistant|>:"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: "
    "{% elif message['role'] == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'] | capitalize }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image_placeholder>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<｜end▁of▁sentence｜>{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def tiny_janus(seed: int = TINY_SEED, hidden: int = 32, image_size: int = 32, patch_size: int = 8):
    """Janus (Pro): SigLIP-style understanding tower + MLP aligner (a 32-px image → 16 tokens),
    Llama LM, and a tiny VQ-VAE generation head; ``JanusProcessor``."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
    )

    bos, eos, pad = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    specials = ["<unk>", bos, eos, pad, "<|User|>", "<|Assistant|>", "<image_placeholder>", "<begin_of_image>",
                "<end_of_image>"]
    tok = _tokenizer(specials, JANUS_TEMPLATE, unk="<unk>", pad=pad, bos=bos, eos=eos,
                     extra={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                            "eoi_token": "<end_of_image>"})
    n_img = (image_size // patch_size) ** 2
    ip = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=_MEAN, image_std=_STD,
                                do_convert_rgb=True)
    proc = JanusProcessor(image_processor=ip, tokenizer=tok, chat_template=JANUS_TEMPLATE, num_image_tokens=n_img,
                          use_default_system_prompt=False)
    vision = JanusVisionConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                               patch_size=patch_size, mlp_ratio=2.0, projection_dim=hidden, depth=2,
                               num_image_tokens=n_img)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden, num_patches=image_size // patch_size)
    config = JanusConfig(vision_config=vision, text_config=_llama(tok, hidden), vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    return _finish(_init(JanusForConditionalGeneration, config, seed), tok), proc


# ------------------------------------------------------------------------------------ registry
# transformers classes each builder needs (for a clear "not in this transformers" message)
TINY_CLASSES: dict[str, tuple[str, ...]] = {
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessorPil"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor", "LlavaNextImageProcessorPil"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessorPil"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor", "Idefics3ImageProcessorPil"),
    "janus": ("JanusForConditionalGeneration", "JanusProcessor", "JanusImageProcessorPil"),
}


def unavailable_reason(name: str) -> str | None:
    """Why the tiny ``name`` model cannot be built in this environment, or ``None`` if it can.

    Reason: a class missing from the installed ``transformers``. (Qwen2-VL no longer needs
    torchvision: without it :func:`tiny_qwen2_vl` uses :class:`Qwen2VLImageOnlyProcessor`.)
    """
    import transformers

    if name not in TINY_CLASSES:
        return f"unknown tiny architecture {name!r}; choose one of {sorted(TINY_CLASSES)}"
    missing = []
    for cls in TINY_CLASSES[name]:
        try:
            getattr(transformers, cls)
        except (AttributeError, ImportError):
            missing.append(cls)
    if missing:
        return f"transformers {transformers.__version__} has no {', '.join(missing)}"
    return None


TINY_BUILDERS: dict[str, Callable] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "idefics3": tiny_idefics3,
    "janus": tiny_janus,
}


def build_tiny(name: str, **kwargs):
    """``(model, processor)`` from :data:`TINY_BUILDERS` by name (clear error for an unknown one)."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"unknown tiny architecture {name!r}; choose one of {sorted(TINY_BUILDERS)}")
    reason = unavailable_reason(name)
    if reason:
        raise ImportError(reason)
    return TINY_BUILDERS[name](**kwargs)


def save_tiny(name: str, path: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny ``name`` model and ``save_pretrained`` model + processor (safetensors) to ``path``.

    The folder then loads with ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained``
    (and :func:`realign_lib.models.vlm.load_vlm`). Returns the folder.
    """
    model, processor = build_tiny(name, **kwargs)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


# hub-id patterns of the backbones the kit ships configs for → the tiny architecture of the same class
_ARCH_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llava-v1\.6|llava-next|llava_next", "llava_next"),
    (r"llava-1\.5|llava-v1\.5|llava", "llava"),
    (r"janus", "janus"),
    (r"smolvlm|idefics3", "idefics3"),
    (r"qwen2-vl|qwen2_vl", "qwen2_vl"),
)


def arch_of(model_id: str) -> str:
    """The tiny architecture name (:data:`TINY_BUILDERS`) of the same model class as ``model_id``.

    ``"llava-hf/llava-1.5-7b-hf"`` → ``"llava"``, ``"llava-hf/llava-v1.6-mistral-7b-hf"`` →
    ``"llava_next"``, ``"deepseek-community/Janus-Pro-7B"`` → ``"janus"``,
    ``"HuggingFaceTB/SmolVLM-256M-Instruct"`` → ``"idefics3"``. Used by the tests that keep each
    backbone config runnable; ``ValueError`` for an id it does not know.
    """
    import re

    for pattern, name in _ARCH_PATTERNS:
        if re.search(pattern, model_id.lower()):
            return name
    raise ValueError(f"no tiny architecture known for {model_id!r}; known patterns: "
                     f"{', '.join(p for p, _ in _ARCH_PATTERNS)}")


def write_preferences(folder: str | os.PathLike, n: int, seed: int = 0, size: int = 32, prefix: str = "") -> Path:
    """``n`` preference records with random ``size``-pixel PNGs (image ``v<i>``, retrieved ``r<i>``)
    as ``folder/preferences.jsonl``, image paths relative to ``folder`` (under ``prefix``)."""
    import json

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    (folder / prefix).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        for name in (f"v{i}.png", f"r{i}.png"):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / prefix / name)
        recs.append({"id": f"s{i}", "prompt": "describe the picture", "images": [f"{prefix}v{i}.png"],
                     "retrieved_image": f"{prefix}r{i}.png", "chosen": "a red cat on the left .",
                     "rejected": "a blue dog on the right ."})
    path = folder / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path
