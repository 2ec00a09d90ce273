"""The tiny VLM: a genuine ``LlavaForConditionalGeneration`` built from scratch for the tiny world.

Architecture (about 1.5 M parameters): a CLIP vision tower (64×64 input, patch 16 → 16 patches +
CLS, hidden 128, 3 layers), a two-layer GELU projector, and a Llama language model (hidden 128,
3 layers, 4 heads) over a word-level vocabulary built with ``tokenizers``. The processor is a real
``LlavaProcessor`` with the LLaVA-1.5 chat template (:data:`realign_lib.models.vlm.LLAVA_CHAT_TEMPLATE`),
so after ``save_pretrained`` the folder loads with ``AutoProcessor`` / ``AutoModelForImageTextToText``
exactly like a hub checkpoint. Its training: :mod:`realign_lib.tinyworld.training`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from realign_lib.models.vlm import LLAVA_CHAT_TEMPLATE
from realign_lib.tinyworld.settings import TinyVLMConfig

__all__ = ["SPECIALS", "build_tokenizer", "build_processor", "build_model", "images_to_pixels"]

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "[MASK]"]


# ------------------------------------------------------------------------------------- building
def build_tokenizer(words: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast``: lower-cases, splits words and punctuation."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chat_words = ["user", "assistant", ":"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in list(words) + chat_words:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # special tokens ([MASK], <image>, </s>) are matched before normalisation and pre-tokenisation
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>", "[MASK]"], model_max_length=1024, padding_side="left",
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, cfg: TinyVLMConfig):
    """A real ``LlavaProcessor`` (CLIP image processor, PIL backend) around ``tokenizer``."""
    from transformers import LlavaProcessor
    try:
        from transformers import CLIPImageProcessorPil as ImageProc  # transformers 5, no torchvision
    except ImportError:  # pragma: no cover - older releases
        from transformers import CLIPImageProcessor as ImageProc
    ip = ImageProc(size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE)


def build_model(tokenizer, cfg: TinyVLMConfig):
    """A randomly initialised ``LlavaForConditionalGeneration`` of the tiny size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 4,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True)
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_img, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    gc.do_sample, gc.max_new_tokens = False, 64
    return model


def images_to_pixels(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` float in [-1, 1], as the processor normalises.

    Equal to ``processor.image_processor(images)`` for images already at the model size (tested);
    used to pre-process a whole training set in one vectorised step.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5
