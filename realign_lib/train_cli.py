"""Preference training from the command line, one process or many (``accelerate launch``).

    python -m realign_lib.train_cli --preferences runs/tiny_world/03_induction/preferences.jsonl \\
        --root runs/tiny_world --model runs/tiny_world/model/tiny_vlm --output-dir runs/x/04_training/rdpo \\
        --set loss=rdpo --set max_steps=300 --set per_device_batch_size=8 --set learning_rate=5e-4

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m realign_lib.train_cli ...
    accelerate launch --num_processes 2 --cpu -m realign_lib.train_cli ...   # two processes on a CPU box

``--set KEY=VALUE`` sets any :class:`realign_lib.training.PreferenceConfig` field (values parsed as
YAML: ``true``, ``1e-5``, ``null``). The global batch is ``per_device_batch_size`` × processes ×
``gradient_accumulation_steps``. Writes into ``--output-dir``: the adapter (or full model) and the
processor, ``train_log.jsonl`` (one line per logged step: every loss term, rewards, margins,
accuracies, learning rate) and ``train_result.json`` (final figures, seconds, config); the Trainer's
checkpoints go to ``<output-dir>/checkpoints`` (every ``save_steps``; a killed run started again with the
same command continues from the last complete one; deleted after success). Unset fields keep the paper's defaults (e.g. batch
1 × accumulation 8, LoRA r 128). For the tiny model on a CPU, ``OMP_NUM_THREADS=1`` is fastest.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["parse_overrides", "make_config", "config_from_notebook", "select_records", "latest_checkpoint", "train",
           "main"]

CHECKPOINT_DONE = "checkpoint_complete.json"  # written into a checkpoint folder once the Trainer finished saving it


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["beta=0.2", "use_lora=false"]`` → ``{"beta": 0.2, "use_lora": False}`` (YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        v = yaml.safe_load(value)
        if isinstance(v, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        out[key.strip()] = v
    return out


def make_config(overrides: dict[str, Any]):
    """A :class:`PreferenceConfig` from overrides; unknown keys raise naming the valid ones."""
    from .training import PreferenceConfig

    names = {f.name for f in dataclasses.fields(PreferenceConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown PreferenceConfig field(s) {unknown}; valid: {sorted(names)}")
    kw = dict(overrides)
    for k in ("learning_rate", "projector_learning_rate", "beta", "sft_weight", "warmup_ratio", "epochs"):
        if isinstance(kw.get(k), int) and not isinstance(kw.get(k), bool):
            kw[k] = float(kw[k])
    return PreferenceConfig(**kw)


def config_from_notebook(params: dict[str, Any]):
    """The :class:`PreferenceConfig` notebook 04 trains with, from its parameters (a run config's
    ``04_training`` stage): loss, beta, learning_rate, per_device_batch, grad_accum, sft_weight,
    use_lora, lora_r (α = 2r, as in the paper), seed, max_steps (0: one epoch), save_steps."""
    p = dict(params)
    return make_config({
        "loss": p.get("loss", "rdpo"), "beta": p.get("beta", 0.1), "learning_rate": p.get("learning_rate", 5e-4),
        "per_device_batch_size": p.get("per_device_batch", 8), "gradient_accumulation_steps": p.get("grad_accum", 1),
        "sft_weight": p.get("sft_weight", 1.0), "use_lora": p.get("use_lora", True), "lora_r": p.get("lora_r", 16),
        "lora_alpha": 2 * p.get("lora_r", 16), "seed": p.get("seed", 0), "max_steps": p.get("max_steps") or None,
        "epochs": 1.0, "save_steps": p.get("save_steps", 50)})


def select_records(records: list[dict], max_records: int | None, seed: int) -> list[dict]:
    """At most ``max_records`` records, a seeded random subset in file order (all if None / 0)."""
    import random

    if not max_records or max_records >= len(records):
        return list(records)
    keep = set(random.Random(seed).sample(range(len(records)), max_records))
    return [r for i, r in enumerate(records) if i in keep]


def _log_callback(path: Path, is_main: bool):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every training log (those with a ``loss``) to ``path`` on the main process."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if is_main and logs and "loss" in logs:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()


def _checkpoint_marker(is_main: bool):
    from transformers import TrainerCallback

    from .files import write_json

    class MarkComplete(TrainerCallback):
        """After the Trainer has written a whole checkpoint, mark it complete (atomically): a folder
        without the mark is a save that a kill interrupted, and is never resumed from."""

        def on_save(self, args, state, control, **kwargs):
            if is_main:
                write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_DONE,
                           {"step": state.global_step})

    return MarkComplete()


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step that was saved completely, or None."""
    folder = Path(folder)
    done = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / CHECKPOINT_DONE).is_file()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


def train(preferences: str | os.PathLike | list[dict], model_path: str | os.PathLike, output_dir: str | os.PathLike,
          cfg, root: str | os.PathLike | None = None, max_records: int | None = None,
          training_overrides: dict | None = None, save: bool = True, resume: bool = True,
          keep_checkpoints: bool = False, log=print) -> dict:
    """Train ``cfg.loss`` on ``preferences`` starting from ``model_path``; returns a result dict.

    ``preferences``: a ``preferences.jsonl`` path (image paths relative to ``root``, default the
    file's folder) or records. ``max_records``: train on a seeded subset (reference log-probs are
    computed only for those). ``training_overrides``: extra ``TrainingArguments``. The result
    (also written to ``<output_dir>/train_result.json``) holds the final logged figures, the
    seconds spent on loading, the reference pass and training, the steps and the config; its
    ``"trainer"`` entry (not written) is the :class:`PreferenceTrainer`.

    Kill-safe: every ``cfg.save_steps`` steps the Trainer checkpoints to ``<output_dir>/checkpoints``
    (the last two kept; each marked complete only once fully written), the reference log-probs
    are appended as they are computed, and with ``resume`` a rerun with the same settings
    continues from the last complete checkpoint (optimizer, scheduler, RNG and data position
    restored; ``train_log.jsonl`` cut back to that step), so it ends with the same weights and log
    as an uninterrupted run. Checkpoints of other settings are discarded. After a successful run
    the checkpoints are deleted unless ``keep_checkpoints``.
    """
    import torch

    from . import training, vlm
    from .files import jsonable, read_appended, read_json, read_jsonl, write_json, write_jsonl

    t0 = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(preferences, (str, os.PathLike)):
        root = Path(root) if root is not None else Path(preferences).parent
        records = read_jsonl(preferences)
    else:
        root, records = Path(root or "."), list(preferences)
    records = select_records(records, max_records, cfg.seed)
    dataset = training.PreferenceDataset(records, root=root, need_retrieved=cfg.loss in ("rdpo", "rdpo_released"))
    model, processor = vlm.load_vlm(model_path, dtype="bfloat16" if cfg.use_bf16() else "float32",
                                    device="cpu")  # the Trainer moves it to this process's device
    model.train()
    kw = dict(dataloader_num_workers=0, disable_tqdm=True, save_strategy="steps", save_total_limit=2)
    kw.update(training_overrides or {})
    ckpt_dir = out / "checkpoints"
    args = cfg.training_arguments(ckpt_dir, **kw)
    # one reference cache per process: several processes appending to one file could interleave lines
    rank, world = args.process_index, args.world_size
    cache = out / ("reference_logps.jsonl" if world == 1 else f"reference_logps.rank{rank}.jsonl")
    log_path = out / "train_log.jsonl"
    signature = jsonable({"config": dataclasses.asdict(cfg), "model_path": str(model_path), "processes": world,
                          "records": hashlib.sha256("\n".join(str(r["id"]) for r in records).encode()).hexdigest(),
                          "training_overrides": training_overrides or {}})
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
            log(f"resuming from {start} (step {start.name[11:]} of {cfg.max_steps or 'one epoch'})")
        elif log_path.exists():
            log_path.unlink()
        write_json(sig_path, signature)
    t_load = time.time() - t0
    t1 = time.time()
    from transformers import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation (made before the Trainer seeds) must not depend on the launcher
    trainer = training.PreferenceTrainer(model, cfg, dataset, processor, args=args, ref_cache=cache,
                                         callbacks=[_log_callback(log_path, args.should_save),
                                                    _checkpoint_marker(args.should_save)])
    t_ref = time.time() - t1
    t2 = time.time()
    result = trainer.train(resume_from_checkpoint=str(start) if start is not None else None)
    t_train = time.time() - t2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    final = {k: v for k, v in (logs[-1] if logs else {}).items() if isinstance(v, (int, float))}
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps = trainer.state.global_step
    summary = {
        "loss": cfg.loss, "steps": steps, "records": len(dataset), "processes": world,
        "global_batch": cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world,
        "trainable_parameters": n_params, "final": final,
        "train_loss_mean": float(result.training_loss),
        "seconds": {"load": round(t_load, 2), "reference": round(t_ref, 2), "train": round(t_train, 2),
                    "per_step": round(t_train / max(steps, 1), 4), "total": round(time.time() - t0, 2)},
        "config": dataclasses.asdict(cfg), "model_path": str(model_path),
        "device": str(args.device), "torch_threads": torch.get_num_threads(),
    }
    if save:
        trainer.save_model(str(out))  # adapter (LoRA) or full weights, on the main process only
        if args.should_save:
            processor.save_pretrained(str(out))
    summary["resumed_from_step"] = int(start.name[11:]) if start is not None else None
    if args.should_save:
        write_json(out / "train_result.json", summary)
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary["trainer"] = trainer
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m realign_lib.train_cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preferences", required=True, help="preferences.jsonl (stage 03)")
    ap.add_argument("--root", default=None, help="folder the image paths are relative to (default: the file's)")
    ap.add_argument("--model", required=True, help="model folder or hub id (the reference and starting policy)")
    ap.add_argument("--output-dir", required=True, help="where the adapter, logs and results go")
    ap.add_argument("--max-records", type=int, default=0, help="train on a seeded subset (0 = all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="PreferenceConfig field, e.g. loss=rdpo, max_steps=300, learning_rate=5e-4")
    ap.add_argument("--targs", action="append", default=[], metavar="KEY=VALUE",
                    help="extra transformers.TrainingArguments, e.g. save_strategy=steps")
    args = ap.parse_args(argv)
    try:
        cfg = make_config(parse_overrides(args.overrides))
        targs = parse_overrides(args.targs)
    except (ValueError, TypeError) as err:
        print(f"train_cli: {err}", file=sys.stderr)
        return 2
    try:
        res = train(args.preferences, args.model, args.output_dir, cfg, root=args.root,
                    max_records=args.max_records or None, training_overrides=targs)
    except (ValueError, FileNotFoundError) as err:  # the user's input: the message says what and where
        print(f"train_cli: {err}", file=sys.stderr)
        return 2
    res.pop("trainer")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: res[k] for k in ("loss", "steps", "records", "processes", "global_batch", "final",
                                              "seconds")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
