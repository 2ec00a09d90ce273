"""Stage 04's settings: :class:`PreferenceConfig` — the loss (``dpo`` / ``rdpo`` / ``mdpo`` /
``rdpo_released``) and the paper's hyper-parameters, turned into ``transformers.TrainingArguments``
and a ``peft.LoraConfig`` — and which layers LoRA adapts (:func:`lora_target_names`).

The rest of stage 04: batches (:mod:`realign_lib.training.batches`), the objective
(:mod:`realign_lib.training.objective`, losses in :mod:`realign_lib.training.losses`), the frozen
reference's cached log-probs (:mod:`realign_lib.training.reference`) and the trainer with its entry
point :func:`realign_lib.training.trainer.train`. Importing this module imports neither torch nor
transformers nor peft: the config layer reads it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["LOSSES", "PreferenceConfig", "records_to_train", "lora_target_names", "PROJECTOR_NAMES",
           "is_projector_param"]

LOSSES = ("dpo", "rdpo", "mdpo", "rdpo_released")


# ----------------------------------------------------------------------------------------- config
@dataclass
class PreferenceConfig:
    """Preference-training settings; defaults are the paper's (Re-Align §4.1, Table 6)."""

    loss: str = field(default="rdpo", metadata={"help": "one of dpo, rdpo (paper), mdpo, rdpo_released "
                                                        "(the authors' released 'noisy' variant, for comparison)"})
    beta: float = field(default=0.1, metadata={"help": "β of the sigmoid preference losses"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "training epochs (when max_steps is -1)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})
    projector_learning_rate: float = field(default=2e-5, metadata={
        "help": "learning rate of the multi-modal projector, used only when the projector is trained"})
    train_projector: bool = field(default=False, metadata={
        "help": "also train the multi-modal projector (fully, at projector_learning_rate)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(default=0.03, metadata={
        "help": "linear warm-up: a number below 1 is a fraction of the steps (paper 0.03), else steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "preference pairs per device and step"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "micro-batches per optimiser step"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; None: on if a bf16-capable GPU is present, else fp32"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "weight of an added NLL term on the chosen response (per-token mean); 0: off"})
    use_lora: bool = field(default=True, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (paper 2 × lora_r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="language_model", metadata={
        "help": "language_model: every linear layer of the language model (paper); all_linear: every linear "
                "layer but the output head (vision tower and projector too); or comma-separated layer names "
                "inside the language model, e.g. q_proj,k_proj,v_proj,o_proj (the authors' released scripts)"})
    activation_checkpointing: bool | None = field(default=None, metadata={
        "help": "gradient (activation) checkpointing, non-reentrant: recompute each layer's activations in the "
                "backward pass (less memory, about a third more compute); None: on when training on a CUDA GPU, off "
                "on a CPU (the TrainingArguments name; gradient_checkpointing is its deprecated alias)"})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "data-loader worker processes that build the scoring batches (image preprocessing, e.g. LLaVA-1.6 "
                "anyres tiles); None: 4 on a CUDA GPU, 0 (the training thread) on a CPU"})
    model_max_length: int = field(default=0, metadata={
        "help": "cut each scored sequence (image tokens included) to this many tokens, as the authors' scripts do "
                "(1048); 0: no limit"})
    precompute_ref: bool = field(default=True, metadata={
        "help": "compute the reference log-probs once before training (cached); False: on the fly"})
    reference_batch_size: int = field(default=0, metadata={
        "help": "pairs per forward pass of the cached reference pass (no gradients: more fit than in training); "
                "0: per_device_train_batch_size"})
    seed: int = field(default=0, metadata={"help": "seed of training (data order, LoRA init) and of mDPO's crops"})
    max_steps: int = field(default=-1, metadata={
        "help": "optimiser steps; -1: num_train_epochs over all pairs (the paper: one epoch)"})
    logging_steps: int = field(default=1, metadata={"help": "log every this many optimiser steps"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every this many optimiser steps"})
    crop_min_area: float = field(default=0.01, metadata={"help": "mDPO: least fraction of the image kept"})
    crop_max_area: float = field(default=0.2, metadata={"help": "mDPO: largest fraction of the image kept"})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"PreferenceConfig.{name}={getattr(self, name)!r}: {why}")

        kinds = {"float": ((int, float), "a number"), "int": (int, "an integer"), "bool": (bool, "true or false"),
                 "str": (str, "text"), "bool | None": ((bool, type(None)), "true, false or null"),
                 "int | None": ((int, type(None)), "an integer or null")}
        for f in fields(self):  # wrong types get a clear message, not a TypeError from a comparison below
            want = kinds.get(str(f.type))
            v = getattr(self, f.name)
            if want and (not isinstance(v, want[0]) or (isinstance(v, bool) and "bool" not in str(f.type))):
                raise TypeError(f"PreferenceConfig.{f.name}={v!r}: must be {want[1]}")

        if self.loss not in LOSSES:
            bad("loss", f"must be one of {', '.join(LOSSES)}")
        for name in ("beta", "learning_rate", "projector_learning_rate", "num_train_epochs"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, "must be a positive number")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "logging_steps",
                     "save_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            bad("lora_alpha", "must be positive")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            bad("warmup_steps", "must be a fraction in [0, 1) or a whole number of steps")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.sft_weight < 0 or not math.isfinite(self.sft_weight):
            bad("sft_weight", "must be >= 0")
        if self.max_steps != -1 and self.max_steps < 1:
            bad("max_steps", "must be a positive integer, or -1 for num_train_epochs")
        if not self.lora_target_modules.strip():
            bad("lora_target_modules", "must be language_model, all_linear or layer names")
        if not 0 < self.crop_min_area <= self.crop_max_area <= 1:
            bad("crop_min_area", f"need 0 < crop_min_area <= crop_max_area ({self.crop_max_area}) <= 1")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            bad("bf16", "must be True, False or None")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            bad("dataloader_num_workers", "must be >= 0, or None for the device's default")
        if self.reference_batch_size < 0:
            bad("reference_batch_size", "must be >= 0 (0: per_device_train_batch_size)")
        if self.model_max_length < 0:
            bad("model_max_length", "must be >= 0 (0: no limit)")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "PreferenceConfig":
        """Settings by field name; an unknown name raises, listing the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**settings)

    @property
    def third_kind(self) -> str | None:
        """Name of the third row kind: ``retrieved`` (rDPO), ``cropped`` (mDPO) or None (DPO)."""
        return {"dpo": None, "mdpo": "cropped"}.get(self.loss, "retrieved")

    def use_bf16(self) -> bool:
        import torch

        if self.bf16 is not None:
            return self.bf16
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    def use_activation_checkpointing(self) -> bool:
        import torch

        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        return torch.cuda.is_available()

    def num_workers(self) -> int:
        import torch

        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return min(4, os.cpu_count() or 1) if torch.cuda.is_available() else 0

    def check_overrides(self, overrides: dict) -> None:
        """Refuse ``TrainingArguments`` overrides that name a field of this class (one name per setting)."""
        clash = sorted(set(overrides) & {f.name for f in fields(self)})
        if clash:
            raise ValueError(f"{', '.join(clash)}: a PreferenceConfig setting, set it as one (realign train --set "
                             f"{clash[0]}=..., a notebook parameter or a config key), not as a TrainingArguments "
                             f"override (--targs)")

    def training_arguments(self, output_dir: str | os.PathLike, **overrides):
        """``transformers.TrainingArguments`` with these settings (``remove_unused_columns=False``).

        ``overrides`` sets further ``TrainingArguments`` (``realign train --targs``); one that names a
        field of this class is an error: that setting has one name, the field's, and one value."""
        import torch
        from transformers import TrainingArguments

        self.check_overrides(overrides)

        kw: dict[str, Any] = dict(
            output_dir=str(output_dir), num_train_epochs=self.num_train_epochs, learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            # transformers 5 has no warmup_ratio: a float in [0, 1) as warmup_steps is the ratio
            warmup_steps=float(self.warmup_steps) if self.warmup_steps < 1 else int(self.warmup_steps),
            weight_decay=self.weight_decay, per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, bf16=self.use_bf16(),
            seed=self.seed, logging_steps=self.logging_steps, save_steps=self.save_steps, max_steps=self.max_steps,
            remove_unused_columns=False, report_to="none", optim="adamw_torch", use_cpu=not torch.cuda.is_available(),
            activation_checkpointing=self.use_activation_checkpointing(),
            activation_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=self.num_workers())
        kw.update(overrides)
        kw["remove_unused_columns"] = False  # the collator needs the raw records
        return TrainingArguments(**kw)

    def lora_config(self, model):
        """``peft.LoraConfig`` on the linear layers :attr:`lora_target_modules` names (see
        :func:`lora_target_names`)."""
        from peft import LoraConfig

        extra = {}
        if self.train_projector:  # trained fully and saved with the adapter (so checkpoints resume it)
            projector = [n for n, _ in model.named_modules() if n.split(".")[-1] in PROJECTOR_NAMES]
            if not projector:
                raise ValueError(f"PreferenceConfig.train_projector=True but {type(model).__name__} has no module "
                                 f"named one of {PROJECTOR_NAMES}")
            extra["modules_to_save"] = projector
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=lora_target_names(model, self.lora_target_modules), bias="none", **extra)


def records_to_train(n_records: int, max_records: int, cfg: PreferenceConfig, processes: int = 1) -> int:
    """How many of ``n_records`` pairs a run trains on — one rule for notebook 04, ``realign train`` and
    :func:`realign_lib.training.trainer.train`: ``max_records`` when it is set (> 0); else, with
    ``cfg.max_steps`` set, as many as those steps see (``max_steps`` × the global batch, ``processes`` ×
    ``per_device_train_batch_size`` × ``gradient_accumulation_steps``); else all. Never more than there are."""
    if max_records < 0:
        raise ValueError(f"max_records={max_records}: must be >= 0 (0: max_steps × global batch, at most all)")
    if max_records:
        return min(max_records, n_records)
    if cfg.max_steps > 0:
        global_batch = processes * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        return min(cfg.max_steps * global_batch, n_records)
    return n_records


# LLaVA / LLaVA-NeXT | Janus (understanding aligner; its generation_aligner is not) | Idefics3, SmolVLM | Qwen2-VL
PROJECTOR_NAMES = ("multi_modal_projector", "aligner", "connector", "merger")


def is_projector_param(name: str) -> bool:
    """Whether a parameter (or module) name lies inside the multi-modal projector."""
    return any(part in PROJECTOR_NAMES for part in name.split("."))


_LANGUAGE_MODEL_NAMES = ("language_model", "text_model")  # LLaVA, Qwen2-VL, Janus | Idefics3, SmolVLM


def lora_target_names(model, targets: str = "language_model") -> list[str]:
    """Full names of the ``nn.Linear`` modules that get LoRA adapters (``lm_head`` never).

    ``targets``: ``"language_model"`` — every linear layer inside the language model, the
    sub-module named ``language_model`` (LLaVA, Qwen2-VL, Janus in transformers 5) or ``text_model``
    (Idefics3, SmolVLM); a text-only model has none, and then every linear layer but the head
    counts. ``"all_linear"`` — every linear layer but the head (vision tower and projector too).
    Otherwise comma-separated layer names (``"q_proj,k_proj,v_proj,o_proj"``) matched against the
    last part of each name inside the language model.
    """
    import torch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    not_head = [n for n in linear if n.split(".")[-1] not in ("lm_head", "output")]
    inside = [n for n in linear if set(n.split(".")) & set(_LANGUAGE_MODEL_NAMES)] or not_head
    if targets == "all_linear":
        names = not_head
    elif targets == "language_model":
        names = inside
    else:
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        names = [n for n in inside if n.split(".")[-1] in wanted]
        missing = wanted - {n.split(".")[-1] for n in names}
        if missing:
            raise ValueError(f"lora_target_modules: no linear layer named {sorted(missing)} in the language model "
                             f"of {type(model).__name__} (it has {sorted({n.split('.')[-1] for n in inside})})")
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear layers found for LoRA")
    return names
