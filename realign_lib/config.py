"""Run configuration: one YAML per run, checked against the notebooks' own ``parameters`` cells.

A config names the run folder, the seed and, per stage, the parameters its notebook takes::

    run_dir: runs/tiny_world     # every stage reads and writes here
    seed: 0
    stages:
      "00_tiny_world":           # notebooks/00_tiny_world.ipynb
        n_train: 30000
        small_run: false

Unknown stages, unknown parameters and values of the wrong type are refused with a message that
names the key and lists what is allowed: the notebook's ``parameters`` cell is the single
source of truth (read with ``papermill.inspect_notebook``), so a config cannot drift from it.
"""
from __future__ import annotations

import ast
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "load_config", "notebook_parameters", "NOTEBOOK_DIR", "parse_override"]

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "dict": dict}


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, dict]:
    """``name → {"default": value, "type": str, "help": str}`` from a notebook's parameters cell."""
    import papermill as pm

    out = {}
    for name, p in pm.inspect_notebook(str(notebook)).items():
        try:
            default = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            default = p["default"]
        out[name] = {"default": default, "type": type(default).__name__, "help": p.get("help", "")}
    return out


@dataclass
class RunConfig:
    """A checked run configuration (see module docstring)."""

    run_dir: str
    seed: int = 0
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<dict>"

    def __post_init__(self):
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"{self.source}: 'run_dir' must be a non-empty string (a folder path)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"{self.source}: 'seed' must be an integer, got {self.seed!r}")
        available = {p.stem: p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))}
        for stage, params in self.stages.items():
            base, _, variant = str(stage).partition("/")
            if base not in available:
                raise ValueError(f"{self.source}: unknown stage {stage!r}; stages are the notebooks "
                                 f"{', '.join(available) or '(none found)'} (a variant: '<stage>/<name>')")
            if "/" in str(stage) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", variant):
                raise ValueError(f"{self.source}: stage variant {stage!r}: the name after '/' must be letters, "
                                 f"digits, '_' or '-' (it becomes a folder name)")
            if params is None:
                self.stages[stage] = params = {}
            if not isinstance(params, dict):
                raise TypeError(f"{self.source}: stages.{stage} must be a mapping of parameter: value")
            allowed = notebook_parameters(available[base])
            for key, value in params.items():
                if key == "run_dir":
                    raise ValueError(f"{self.source}: stages.{stage}.run_dir: set run_dir once at the top level")
                if key not in allowed:
                    raise ValueError(f"{self.source}: stages.{stage}: unknown parameter {key!r}; "
                                     f"{stage} takes: {', '.join(sorted(allowed))}")
                want = allowed[key]["type"]
                ok = _TYPES.get(want)
                if ok is not None and (not isinstance(value, ok) or (want != "bool" and isinstance(value, bool))):
                    raise TypeError(f"{self.source}: stages.{stage}.{key} must be {want} "
                                    f"(default {allowed[key]['default']!r}), got {value!r}")

    def parameters(self, stage: str) -> dict[str, Any]:
        """The papermill parameters for ``stage``: run_dir and seed plus the stage's own (a stage's
        ``seed`` overrides the top-level one, for variants such as ``"04_training/rdpo_seed1"``)."""
        return {"run_dir": self.run_dir, "seed": self.seed, **self.stages.get(stage, {})}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; ``overrides`` like ``"00_tiny_world.n_train=500"`` or ``"seed=3"``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with run_dir, seed, stages")
    unknown = set(data) - {"run_dir", "seed", "stages"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: run_dir, seed, stages")
    data.setdefault("stages", {})
    for item in overrides or []:
        key, value = parse_override(item)
        if "." in key:
            stage, param = key.split(".", 1)
            data["stages"].setdefault(stage, {})
            data["stages"][stage] = dict(data["stages"][stage] or {}, **{param: value})
        else:
            data[key] = value
    return RunConfig(run_dir=data.get("run_dir", ""), seed=data.get("seed", 0), stages=data["stages"], source=str(path))


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)`` with the value parsed as YAML (``3``, ``true``, ``a``)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value or stage.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
