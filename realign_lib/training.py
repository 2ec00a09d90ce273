"""rDPO training on the Hugging Face stack (stage 4): settings, data, scoring, reference log-probs.

* :class:`PreferenceConfig` — the loss (``dpo`` / ``rdpo`` / ``mdpo`` / ``rdpo_released``) and the
  paper's hyper-parameters, turned into ``transformers.TrainingArguments`` and a ``peft.LoraConfig``;
* :class:`PreferenceDataset` — ``preferences.jsonl`` records (paths relative to a root folder);
* :class:`PreferenceCollator` — one scoring batch of ``3B`` rows per batch of ``B`` pairs
  (``(v, y_w)``, ``(v, y_l)``, then ``(v_l, y_w)`` for rDPO or ``(crop(v), y_w)`` for mDPO; ``2B``
  rows for DPO), built with :func:`realign_lib.vlm.build_scoring_batch`, so the policy scores every
  sequence in one forward pass;
* :func:`score_pairs` / :func:`compute_preference_loss` — summed response log-probs per row kind
  and the loss of :mod:`realign_lib.losses` with its metrics;

The frozen reference's log-probs (computed once, cached by content, split over processes) are in
:mod:`realign_lib.reference`; the trainer itself (:class:`realign_lib.trainer.PreferenceTrainer`, a ``transformers.Trainer``) and
the training entry point (:func:`realign_lib.trainer.train`) live in :mod:`realign_lib.trainer`.
Importing this module imports neither transformers nor peft.
"""
from __future__ import annotations

import math
import os
import random
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from . import losses, vlm
from .files import read_jsonl

__all__ = [
    "LOSSES", "PreferenceConfig", "PreferenceDataset", "PreferenceCollator", "random_crop",
    "lora_target_names", "score_pairs", "reference_keys",
    "compute_preference_loss", "PROJECTOR_NAMES", "is_projector_param",
]

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
        if self.bf16 is not None:
            return self.bf16
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    def use_activation_checkpointing(self) -> bool:
        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        return torch.cuda.is_available()

    def num_workers(self) -> int:
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return min(4, os.cpu_count() or 1) if torch.cuda.is_available() else 0

    def training_arguments(self, output_dir: str | os.PathLike, **overrides):
        """``transformers.TrainingArguments`` with these settings (``remove_unused_columns=False``)."""
        from transformers import TrainingArguments

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


# ------------------------------------------------------------------------------------------ data
class PreferenceDataset(torch.utils.data.Dataset):
    """``preferences.jsonl`` records ``{"id", "prompt", "images": [path], "retrieved_image", "chosen",
    "rejected", ...}``; image paths are relative to ``root`` (default: the file's folder).

    Each item is the record with absolute ``image`` / ``retrieved_image`` paths and, once
    :meth:`attach_reference` was called, the sample's reference log-probs under ``"ref"``.
    """

    def __init__(self, path_or_records: str | os.PathLike | Sequence[dict], root: str | os.PathLike | None = None,
                 need_retrieved: bool = True):
        if isinstance(path_or_records, (str, os.PathLike)):
            path = Path(path_or_records)
            records = read_jsonl(path)
            root = Path(root) if root is not None else path.parent
            where = str(path)
        else:
            records = [dict(r) for r in path_or_records]
            root = Path(root) if root is not None else Path(".")
            where = "records"
        self.root = root
        self.records: list[dict] = []
        seen = set()
        for i, r in enumerate(records):
            for key in ("id", "prompt", "chosen", "rejected"):
                if key not in r:
                    raise ValueError(f"{where}: record {i} lacks {key!r}")
            images = r.get("images") or ([r["image"]] if r.get("image") else [])
            if len(images) != 1:
                raise ValueError(f"{where}: record {i} (id {r['id']}) needs exactly one image in 'images'")
            if need_retrieved and not r.get("retrieved_image"):
                raise ValueError(f"{where}: record {i} (id {r['id']}) lacks 'retrieved_image'")
            sid = str(r["id"])
            if sid in seen:
                raise ValueError(f"{where}: duplicate id {sid!r}")
            seen.add(sid)
            item = dict(r, id=sid, image=str(root / images[0]))
            if r.get("retrieved_image"):
                item["retrieved_image"] = str(root / r["retrieved_image"])
            for key in ("image", "retrieved_image") if need_retrieved else ("image",):
                if key in item and not Path(item[key]).is_file():
                    raise FileNotFoundError(f"{where}: record {i} (id {sid}): image {item[key]} not found; image paths "
                                            f"are relative to {root} (pass root=, --root, or the run folder)")
            self.records.append(item)
        if not self.records:
            raise ValueError(f"{where}: no preference pairs (did stage 03 accept none? see its skipped.jsonl)")
        self.ref: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return dict(r, ref=self.ref[r["id"]]) if r["id"] in self.ref else dict(r)

    def attach_reference(self, ref: dict[str, dict]) -> None:
        """Attach reference log-probs (``id → {kind: float}``) so the collator batches them."""
        missing = [r["id"] for r in self.records if r["id"] not in ref]
        if missing:
            raise ValueError(f"reference log-probs missing for {len(missing)} samples, e.g. {missing[:3]}")
        self.ref = {r["id"]: ref[r["id"]] for r in self.records}


def random_crop(image, seed: int, min_area: float = 0.01, max_area: float = 0.2):
    """mDPO's corrupted image: a random crop keeping ``min_area``–``max_area`` of the area (seeded)."""
    im = vlm.to_pil(image)
    rng = random.Random(seed)
    w, h = im.size
    area = rng.uniform(min_area, max_area) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


class PreferenceCollator:
    """Batch of ``B`` records → one scoring batch of ``3B`` rows (``2B`` for DPO).

    Rows ``[0, B)``: (v, y_w); ``[B, 2B)``: (v, y_l); ``[2B, 3B)``: (v_l, y_w) for rDPO, or a seeded
    random crop of v with y_w for mDPO. The output holds the processor's tensors plus
    ``response_mask`` (see :func:`realign_lib.vlm.build_scoring_batch`), ``ids`` and, when every
    item carries reference log-probs, ``ref_<kind>`` ``(B,)`` tensors.
    """

    def __init__(self, processor, cfg: PreferenceConfig, chat: bool = True):
        self.processor, self.cfg, self.chat = processor, cfg, chat

    def crop_seed(self, sample_id: str) -> int:
        return zlib.crc32(f"{self.cfg.seed}:{sample_id}".encode())

    def rows(self, items: Sequence[dict]) -> tuple[list, list, list]:
        """The (image, prompt, response) lists of the scoring batch, in row order."""
        images = [it["image"] for it in items] * 2
        prompts = [it["prompt"] for it in items] * 2
        responses = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        kind = self.cfg.third_kind
        if kind == "retrieved":
            images += [it["retrieved_image"] for it in items]
        elif kind == "cropped":
            images += [random_crop(it["image"], self.crop_seed(it["id"]), self.cfg.crop_min_area,
                                   self.cfg.crop_max_area) for it in items]
        if kind is not None:
            prompts += [it["prompt"] for it in items]
            responses += [it["chosen"] for it in items]
        return images, prompts, responses

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = vlm.build_scoring_batch(self.processor, *self.rows(items), chat=self.chat,
                                        max_length=self.cfg.model_max_length)
        batch["ids"] = [it["id"] for it in items]
        if items and all("ref" in it for it in items):
            for key in items[0]["ref"]:
                batch[f"ref_{key}"] = torch.tensor([float(it["ref"][key]) for it in items], dtype=torch.float32)
        return batch


# ------------------------------------------------------------------------------------------- loss
_NOT_MODEL_INPUTS = ("response_mask", "ids")


def _model_inputs(model, batch: dict) -> dict:
    """The model's inputs of a scoring batch on its device, floats (pixels) in its dtype.

    Device and dtype come from the first floating parameter, so a DDP / accelerate-wrapped
    model (which has no ``.device``) works too.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    out = {}
    for k, v in batch.items():
        if k in _NOT_MODEL_INPUTS or k.startswith("ref_"):
            continue
        if torch.is_tensor(v) and param is not None:
            v = v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
        out[k] = v
    return out


def score_pairs(model, batch: dict, cfg: PreferenceConfig) -> dict[str, torch.Tensor]:
    """One forward pass over the scoring batch → ``(B,)`` summed response log-probs per row kind:
    ``chosen``, ``rejected`` and ``retrieved`` / ``cropped``; for ``rdpo_released`` also
    ``rejected_noisy`` and ``retrieved_noisy`` (:func:`realign_lib.losses.released_noisy_logprobs`
    from the same logits). Keeps the graph; wrap in ``torch.no_grad()`` for the reference.
    """
    inputs = _model_inputs(model, batch)
    logits = model(**inputs).logits
    mask = batch["response_mask"].to(logits.device)
    logps = vlm.sequence_logprobs(logits, inputs["input_ids"], mask)
    n = len(batch["ids"]) if "ids" in batch else logps.shape[0] // (2 if cfg.third_kind is None else 3)
    out = {"chosen": logps[:n], "rejected": logps[n:2 * n]}
    if cfg.third_kind is not None:
        out[cfg.third_kind] = logps[2 * n:3 * n]
    if cfg.loss == "rdpo_released":
        noisy = losses.released_noisy_logprobs(logits[n:3 * n], mask[n:3 * n])
        out["rejected_noisy"], out["retrieved_noisy"] = noisy[:n], noisy[n:]
    out["chosen_tokens"] = mask[:n, 1:].sum(-1).float()
    return out


def _loss_terms(policy: dict, ref: dict, cfg: PreferenceConfig) -> dict:
    c, r = policy["chosen"], ref["chosen"]
    if cfg.loss == "dpo":
        return losses.dpo(c, policy["rejected"], r, ref["rejected"], cfg.beta)
    if cfg.loss == "rdpo":
        return losses.rdpo(c, policy["rejected"], policy["retrieved"], r, ref["rejected"], ref["retrieved"], cfg.beta)
    if cfg.loss == "mdpo":
        return losses.mdpo(c, policy["rejected"], policy["cropped"], r, ref["rejected"], ref["cropped"], cfg.beta)
    return losses.rdpo_released(c, policy["rejected_noisy"], policy["retrieved_noisy"], r, ref["rejected_noisy"],
                                ref["retrieved_noisy"], cfg.beta)


def reference_keys(cfg: PreferenceConfig) -> tuple[str, ...]:
    """The reference log-probs a loss needs."""
    return {"dpo": ("chosen", "rejected"), "rdpo": ("chosen", "rejected", "retrieved"),
            "mdpo": ("chosen", "rejected", "cropped"),
            "rdpo_released": ("chosen", "rejected_noisy", "retrieved_noisy")}[cfg.loss]


def compute_preference_loss(model, batch: dict, ref_logps: dict | None, cfg: PreferenceConfig,
                            policy_logps: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, metrics)`` for one scoring batch from :class:`PreferenceCollator`.

    ``ref_logps``: ``{kind: (B,) tensor}`` with the keys of :func:`reference_keys`; None takes the
    ``ref_<kind>`` tensors of the batch. ``policy_logps``: already computed :func:`score_pairs`
    output (else one forward pass of ``model``). The loss is the batch mean of the
    :mod:`realign_lib.losses` function of ``cfg.loss`` plus ``cfg.sft_weight`` × the per-token NLL
    of the chosen response. Metrics (floats, batch means): ``loss`` and each term, rewards,
    the textual margin/accuracy (chosen vs rejected) and, for rDPO/mDPO, the visual ones
    (chosen under v vs under v_l / the crop), and the policy log-probs.
    """
    policy = policy_logps if policy_logps is not None else score_pairs(model, batch, cfg)
    device = policy["chosen"].device
    if ref_logps is None:
        ref_logps = {k[4:]: v for k, v in batch.items() if k.startswith("ref_")}
    missing = [k for k in reference_keys(cfg) if k not in ref_logps]
    if missing:
        raise KeyError(f"reference log-probs {missing} missing for loss {cfg.loss!r}")
    ref = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in ref_logps.items()}
    out = _loss_terms(policy, ref, cfg)
    loss = out["loss"].mean()
    metrics: dict[str, float] = {}
    for k, v in out.items():
        if k.startswith("loss_"):
            metrics[k] = float(v.float().mean())
    if cfg.sft_weight > 0:
        nll = (-policy["chosen"] / policy["chosen_tokens"].clamp(min=1)).mean()
        loss = loss + cfg.sft_weight * nll
        metrics["loss_sft"] = float(nll.detach())
    metrics["loss"] = float(loss.detach())
    rc, rr = out["reward_chosen"], out["reward_rejected"]
    metrics["rewards/chosen"] = float(rc.mean())
    metrics["rewards/rejected"] = float(rr.mean())
    metrics["rewards/margins"] = float((rc - rr).mean())
    metrics["rewards/accuracies"] = float((rc > rr).float().mean())
    third = {"retrieved": "reward_retrieved", "cropped": "reward_cropped"}.get(cfg.third_kind or "")
    if third:
        rv = out[third]
        metrics[f"rewards/{cfg.third_kind}"] = float(rv.mean())
        metrics["rewards/visual_margins"] = float((rc - rv).mean())
        metrics["rewards/visual_accuracies"] = float((rc > rv).float().mean())
    for k in ("chosen", "rejected", "retrieved", "cropped"):
        if k in policy:
            metrics[f"logps/{k}"] = float(policy[k].detach().float().mean())
    return loss, metrics
