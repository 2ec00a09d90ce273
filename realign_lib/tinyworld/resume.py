"""Resuming a killed training run: periodic, atomically written state of a multi-phase loop.

:class:`ResumeState` is what :func:`realign_lib.tinyworld.training.train_tiny_vlm` uses to continue after a
kill (stage 00) with the same weights and log as an uninterrupted run.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["ResumeState"]


class ResumeState:
    """Where a killed :func:`~realign_lib.tinyworld.training.train_tiny_vlm` picks up: the latest saved step of either phase.

    Every ``every`` steps (and at the end of each phase) a phase saves ``folder/<phase>-<step>.pt``
    — model (and tower heads), optimiser, schedule and sampling-generator state and its loss
    history — then ``folder/state.json`` naming that file, the phase, the step, the training
    config and how many lines the training log had. Both are renamed into place, and
    ``state.json`` is written last, so it only ever names a complete file. A state saved under a
    different config is ignored. The ``.pt`` files hold tensors and plain containers only and are
    read with ``torch.load(weights_only=True)``.
    """

    def __init__(self, folder: str | os.PathLike, config: dict, every: int, log_path: str | os.PathLike | None = None):
        self.folder, self.config, self.every = Path(folder), config, int(every)
        self.log_path = Path(log_path) if log_path else None

    def latest(self) -> dict | None:
        """``state.json`` of a complete save under this config, or ``None``."""
        from realign_lib.files import read_json
        meta_path = self.folder / "state.json"
        if not meta_path.is_file():
            return None
        meta = read_json(meta_path)
        if meta.get("config") != self.config or not (self.folder / meta["file"]).is_file():
            return None
        return meta

    def load(self, phase: str) -> dict | None:
        """The saved state of ``phase`` if the latest save is of that phase, else ``None``."""
        meta = self.latest()
        if meta is None or meta["phase"] != phase:
            return None
        return torch.load(self.folder / meta["file"], weights_only=True)

    def due(self, done: int, total: int) -> bool:
        """Save after ``done`` of ``total`` steps? (every ``every`` steps, and at the end)"""
        return self.every > 0 and (done % self.every == 0 or done == total)

    def save(self, phase: str, step: int, state: dict) -> None:
        from realign_lib.files import atomic_torch_save, read_appended, write_json
        name = f"{phase}-{step}.pt"
        atomic_torch_save(self.folder / name, state)
        log_lines = len(read_appended(self.log_path)) if self.log_path else 0
        write_json(self.folder / "state.json", {"phase": phase, "step": step, "file": name,
                                                "log_lines": log_lines, "config": self.config})
        for old in self.folder.glob("*.pt"):
            if old.name != name:
                old.unlink()

    def restore(self, phase: str, modules: dict, opt, sched, generator) -> tuple[int, list[dict]]:
        """Load the latest saved state of ``phase`` into ``modules`` (name → module), the optimiser,
        the schedule and the generator; returns ``(step to start at, loss history so far)``."""
        saved = self.load(phase)
        if not saved:
            return 0, []
        for name, module in modules.items():
            module.load_state_dict(saved[name])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        generator.set_state(saved["generator"])
        return saved["step"], saved["hist"]

    def checkpoint(self, phase: str, done: int, total: int, modules: dict, opt, sched, generator,
                   hist: list[dict]) -> None:
        """Save what :meth:`restore` reads, if a save is due after ``done`` of ``total`` steps."""
        if self.due(done, total):
            self.save(phase, done, {**{name: m.state_dict() for name, m in modules.items()},
                                    "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "generator": generator.get_state(), "step": done, "hist": hist})

    def clear(self) -> None:
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)
