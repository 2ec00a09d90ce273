"""Warm restarts of the tiny VLM's instruction tuning while a check says the model misses its target.

:func:`realign_lib.tinyworld.training.train_tiny_vlm` calls :func:`warm_restarts` once the base model is
saved: the check (stage 00's: the validation POPE figures against ``health.TARGET``) runs, and while the
model misses the target and fewer than ``cfg.sft_restarts`` cycles were made, instruction tuning runs
another cycle of ``cfg.sft_restart_steps`` steps — a fresh AdamW and cosine schedule peaking at
``cfg.sft_lr`` from the weights so far (``instruction_tune``, phase ``restart<k>``) — and the model is
saved again. Why: the yes/no answers sit on a plateau (every question answered alike) for hundreds of
steps and on some world seeds leave it only as the first cycle's schedule has decayed, ending near
chance; a second cycle at the peak learning rate gets them off it.

A cycle saves its state as it goes (:class:`~realign_lib.tinyworld.resume.ResumeState`): killed, it
resumes to the same weights. Its new weights go in by a two-step swap — saved aside, named in
``tiny_vlm.json``, then moved in place — so a kill between the steps loses nothing (:func:`finish_swap`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from realign_lib.tinyworld.resume import ResumeState
from realign_lib.tinyworld.settings import TinyVLMConfig

__all__ = ["RESTART_KNOBS", "recipe", "warm_restarts", "finish_swap"]

RESTART_KNOBS = ("sft_restarts", "sft_restart_steps")  # how many warm restarts may follow, not the base model's recipe


def recipe(cfg: TinyVLMConfig | dict) -> dict:
    """The settings that make the base model (before any warm restart): what a saved model is reused for."""
    d = asdict(cfg) if not isinstance(cfg, dict) else cfg
    return {k: v for k, v in d.items() if k not in RESTART_KNOBS}


def warm_restarts(out: Path, summary: dict, model, processor, cfg: TinyVLMConfig, check, data, log,
                  checkpoint_every: int, log_path: Path, tune) -> dict:
    """The check-and-restart loop of :func:`~realign_lib.tinyworld.training.train_tiny_vlm` from a complete
    saved model (``summary``); ``data()`` gives the training records and pixels, ``tune`` is
    :func:`~realign_lib.tinyworld.training.instruction_tune` (passed in: this module does not import it)."""
    from realign_lib.cache import file_digest
    from realign_lib.files import read_appended, write_json, write_jsonl

    reused, made_here = bool(summary.get("reused")), 0  # returned: reused only if this call changed no weights
    summary = {k: v for k, v in summary.items() if k not in ("reused", "path")} | {"path": str(out)}
    summary["config"] = asdict(cfg)
    summary.setdefault("restarts", [])  # (a model saved before warm restarts existed has none)
    checks = [c for c in summary.get("checks", []) if c["restarts"] <= len(summary["restarts"])]
    while True:
        k = len(summary["restarts"])
        resume = ResumeState(out / "resume", {"model": recipe(cfg), "world": summary["world"], "restart": k + 1,
                                              "steps": cfg.sft_restart_steps}, checkpoint_every, log_path)
        pending = resume.latest()  # a restart cycle killed part-way: its check was made, finish it
        if pending is None:
            model.eval()
            missed = list(check(model, processor, k))
            checks = [c for c in checks if c["restarts"] < k] + [{"restarts": k, "missed": missed}]
            summary["checks"] = checks
            write_json(out / "tiny_vlm.json", summary)
            if not missed or k >= cfg.sft_restarts:
                return dict(summary, reused=True) if reused and not made_here else summary
            # (lines a killed, never-saved start of this cycle logged)
            write_jsonl(log_path, [r for r in read_appended(log_path) if r.get("phase") != f"restart{k + 1}"])
        else:
            write_jsonl(log_path, read_appended(log_path)[:pending["log_lines"]])
        records, pixels = data()
        t0 = time.time()
        tune(model, processor.tokenizer, pixels, records,
             replace(cfg, sft_steps=cfg.sft_restart_steps, seed=cfg.seed + 1000 * (k + 1)),
             log=log, resume=resume, phase=f"restart{k + 1}")
        # the new weights go in by a two-step swap: saved aside, named in the marker, then moved in place
        # (a kill between the two: the next call finishes the move, see finish_swap)
        aside = out / ".restart_weights"
        model.save_pretrained(aside, safe_serialization=True)
        summary["restarts"] = summary["restarts"] + [{"cycle": k + 1, "steps": cfg.sft_restart_steps,
                                                      "seconds": round(time.time() - t0, 1)}]
        summary["weights"] = file_digest(aside / "model.safetensors")
        write_json(out / "tiny_vlm.json", summary)
        finish_swap(out, summary)
        resume.clear()
        made_here += 1


def finish_swap(out: Path, summary: dict) -> None:
    """Move weights saved aside by a warm restart into place when the marker names them (a run killed
    between the two steps); drop weights the marker does not name (killed before it was written)."""
    import shutil

    from realign_lib.cache import file_digest

    aside = out / ".restart_weights"
    if not aside.is_dir():
        return
    if (aside / "model.safetensors").is_file() and summary.get("weights") == file_digest(aside / "model.safetensors"):
        for f in aside.iterdir():
            os.replace(f, out / f.name)
    shutil.rmtree(aside, ignore_errors=True)
