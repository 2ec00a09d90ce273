"""Recipe configs: one YAML per run, checked against the stage classes of :mod:`realign_lib.run.stages`.

::

    base: tiny_world.yaml        # optional: start from another recipe (path relative to this file)
    run_dir: runs/tiny_world     # every stage reads and writes here
    seed: 0
    top_k: 5                     # a top-level parameter goes to every stage that takes it
    stages:
      "00_tiny_world":           # notebooks/00_tiny_world.ipynb
        n_train: 15000
      "04_training":
        loss: rdpo
        learning_rate: 5.0e-4    # the library's own field names: PreferenceConfig / TrainingArguments
      "04_training/{loss}_seed{seed}":   # variants without copies: one per combination
        matrix: {loss: [dpo, rdpo], seed: [0, 1, 2]}

Keys are the stage classes' field names, which are the notebooks' parameter names and, for
training, :class:`~realign_lib.training.config.PreferenceConfig`'s (``TrainingArguments``' where one
exists). A stage's own value beats the top-level one, which beats the default. Unknown keys,
values of the wrong type and values out of range are refused with a message that names the key
and lists what is allowed. A ``matrix`` axis is either a list of values of a parameter, or a
mapping of names to parameter sets (``condition: {dpo: {loss: dpo}, swap: {loss: dpo,
preferences: baseline_random_swap.jsonl}}``); the key's ``{axis}`` placeholders name each variant.
``worlds: [0, 1, 2]`` (top level) runs the stages before 05 once per world seed, each world in its
own folder ``<run_dir>/world<k>`` with stage 00's ``seed`` set to ``k`` (another world and another tiny
VLM; the other stages keep the config's seeds), and stage 05 once in ``<run_dir>`` over all of them
(its ``worlds`` parameter), pairing conditions within each world.
Where a stage has variants, its plain key (``"04_training"``) holds what they share and does not
run on its own. A stage-04 variant trains into ``04_training/<variant name>`` unless it sets
``output_name``. Stages run in the order of their numbers.
"""
from __future__ import annotations

import ast
import itertools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "load_config", "notebook_parameters", "NOTEBOOK_DIR", "parse_override", "expand_matrix",
           "expand_stages"]

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
_TOP = ("base", "run_dir", "seed", "worlds", "stages")
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


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


def expand_matrix(key: str, params: dict, source: str = "<dict>") -> dict[str, dict]:
    """``{"04_training/{loss}_s{seed}": {matrix: {loss: [a, b], seed: [0, 1]}, ...}}`` → one stage
    key per combination (first axis outermost); a key without ``matrix`` is returned as it is."""
    if "matrix" not in params:
        return {key: params}
    matrix, rest = params["matrix"], {k: v for k, v in params.items() if k != "matrix"}
    if not isinstance(matrix, dict) or not matrix:
        raise ValueError(f"{source}: stages.{key}.matrix must map axis names to lists or to named parameter sets")
    axes = []
    for axis, values in matrix.items():
        if isinstance(values, dict):  # named parameter sets
            if not all(isinstance(v, dict) for v in values.values()):
                raise ValueError(f"{source}: stages.{key}.matrix.{axis}: each name needs a mapping of parameters")
            axes.append([(axis, name, dict(v)) for name, v in values.items()])
        elif isinstance(values, list) and values:
            axes.append([(axis, v, {axis: v}) for v in values])
        else:
            raise ValueError(f"{source}: stages.{key}.matrix.{axis} must be a non-empty list or mapping")
    out = {}
    for combo in itertools.product(*axes):
        try:
            name = key.format(**{axis: label for axis, label, _ in combo})
        except (KeyError, IndexError) as err:
            raise ValueError(f"{source}: stages.{key}: placeholder {err} is not a matrix axis "
                             f"({', '.join(matrix)})") from err
        if name in out:
            raise ValueError(f"{source}: stages.{key}: two combinations are both named {name!r}; put every axis "
                             f"in the name")
        merged = dict(rest)
        for _, _, p in combo:
            merged.update(p)
        out[name] = merged
    return out


def expand_stages(stages: dict, source: str = "<dict>") -> dict[str, dict]:
    """Every stage key with its matrix expanded (:func:`expand_matrix`); a name given twice — a stage key
    and a variant of a matrix, or two matrices — is an error, not a silent replacement."""
    out: dict[str, dict] = {}
    for stage, params in stages.items():
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise TypeError(f"{source}: stages.{stage} must be a mapping of parameter: value")
        for name, p in expand_matrix(str(stage), params, source).items():
            if name in out:
                raise ValueError(f"{source}: stages: {name!r} is given twice (a stage key and a variant of "
                                 f"{stage!r}'s matrix, or two matrices); rename one of them")
            out[name] = p
    return out


@dataclass
class RunConfig:
    """A checked recipe (see the module docstring). ``shared``: the top-level stage parameters."""

    run_dir: str
    seed: int = 0
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    worlds: list[int] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"

    def __post_init__(self):
        from realign_lib.run.stages import STAGES, stage_class, stage_fields

        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"{self.source}: 'run_dir' must be a non-empty string (a folder path)")
        self.run_dir = os.path.expanduser(self.run_dir)  # "~/runs/x" is the home folder, not a folder named "~"
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TypeError(f"{self.source}: 'seed' must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.worlds, list) or any(not isinstance(w, int) or isinstance(w, bool) or w < 0
                                                    for w in self.worlds):
            raise TypeError(f"{self.source}: 'worlds' must be a list of non-negative integers (world seeds), "
                            f"got {self.worlds!r}")
        if len(set(self.worlds)) != len(self.worlds):
            raise ValueError(f"{self.source}: 'worlds' names a world seed twice: {self.worlds}")
        known = stage_fields()
        for key in self.shared:
            if key == "worlds":
                raise ValueError(f"{self.source}: 'worlds' is set at the top level of a config only")
            if key not in known:
                raise ValueError(f"{self.source}: unknown top-level key {key!r}; allowed: {', '.join(_TOP)} and any "
                                 f"stage parameter ({', '.join(sorted(k for k in known if k not in _TOP))})")
        if not isinstance(self.stages, dict):
            raise TypeError(f"{self.source}: 'stages' must be a mapping of stage name: parameters, got "
                            f"{type(self.stages).__name__} (see configs/tiny_world.yaml)")
        if not self.stages:
            raise ValueError(f"{self.source}: no stages to run: a recipe needs 'stages:' with at least one stage "
                             f"(see configs/tiny_world.yaml)")
        expanded = expand_stages(self.stages, self.source)
        for plain in {s.split("/", 1)[0] for s in expanded if "/" in s} & set(expanded):
            common = expanded.pop(plain)  # what the variants of this stage share; it does not run on its own
            expanded = {s: {**common, **p} if s.split("/", 1)[0] == plain else p for s, p in expanded.items()}
        order = sorted(expanded, key=lambda s: s[:2])  # by stage number; variants keep their order
        self.stages = {s: expanded[s] for s in order}
        for stage, params in self.stages.items():
            base, _, variant = stage.partition("/")
            if base not in STAGES:
                raise ValueError(f"{self.source}: unknown stage {stage!r}; stages are {', '.join(STAGES)} "
                                 f"(a variant: '<stage>/<name>')")
            if "/" in stage and not _VARIANT.fullmatch(variant):
                raise ValueError(f"{self.source}: stage variant {stage!r}: the name after '/' must be letters, "
                                 f"digits, '_' or '-' (it becomes a folder name)")
            allowed = {f.name for f in fields(stage_class(stage))}
            for key in params:
                if key == "run_dir":
                    raise ValueError(f"{self.source}: stages.{stage}.run_dir: set run_dir once at the top level")
                if key not in allowed:
                    raise ValueError(f"{self.source}: stages.{stage}: unknown parameter {key!r}; "
                                     f"{base} takes: {', '.join(sorted(allowed))}")
            try:
                self.parameters(stage)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{self.source}: stages.{stage}: {err}") from None
        self._check_output_names()

    def _check_output_names(self) -> None:
        """Two runs of a stage that would write the same folder (``output_name``) are an error."""
        from realign_lib.run.stages import stage_class

        seen: dict[str, str] = {}
        for stage in self.stages:
            settings = stage_class(stage)(**self.parameters(stage))
            if not hasattr(settings, "output_folder"):
                continue
            folder = settings.output_folder()
            other = seen.setdefault(f"{stage.split('/', 1)[0]}/{folder}", stage)
            if other != stage:
                raise ValueError(f"{self.source}: stages {other!r} and {stage!r} would both write "
                                 f"{stage.split('/', 1)[0]}/{folder}: give each its own output_name")

    @staticmethod
    def world_folder(world: int) -> str:
        """The folder (under run_dir) of world seed ``world`` in a config with ``worlds``."""
        return f"world{world}"

    def plan(self, stages: list[str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """``[(stage, folder under run_dir ("" for run_dir itself), papermill parameters)]`` in run order:
        without ``worlds``, every stage in run_dir; with them, the stages before 05 per world (stage 00's
        seed = the world seed), then stage 05 once over all worlds."""
        stages = list(self.stages) if stages is None else stages
        if not self.worlds:
            return [(s, "", self.parameters(s)) for s in stages]
        out = []
        for w in self.worlds:
            for s in (s for s in stages if s[:2] < "05"):
                out.append((s, self.world_folder(w), dict(self.parameters(s), **({"seed": w} if s[:2] == "00" else {}))))
        return out + [(s, "", self.parameters(s)) for s in stages if s[:2] >= "05"]

    def parameters(self, stage: str) -> dict[str, Any]:
        """The papermill parameters of ``stage``: run_dir and seed, the top-level parameters the stage
        takes, then the stage's own (a variant's ``seed`` beats the top-level one). A variant of a
        stage with ``output_name`` gets its variant name there unless it sets one."""
        from realign_lib.run.stages import stage_class

        allowed = {f.name for f in fields(stage_class(stage))}
        out = {"run_dir": self.run_dir, "seed": self.seed,
               **{k: v for k, v in self.shared.items() if k in allowed}, **self.stages.get(stage, {})}
        if "/" in stage and "output_name" in allowed and not out.get("output_name"):
            out["output_name"] = stage.split("/", 1)[1]
        if self.worlds and stage.startswith("05"):
            out["worlds"] = [self.world_folder(w) for w in self.worlds]
        checked = stage_class(stage)(**out)  # the values the check converted (YAML 1.1 reads 9e-1 as text)
        return {k: getattr(checked, k) for k in out}


def _read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path``; a key given twice in one mapping is an error, not a silent merge."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{path}: key {dup[0]!r} given twice (line {node.start_mark.line + 1})")
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.load(path.read_text(), Loader=Loader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with run_dir, seed, stages")
    return data


def _load_raw(path: Path, seen: tuple = ()) -> dict:
    """The YAML of ``path`` with its ``base`` recipes merged under it (stages merged key by key; a variant
    this file's matrix names replaces the base's variant of that name: the file that says more wins)."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"{path}: 'base' must be a file path")
    merged = _load_raw(path.parent / base, seen + (path,))
    stages = dict(merged.pop("stages", None) or {})
    mine = data.pop("stages", None) or {}
    if isinstance(mine, dict):
        for stage, params in mine.items():
            if isinstance(params, dict) and "matrix" in params:
                for name in expand_matrix(str(stage), params, str(path)):
                    stages.pop(name, None)
    for stage, params in (mine.items() if isinstance(mine, dict) else ()):
        stages[stage] = {**(stages.get(stage) or {}), **(params or {})}
    return {**merged, **data, "stages": stages}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe; ``overrides`` like ``"model_path=/models/x"`` (top level), ``"04_training.beta=0.2"``
    (a stage and all its variants) or ``"04_training/rdpo_seed0.beta=0.2"`` (one variant)."""
    path = Path(path)
    data = _load_raw(path)
    stages = data.pop("stages", None) or {}
    if isinstance(stages, dict):  # variants first, so that an override can name one of them
        stages = expand_stages(stages, str(path))
    for item in overrides or []:
        key, value = parse_override(item)
        if "." not in key:
            data[key] = value
            continue
        stage, param = key.split(".", 1)
        targets = [s for s in stages if s == stage or ("/" not in stage and s.split("/", 1)[0] == stage)]
        if not targets:
            raise ValueError(f"--set {item}: {path} has no stage {stage!r} (its stages: "
                             f"{', '.join(stages) or 'none'}); a top-level parameter is set without a stage: "
                             f"--set {param}=...")
        for s in targets:
            stages[s] = dict(stages.get(s) or {}, **{param: value})
    top = {k: data.pop(k) for k in ("run_dir", "seed", "worlds") if k in data}
    return RunConfig(run_dir=top.get("run_dir", ""), seed=top.get("seed", 0), stages=stages, shared=data,
                     worlds=top.get("worlds", []), source=str(path))


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)`` with the value parsed as YAML (``3``, ``true``, ``a``, and
    ``5e-4`` as a number, which YAML 1.1 would leave as text)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value or stage.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    return key.strip(), value
