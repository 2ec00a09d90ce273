"""The preference trainer and the training entry point (stage 4).

* :class:`PreferenceTrainer` — a ``transformers.Trainer`` for DPO / rDPO / mDPO on an
  image-text-to-text model, overriding the documented ``compute_loss``, ``log`` and
  ``create_optimizer`` extension points; nothing of TRL or transformers is patched.
* :func:`train` — what notebook 04 and ``realign train`` (also under ``accelerate launch``) call:
  a seeded subset of the pairs, the model, the cached reference pass, kill-safe checkpoints,
  ``train_log.jsonl`` and ``train_result.json``.

This module imports transformers; :mod:`realign_lib.training.config` (settings, data, scoring) does not.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from transformers import Trainer, TrainerCallback

from realign_lib.cache import digest
from realign_lib.files import jsonable, read_appended, read_json, read_jsonl, write_json, write_jsonl
from realign_lib.training.batches import PreferenceCollator, PreferenceDataset
from realign_lib.training.config import PreferenceConfig, is_projector_param, records_to_train
from realign_lib.training.objective import compute_preference_loss
from realign_lib.training.reference import precompute_reference_logps, reference_logps_for_batch

__all__ = ["PreferenceTrainer", "train", "select_records", "latest_checkpoint", "CHECKPOINT_DONE"]

CHECKPOINT_DONE = "checkpoint_complete.json"  # written into a checkpoint folder once the Trainer finished saving it


class PreferenceTrainer(Trainer):
    """``transformers.Trainer`` for DPO / rDPO / mDPO on an image-text-to-text model.

    ``PreferenceTrainer(model, cfg, train_dataset, processor, args=None, ref_model=None,
    ref_cache=None)``: ``model`` is the policy (a peft model when ``cfg.use_lora``: pass the
    base model and the adapters of :meth:`PreferenceConfig.lora_config` are added here);
    ``args`` defaults to ``cfg.training_arguments(output_dir)`` — pass ``output_dir=`` then.
    With ``cfg.precompute_ref`` the reference log-probs are computed in ``__init__`` and
    cached in ``ref_cache`` (default ``<output_dir>/reference_logps.jsonl``; see
    :mod:`realign_lib.training.reference`): first the model is placed on this process's device (the Trainer
    leaves that to DeepSpeed, which would only do it later), then each process scores its share
    of the pairs; otherwise each step runs the reference too. Without LoRA and without ``ref_model`` a frozen copy of the
    model is the reference. Logs every term, reward, margin and accuracy (batch means since
    the last log) besides the Trainer's loss and learning rate.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, model, cfg: PreferenceConfig, train_dataset: PreferenceDataset, processor,
                 args=None, ref_model=None, ref_cache: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None, **kwargs):
        if args is None:
            if output_dir is None:
                raise ValueError("pass args (TrainingArguments) or output_dir")
            args = cfg.training_arguments(output_dir)
        if args.remove_unused_columns:
            raise ValueError("TrainingArguments.remove_unused_columns must be False: the collator needs "
                             "the raw preference records")
        self.gpus_visible = args.n_gpu
        if args.n_gpu > 1:  # several GPUs in ONE process: the Trainer would wrap the model in DataParallel
            warnings.warn(f"{args.n_gpu} GPUs are visible to this one process: training on one of them (cuda:0), "
                          f"with the global batch as configured. For data parallel training start one process "
                          f"per GPU: accelerate launch --num_processes {args.n_gpu} -m realign_lib.run.cli train ... "
                          f"(docs/gpu.md, 'Several GPUs'), or hide the others with CUDA_VISIBLE_DEVICES=0.",
                          stacklevel=2)
            args._n_gpu = 1  # (DataParallel would split each batch over the GPUs and take N× fewer steps)
        if cfg.use_lora and not hasattr(model, "disable_adapter"):
            from peft import get_peft_model

            model = get_peft_model(model, cfg.lora_config(model))
        if cfg.train_projector and not cfg.use_lora:
            for n, p in model.named_parameters():
                if is_projector_param(n):
                    p.requires_grad_(True)
        if ref_model is None and not hasattr(model, "disable_adapter"):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.cfg, self.ref_model = cfg, ref_model
        self._metrics: dict[str, list[float]] = {}
        self._eval_metrics: dict[str, list[float]] = {}
        collator = PreferenceCollator(processor, cfg)
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                         processing_class=processor, **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if cfg.precompute_ref:
            self._place_for_reference()
            cache = ref_cache if ref_cache is not None else Path(args.output_dir) / "reference_logps.jsonl"
            # the policy's forward runs under the accelerator's mixed-precision autocast (bf16 on a GPU): so does
            # the reference's, or step-0 rewards are not exactly 0 and the log-2 check in gpu_check false-alarms
            with self.accelerator.autocast():
                precompute_reference_logps(self.model, train_dataset, collator, cfg, cache, ref_model=self.ref_model,
                                           batch_size=cfg.reference_batch_size or args.per_device_train_batch_size)

    def _place_for_reference(self) -> None:
        """Move the model to ``args.device`` where the Trainer postponed it (DeepSpeed ZeRO-1/2 moves
        it only in ``train()``), so the reference pass runs on the device, not the CPU. Not for
        ZeRO-3, FSDP or a model spread over devices: those place (or shard) it themselves."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError("the cached reference pass needs whole parameters on each device; under DeepSpeed ZeRO-3 "
                             "or FSDP they are sharded and it would run on the CPU. Use ZeRO-2 "
                             "(configs/accelerate/deepspeed_zero2.yaml), or set precompute_ref=false (the reference "
                             "is then scored in each training step)")
        if getattr(self.model, "hf_device_map", None) or self.is_model_parallel:
            return
        param = next((p for p in self.model.parameters()), None)
        if param is not None and param.device != self.args.device:
            self.model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        ref = None
        if not any(k.startswith("ref_") for k in inputs):
            ref = reference_logps_for_batch(self.accelerator.unwrap_model(model), inputs, self.cfg, self.ref_model)
        loss, metrics = compute_preference_loss(model, inputs, ref, self.cfg)
        if model.training:
            for k, v in metrics.items():
                self._metrics.setdefault(k, []).append(v)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the preference loss only (no logits); its metrics are logged as ``eval_*``."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.compute_loss(model, inputs, return_outputs=True)
        for k, v in metrics.items():
            self._eval_metrics.setdefault(k, []).append(v)
        return loss.detach(), None, None

    def _mean_over_processes(self, metrics: dict[str, list[float]]) -> dict[str, float]:
        """Each metric's mean since the last log, over every process (each scored its own pairs): the
        Trainer logs on the main process, which alone would report only its share of the batch."""
        names = sorted(metrics)
        means = torch.tensor([sum(metrics[k]) / len(metrics[k]) for k in names], dtype=torch.float64,
                             device=self.args.device)
        if self.args.world_size > 1:  # every process calls log() at the same step: a collective is safe
            means = self.accelerator.reduce(means, reduction="mean")
        return dict(zip(names, means.tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # a training log: add the averaged metrics
            for k, v in self._mean_over_processes(self._metrics).items():
                logs["pref/" + k if k == "loss" else k] = v
            self._metrics = {}
        if self._eval_metrics and "eval_loss" in logs:
            for k, vals in self._eval_metrics.items():
                if k != "loss":
                    logs[f"eval_{k}"] = sum(vals) / len(vals)
            self._eval_metrics = {}
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        """AdamW as the Trainer builds it, with the projector at ``cfg.projector_learning_rate``."""
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.cfg.train_projector and self.optimizer_cls_and_kwargs is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple, list] = {}
            for n, p in opt_model.named_parameters():
                if p.requires_grad:
                    lr = self.cfg.projector_learning_rate if is_projector_param(n) else self.args.learning_rate
                    wd = self.args.weight_decay if n in decay else 0.0
                    groups.setdefault((lr, wd), []).append(p)
            cls, kw = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kw = {k: v for k, v in kw.items() if k != "lr"}
            self.optimizer = cls([{"params": ps, "lr": lr, "weight_decay": wd}
                                  for (lr, wd), ps in groups.items()], lr=self.args.learning_rate, **kw)
            return self.optimizer
        return super().create_optimizer(model)


# ------------------------------------------------------------------------------------ entry point
class JsonlLog(TrainerCallback):
    """Appends every training log (those with a ``loss``) to ``path`` on the main process."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.is_main and logs and "loss" in logs:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class MarkComplete(TrainerCallback):
    """After the Trainer has written a whole checkpoint, mark it complete (atomically): a folder
    without the mark is a save that a kill interrupted, and is never resumed from."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def on_save(self, args, state, control, **kwargs):
        if self.is_main:
            write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_DONE,
                       {"step": state.global_step})


def select_records(records: Sequence[dict], max_records: int, cfg: PreferenceConfig, processes: int = 1) -> list[dict]:
    """The pairs a run trains on: :func:`~realign_lib.training.config.records_to_train` of them, a random
    subset (seeded by ``cfg.seed``) in file order."""
    n = records_to_train(len(records), max_records, cfg, processes)
    if n >= len(records):
        return list(records)
    keep = set(random.Random(cfg.seed).sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step that was saved completely, or None."""
    folder = Path(folder)
    done = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / CHECKPOINT_DONE).is_file()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


def _resume_point(ckpt_dir: Path, signature: dict, log_path: Path, args, resume: bool, log) -> Path | None:
    """The complete checkpoint to resume from (settings unchanged), else None after clearing old ones;
    on the main process the log is cut back to the checkpoint's step and the signature written."""
    sig_path = ckpt_dir / "run_signature.json"
    start = None
    if resume and sig_path.is_file() and read_json(sig_path) == signature:
        start = latest_checkpoint(ckpt_dir)
    elif ckpt_dir.exists() and args.should_save:
        if any(ckpt_dir.glob("checkpoint-*")):
            log(f"{ckpt_dir}: checkpoints of other settings (or resume=False) discarded")
        shutil.rmtree(ckpt_dir)
    if args.should_save:
        if start is not None:  # keep the log up to the checkpoint's step: the resumed steps are logged again
            kept = [r for r in read_appended(log_path) if r.get("step", 0) <= int(start.name[11:])]
            write_jsonl(log_path, kept)
            log(f"resuming from {start} (step {start.name[11:]})")
        elif log_path.exists():
            log_path.unlink()
        write_json(sig_path, signature)
    return start


def train(preferences: str | os.PathLike | list[dict], model_path: str | os.PathLike, output_dir: str | os.PathLike,
          cfg: PreferenceConfig, root: str | os.PathLike | None = None, max_records: int = 0,
          training_overrides: dict | None = None, save: bool = True, resume: bool = True,
          keep_checkpoints: bool = False, log=print, print_logs: bool = True) -> dict:
    """Train ``cfg.loss`` on ``preferences`` starting from ``model_path``; returns a result dict.

    ``preferences``: a ``preferences.jsonl`` path (image paths relative to ``root``, default the
    file's folder) or records. ``max_records``: train on a seeded subset (reference log-probs are
    computed only for those); 0: as many as ``cfg.max_steps`` steps see, else all
    (:func:`~realign_lib.training.config.records_to_train`). ``training_overrides``: extra ``TrainingArguments``. The result
    (also written to ``<output_dir>/train_result.json``) holds the final logged figures, the
    seconds spent on loading, the reference pass and training, the steps and the config; its
    ``"trainer"`` entry (not written) is the :class:`PreferenceTrainer`. ``print_logs=False``: the
    Trainer does not print each logged dict (they are in ``train_log.jsonl`` either way).

    Kill-safe: every ``cfg.save_steps`` steps the Trainer checkpoints to ``<output_dir>/checkpoints``
    (the last two kept; each marked complete only once fully written), the reference log-probs
    are appended as they are computed, and with ``resume`` a rerun with the same settings
    continues from the last complete checkpoint (optimizer, scheduler, RNG and data position
    restored; ``train_log.jsonl`` cut back to that step), so it ends with the same weights and log
    as an uninterrupted run. Checkpoints of other settings are discarded. After a successful run
    the checkpoints are deleted unless ``keep_checkpoints``.
    """
    from transformers import set_seed

    from realign_lib.models import vlm

    t0 = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(preferences, (str, os.PathLike)):
        root = Path(root) if root is not None else Path(preferences).parent
        records = read_jsonl(preferences)
    else:
        root, records = Path(root or "."), list(preferences)
    records = select_records(records, max_records, cfg, processes=int(os.environ.get("WORLD_SIZE", "1")))
    dataset = PreferenceDataset(records, root=root, need_retrieved=cfg.loss in ("rdpo", "rdpo_released"))
    skipped = {k: n for k, n in dataset.skipped.items() if n}
    if skipped:
        log(f"preference pairs left out: {skipped} (chosen equal to rejected teaches nothing)")
    model, processor = vlm.load_vlm(model_path, dtype="bfloat16" if cfg.use_bf16() else "float32",
                                    device="cpu")  # the Trainer moves it to this process's device
    model.train()
    kw = dict(disable_tqdm=True, save_strategy="steps", save_total_limit=2)
    kw.update(training_overrides or {})
    ckpt_dir = out / "checkpoints"
    args = cfg.training_arguments(ckpt_dir, **kw)
    world = args.world_size
    cache = out / "reference_logps.jsonl"  # one cache; each process scores its share (realign_lib.training.reference)
    log_path = out / "train_log.jsonl"
    signature = jsonable({"config": dataclasses.asdict(cfg), "model_path": str(model_path), "processes": world,
                          "records": digest("\n".join(str(r["id"]) for r in records), 64),
                          "training_overrides": training_overrides or {}})
    start = _resume_point(ckpt_dir, signature, log_path, args, resume, log)
    t_load = time.time() - t0
    t1 = time.time()
    set_seed(cfg.seed)  # the LoRA initialisation (made before the Trainer seeds) must not depend on the launcher
    trainer = PreferenceTrainer(model, cfg, dataset, processor, args=args, ref_cache=cache,
                                callbacks=[JsonlLog(log_path, args.should_save), MarkComplete(args.should_save)])
    t_ref = time.time() - t1
    if not print_logs:  # the logged dicts still go to train_log.jsonl; a notebook shows them as a table
        from transformers.trainer_callback import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    t2 = time.time()
    result = trainer.train(resume_from_checkpoint=str(start) if start is not None else None)
    seconds = {"load": round(t_load, 2), "reference": round(t_ref, 2), "train": round(time.time() - t2, 2)}
    summary = _summary(trainer, cfg, result, len(dataset), seconds, t0, model_path)
    if save:
        trainer.save_model(str(out))  # adapter (LoRA) or full weights, on the main process only
        if args.should_save:
            processor.save_pretrained(str(out))
            _sort_adapter_targets(out / "adapter_config.json")
    summary["resumed_from_step"] = int(start.name[11:]) if start is not None else None
    if skipped:
        summary["skipped"] = skipped
    if args.should_save:
        write_json(out / "train_result.json", summary)
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary["trainer"] = trainer
    return summary


def _sort_adapter_targets(path: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in hash order, which differs from process to
    process; sorted, the same training writes the same ``adapter_config.json``."""
    if path.is_file():
        conf = read_json(path)
        if isinstance(conf.get("target_modules"), list):
            conf["target_modules"] = sorted(conf["target_modules"])
            write_json(path, conf)


def _summary(trainer: PreferenceTrainer, cfg: PreferenceConfig, result, n_records: int, seconds: dict, t0: float,
             model_path) -> dict:
    """The figures :func:`train` returns and writes to ``train_result.json``."""
    args = trainer.args
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    return {
        "loss": cfg.loss, "steps": steps, "records": n_records, "processes": args.world_size,
        "global_batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "final": {k: v for k, v in (logs[-1] if logs else {}).items() if isinstance(v, (int, float))},
        "train_loss_mean": float(result.training_loss),
        "seconds": {**seconds, "per_step": round(seconds["train"] / max(steps, 1), 4),
                    "total": round(time.time() - t0, 2)},
        "config": dataclasses.asdict(cfg), "model_path": str(model_path),
        "device": str(args.device), "gpus_visible": trainer.gpus_visible, "torch_threads": torch.get_num_threads(),
    }
