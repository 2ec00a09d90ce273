"""The tiny world's two settings classes, plain dataclasses (no numpy, no torch): the config layer
(:mod:`realign_lib.run.stages`) takes stage 00's defaults from here, so every default is written once.

* :class:`WorldConfig` — sizes and seed of a world (:func:`realign_lib.tinyworld.world.build_world`);
* :class:`TinyVLMConfig` — size and training schedule of the tiny VLM
  (:func:`realign_lib.tinyworld.training.train_tiny_vlm`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WorldConfig", "TinyVLMConfig"]


@dataclass
class WorldConfig:
    """Sizes and seed of a tiny world."""

    seed: int = 0                 # world seed; train, test and MME scenes use disjoint sub-seeds
    n_train: int = 15000          # training images (LLaVA-Instruct layout)
    n_test: int = 1000            # held-out images for POPE
    n_mme: int = 30               # images per MME subtask (MME itself has 30-60)
    questions_per_image: int = 2  # yes/no turns per training conversation
    short_answers_per_image: int = 0  # short-answer turns ("where is the boat?") per training conversation
    existence_per_image: int = 4  # extra "Is there a X in the image?" turns per conversation (half yes, half no)
    partner_negatives: float = 0.0  # share of those "no" turns asking for a present object's absent partner
    n_val: int = 500              # validation images (POPE, CHAIR) for choosing a recipe; disjoint from test

    def __post_init__(self):
        if not isinstance(self.short_answers_per_image, int) or not 0 <= self.short_answers_per_image <= 4:
            raise ValueError(f"WorldConfig.short_answers_per_image must be 0-4, got {self.short_answers_per_image!r}")
        if not isinstance(self.existence_per_image, int) or not 0 <= self.existence_per_image <= 8:
            raise ValueError(f"WorldConfig.existence_per_image must be 0-8, got {self.existence_per_image!r}")
        if not 0.0 <= float(self.partner_negatives) <= 1.0:
            raise ValueError(f"WorldConfig.partner_negatives must be in [0, 1], got {self.partner_negatives!r}")
        for name in ("n_train", "n_test", "n_mme", "n_val"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WorldConfig.{name} must be a positive integer, got {v!r}")


@dataclass
class TinyVLMConfig:
    """Size and training schedule of the tiny VLM (defaults: ~6 min on 2 CPU cores)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    max_positions: int = 256
    tower_steps: int = 900        # phase 1 steps (vision tower pre-training)
    tower_batch: int = 128
    tower_lr: float = 2e-3
    sft_steps: int = 1000         # phase 2 steps (instruction tuning, one exchange per row)
    sft_batch: int = 48
    sft_lr: float = 5e-4
    sft_restarts: int = 2         # warm restarts of instruction tuning allowed while the model misses its target
    sft_restart_steps: int = 500  # steps of each (a fresh cosine cycle peaking at sft_lr)
    max_length: int = 96          # tokens per training exchange (incl. 16 image tokens)
    seed: int = 0
    cpu_threads: int = 0          # torch threads on a CPU; 0 keeps torch's default
