"""Recipe configs: one name per knob from YAML to notebook to library dataclass, one default per knob,
variants without copies, clear errors."""
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml

import realign_lib
from realign_lib.run.config import RunConfig, expand_matrix, load_config, notebook_parameters, parse_override
from realign_lib.run.stages import STAGES, TrainingStage, stage_fields
from realign_lib.training.config import PreferenceConfig

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml")
                 if p.parent.name != "accelerate")


def test_every_notebook_parameter_is_a_stage_field_with_the_same_default(root):
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert {p.stem for p in notebooks} == set(STAGES)
    for nb in notebooks:
        params = {k: v["default"] for k, v in notebook_parameters(nb).items()}
        defaults = STAGES[nb.stem].defaults()
        assert set(params) == set(defaults), (nb.name, set(params) ^ set(defaults))
        differ = {k: (params[k], defaults[k]) for k in params if params[k] != defaults[k]
                  or type(params[k]) is not type(defaults[k])}
        assert not differ, f"{nb.name}: notebook default vs library default {differ}"


def test_every_training_setting_is_a_notebook_parameter():
    """LoRA rank and targets, the projector and its rate, every TrainingArguments knob the kit sets."""
    names = {f.name for f in dataclasses.fields(TrainingStage)}
    assert {f.name for f in dataclasses.fields(PreferenceConfig)} <= names
    assert {"lora_r", "lora_alpha", "lora_target_modules", "train_projector", "projector_learning_rate",
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "warmup_steps"} <= names
    from transformers import TrainingArguments

    ta = {f.name for f in dataclasses.fields(TrainingArguments)}
    # a setting that TrainingArguments also has carries its name (no translation layer)
    shared = {"learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
              "warmup_steps", "weight_decay", "lr_scheduler_type", "seed", "max_steps", "logging_steps", "save_steps",
              "bf16"}
    assert shared <= ta and shared <= names
    args = PreferenceConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=2.0,
                            max_steps=7, warmup_steps=0.1).training_arguments("unused")
    for name in shared - {"bf16", "lr_scheduler_type"}:
        assert getattr(args, name) == getattr(PreferenceConfig(per_device_train_batch_size=3,
                                                               gradient_accumulation_steps=2, num_train_epochs=2.0,
                                                               max_steps=7, warmup_steps=0.1), name), name


def _raw_keys(path: Path):
    """(top-level keys, {stage key: parameter keys}) of a YAML file as written, matrix axes included."""
    data = yaml.safe_load(path.read_text()) or {}
    stages = {}
    for key, params in (data.get("stages") or {}).items():
        params = dict(params or {})
        keys = set(params) - {"matrix"}
        for axis, values in (params.get("matrix") or {}).items():
            if isinstance(values, dict):
                keys |= {k for v in values.values() for k in v}
            else:
                keys.add(axis)
        stages[key] = keys
    return set(data) - {"stages"}, stages


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_key_is_a_library_field(path):
    top, stages = _raw_keys(path)
    known = stage_fields()
    assert top <= {"base"} | set(known), f"{path.name}: top-level keys without a field: {top - set(known)}"
    for stage, keys in stages.items():
        cls = STAGES[stage.split("/", 1)[0]]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert keys <= fields, f"{path.name}: {stage}: keys without a {cls.__name__} field: {keys - fields}"
    cfg = load_config(path)  # and the whole recipe checks (types, ranges, choices)
    assert cfg.stages


def _library_modules():
    """Every module of the library, subpackages included."""
    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(realign_lib.__path__, "realign_lib.")]


def _library_dataclasses():
    out = []
    for mod in _library_modules():
        out += [c for _, c in inspect.getmembers(mod, dataclasses.is_dataclass)
                if inspect.isclass(c) and c.__module__ == mod.__name__]
    return out


def test_one_default_per_knob():
    """A field name means one knob: every library dataclass that has it gives it the same default,
    and so does every library function whose parameter of that name has a default. Not counted: a
    function default of None (nothing given: the caller decides) and a function's ``batch_size``
    (how many items one call processes at once: a throughput setting of that function, not a knob
    of the method, and rightly different for a matrix product and a 7B forward pass)."""
    defaults: dict[str, dict] = {}
    for cls in _library_dataclasses():
        for f in dataclasses.fields(cls):
            d = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                defaults.setdefault(f.name, {})[cls.__qualname__] = d
    knobs = set(stage_fields())
    for mod in _library_modules():
        for fname, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__:
                continue
            for p in inspect.signature(fn).parameters.values():
                if (p.name in knobs and p.default is not inspect.Parameter.empty and p.default is not None
                        and p.name != "batch_size"):
                    defaults.setdefault(p.name, {})[f"{mod.__name__}.{fname}"] = p.default
    # the one exception, on purpose: 00_real_data writes into a run folder of its own by default, so that
    # real samples never replace the tiny world's (run_dir names a place, not a setting of the method)
    defaults["run_dir"] = {k: v for k, v in defaults.get("run_dir", {}).items() if k != "RealDataStage"}
    conflicts = {k: v for k, v in defaults.items() if len({repr(x) for x in v.values()}) > 1}
    assert not conflicts, f"one knob, several defaults: {conflicts}"


def test_shipped_configs_load_and_share_a_base(root):
    tiny = load_config(root / "configs" / "tiny_world.yaml")
    assert list(tiny.stages) == ["00_tiny_world", "01_retrieval", "02_masking", "03_induction", "04_training",
                                 "05_evaluation"]
    assert tiny.parameters("01_retrieval")["top_k"] == tiny.parameters("03_induction")["top_k"] == 5
    smoke = load_config(root / "configs" / "tiny_world_smoke.yaml")
    for stage in smoke.stages:
        assert smoke.parameters(stage)["run_dir"] == smoke.run_dir
    assert smoke.parameters("00_tiny_world")["n_train"] == 1500 and smoke.parameters("04_training/dpo_seed0")["max_steps"] == 10
    # the smoke run trains with the tiny world's settings (inherited), in two variants
    rd = smoke.parameters("04_training/rdpo_seed0")
    assert (rd["learning_rate"], rd["lora_r"], rd["loss"], rd["output_name"]) == (5e-4, 16, "rdpo", "rdpo_seed0")
    for path in sorted((root / "configs" / "backbones").glob("*.yaml")):
        assert len(path.read_text().splitlines()) <= 15, path.name
        assert path.read_text().count("model_path:") == 1, path.name  # the model is named once


def test_parameters_precedence_top_level_then_stage():
    cfg = RunConfig(run_dir="r", seed=7, shared={"top_k": 3, "model_path": "m"},
                    stages={"01_retrieval": {}, "03_induction": {"top_k": 4}, "02_masking": {}})
    assert cfg.parameters("01_retrieval") == {"run_dir": "r", "seed": 7, "top_k": 3, "model_path": "m"}
    assert cfg.parameters("03_induction")["top_k"] == 4  # a stage's own value beats the top level
    assert "top_k" not in cfg.parameters("02_masking") and "model_path" not in cfg.parameters("02_masking")
    assert list(cfg.stages) == ["01_retrieval", "02_masking", "03_induction"]  # run in number order


def test_unknown_keys_wrong_types_and_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter 'n_trian'.*takes:.*n_train"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"n_trian": 5}})
    with pytest.raises(TypeError, match=r"n_train='many': must be an integer \(default 15000\)"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"n_train": "many"}})
    with pytest.raises(TypeError, match="health_check=1: must be true or false"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"health_check": 1}})
    with pytest.raises(ValueError, match=r"tau=1.5: must be <= 1.0"):
        RunConfig(run_dir="r", stages={"03_induction": {"tau": 1.5}})
    for bad in (0.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"tau=.*: must be (> 0.0|a finite number)"):
            RunConfig(run_dir="r", stages={"03_induction": {"tau": bad}})
    for key in ("max_questions", "n_chair"):
        with pytest.raises(ValueError, match=rf"{key}=-1: must be >= 0"):
            RunConfig(run_dir="r", stages={"05_evaluation": {key: -1}})
    with pytest.raises(ValueError, match=r"n_samples=0: must be >= 1"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"n_samples": 0}})
    with pytest.raises(ValueError, match=r"max_samples=-5: must be >= 0"):
        RunConfig(run_dir="r", shared={"max_samples": -5}, stages={"02_masking": {}})
    with pytest.raises(ValueError, match=r"top_k=0: must be >= 1"):
        RunConfig(run_dir="r", shared={"top_k": 0}, stages={"01_retrieval": {}})
    with pytest.raises(ValueError, match=r"loss='ppo': must be one of dpo, rdpo"):
        RunConfig(run_dir="r", stages={"04_training": {"loss": "ppo"}})
    with pytest.raises(ValueError, match=r"fill_mode='slots': must be one of slot, instruction"):
        RunConfig(run_dir="r", stages={"03_induction": {"fill_mode": "slots"}})
    with pytest.raises(ValueError, match="unknown stage '07_nothing'"):
        RunConfig(run_dir="r", stages={"07_nothing": {}})
    with pytest.raises(TypeError, match="'seed' must be a non-negative integer"):
        RunConfig(run_dir="r", seed="0")
    with pytest.raises(TypeError, match="'seed' must be a non-negative integer, got -1"):
        RunConfig(run_dir="r", seed=-1, stages={"01_retrieval": {}})
    with pytest.raises(ValueError, match=r"01_retrieval.seed=-1: must be >= 0"):
        RunConfig(run_dir="r", stages={"01_retrieval": {"seed": -1}})
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nmodel: x\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown top-level key 'model'; allowed: base, run_dir.*model_path"):
        load_config(p)
    p.write_text("run_dir: r\nstages:\n  '04_training':\n    beta: 0.1\n    beta: 0.2\n")
    with pytest.raises(ValueError, match=r"key 'beta' given twice"):
        load_config(p)
    p.write_text("run_dir: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("base: c.yaml\nrun_dir: r\n")
    with pytest.raises(ValueError, match="loops back"):
        load_config(p)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nstages:\n  '04_training':\n    learning_rate: 1e-4\n")  # YAML 1.1 reads text
    assert TrainingStage(**load_config(p).parameters("04_training")).learning_rate == 1e-4


def test_overrides(root):
    cfg = load_config(root / "configs" / "tiny_world.yaml", ["seed=3", "00_tiny_world.n_train=500", "run_dir=runs/x",
                                                             "model_path=/m", "04_training.learning_rate=1e-3"])
    assert cfg.seed == 3 and cfg.run_dir == "runs/x" and cfg.stages["00_tiny_world"]["n_train"] == 500
    assert cfg.parameters("01_retrieval")["model_path"] == cfg.parameters("05_evaluation")["model_path"] == "/m"
    assert cfg.parameters("04_training")["learning_rate"] == 1e-3
    assert parse_override("a.b=true") == ("a.b", True) and parse_override("lr=5e-4") == ("lr", 5e-4)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("seed")
    # a stage override reaches every variant of it; a variant override only that one
    cmp = load_config(root / "configs" / "tiny_world_ablations.yaml",
                      ["04_training.beta=0.2", "04_training/rdpo_seed1.beta=0.3"])
    betas = {s: cmp.parameters(s)["beta"] for s in cmp.stages if s.startswith("04_training/")}
    assert betas.pop("04_training/rdpo_seed1") == 0.3 and set(betas.values()) == {0.2}


def test_stage_variants_and_the_matrix(root):
    cfg = RunConfig(run_dir="r", seed=7, stages={"04_training/dpo_seed1": {"loss": "dpo", "seed": 1},
                                                 "04_training/rdpo_seed0": {"loss": "rdpo"}})
    assert cfg.parameters("04_training/dpo_seed1") == {"run_dir": "r", "seed": 1, "loss": "dpo",
                                                       "output_name": "dpo_seed1"}
    assert cfg.parameters("04_training/rdpo_seed0")["seed"] == 7  # the top-level seed unless a stage sets one
    with pytest.raises(ValueError, match="unknown parameter 'los'"):
        RunConfig(run_dir="r", stages={"04_training/x": {"los": "dpo"}})
    for bad in ("04_training/", "04_training/a b", "04_training/../x", "04_training/a.b"):
        with pytest.raises(ValueError, match="variant"):
            RunConfig(run_dir="r", stages={bad: {}})
    with pytest.raises(ValueError, match="set run_dir once"):
        RunConfig(run_dir="r", stages={"04_training/x": {"run_dir": "elsewhere"}})
    # the plain key holds what the variants share and does not run by itself
    cfg = RunConfig(run_dir="r", stages={"04_training": {"beta": 0.3, "loss": "dpo"},
                                         "04_training/{loss}_s{seed}": {"matrix": {"loss": ["dpo", "rdpo"],
                                                                                   "seed": [0, 1]}}})
    assert list(cfg.stages) == ["04_training/dpo_s0", "04_training/dpo_s1", "04_training/rdpo_s0",
                                "04_training/rdpo_s1"]
    assert all(cfg.parameters(s)["beta"] == 0.3 for s in cfg.stages)
    assert cfg.parameters("04_training/rdpo_s1")["loss"] == "rdpo"
    with pytest.raises(ValueError, match=r"placeholder 'x' is not a matrix axis"):
        expand_matrix("04_training/{x}", {"matrix": {"loss": ["dpo"]}})
    with pytest.raises(ValueError, match="both named"):
        expand_matrix("04_training/{loss}", {"matrix": {"loss": ["dpo"], "seed": [0, 1]}})
    cmp = load_config(root / "configs" / "tiny_world_ablations.yaml")
    runs = [s.split("/", 1)[1] for s in cmp.stages if s.startswith("04_training/")]
    # every condition over the same three seeds, with the same steps and learning rate
    assert sorted({r.rsplit("_seed", 1)[1] for r in runs}) == ["0", "1", "2"] and len(runs) == 15
    assert runs[:5] == ["dpo_seed0", "rdpo_seed0", "mdpo_seed0", "dpo_swap_seed0", "dpo_corrupt_seed0"]
    assert len({(cmp.parameters(f"04_training/{r}")["max_steps"], cmp.parameters(f"04_training/{r}")["learning_rate"])
                for r in runs}) == 1
    assert cmp.parameters("04_training/dpo_swap_seed2")["preferences"] == "baseline_random_swap.jsonl"
    assert cmp.parameters("04_training/dpo_swap_seed2")["seed"] == 2
    # the README's comparison: the main chain's recipe, DPO and rDPO paired over 3 worlds x 3 seeds, test images
    main, cmp = load_config(root / "configs" / "tiny_world.yaml"), load_config(root / "configs" / "tiny_world_comparison.yaml")
    runs = [s.split("/", 1)[1] for s in cmp.stages if s.startswith("04_training/")]
    assert sorted(runs) == sorted(f"{c}_seed{i}" for c in ("dpo", "rdpo") for i in range(3)) and cmp.worlds == [0, 1, 2]
    for r in runs:
        p = cmp.parameters(f"04_training/{r}")
        assert p["seed"] == int(r[-1]) and p["loss"] == r.split("_")[0]
        assert {k: v for k, v in p.items() if k not in ("seed", "loss", "output_name", "run_dir")} == \
            {k: v for k, v in main.parameters("04_training").items() if k not in ("seed", "loss", "run_dir")}
    for stage in ("00_tiny_world", "01_retrieval", "02_masking", "03_induction"):
        assert dict(cmp.parameters(stage), run_dir="") == dict(main.parameters(stage), run_dir=""), stage
    assert cmp.parameters("05_evaluation").get("eval_split", "test") == "test"


def test_notebook_checks_its_parameters():
    """What papermill injects is checked in the notebook's first cell, naming the parameter."""
    with pytest.raises(ValueError, match=r"04_training.seed=-1: must be >= 0"):
        TrainingStage.from_namespace({"seed": -1, "unrelated": 1})
    stage = TrainingStage.from_namespace({"loss": "dpo", "lora_r": 16, "lora_alpha": 32})
    pc = stage.preference_config()
    assert type(pc) is PreferenceConfig and (pc.loss, pc.lora_r, pc.lora_alpha) == ("dpo", 16, 32)


@pytest.mark.parametrize("text, message", [
    ("run_dir: r\n", r"no stages to run"),
    ("run_dir: r\nstages:\n", r"no stages to run"),
    ("run_dir: r\nstages: {}\n", r"no stages to run"),
    ("run_dir: r\nstages:\n  - 00_tiny_world\n", r"'stages' must be a mapping .* got list"),
])
def test_a_recipe_without_stages_says_so(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises((ValueError, TypeError), match=message):
        load_config(p)


def test_run_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = RunConfig(run_dir="~/runs/x", stages={"01_retrieval": {}})
    assert cfg.run_dir == str(tmp_path / "runs" / "x") and cfg.parameters("01_retrieval")["run_dir"] == cfg.run_dir


def test_the_notebook_gets_the_values_the_check_converted(tmp_path):
    """YAML 1.1 reads 9e-1 as text: the check converts it, and the notebook is handed the number."""
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nstages:\n  '03_induction':\n    tau: 9e-1\n    stop_margin: 1e0\n"
                 "    min_length_ratio: 5e-1\n  '00_tiny_world':\n    short_answer_share: 1e-1\n")
    cfg = load_config(p)
    params = cfg.parameters("03_induction")
    assert params["tau"] == 0.9 and isinstance(params["tau"], float) and params["stop_margin"] == 1.0
    assert params["min_length_ratio"] == 0.5 and cfg.parameters("00_tiny_world")["short_answer_share"] == 0.1


def test_set_on_a_stage_the_config_does_not_have_is_an_error(root):
    with pytest.raises(ValueError, match=r"has no stage '04_training/rdpo_sed0'"):
        load_config(root / "configs" / "tiny_world_comparison.yaml", ["04_training/rdpo_sed0.beta=0.2"])
    with pytest.raises(ValueError, match=r"has no stage '06_nothing'"):
        load_config(root / "configs" / "tiny_world.yaml", ["06_nothing.beta=0.2"])


def test_variants_that_would_write_one_folder_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"'04_training/a' and '04_training/b' would both write 04_training/same"):
        RunConfig(run_dir="r", stages={"04_training/a": {"output_name": "same"}, "04_training/b": {"output_name": "same"}})
    with pytest.raises(ValueError, match="would both write 04_training/rdpo_seed0"):  # a variant named like the default
        RunConfig(run_dir="r", stages={"04_training/x": {"loss": "rdpo"}, "04_training/y": {"output_name": "rdpo_seed0"},
                                       "04_training/z": {"output_name": "rdpo_seed0", "loss": "dpo"}})
    p = tmp_path / "c.yaml"  # an explicit key and a matrix variant of the same name
    p.write_text("run_dir: r\nstages:\n  '04_training/rdpo_seed0': {beta: 0.5}\n"
                 "  '04_training/{loss}_seed{seed}': {matrix: {loss: [dpo, rdpo], seed: [0, 1]}}\n")
    with pytest.raises(ValueError, match="'04_training/rdpo_seed0' is given twice"):
        load_config(p)


def test_a_matrix_in_a_recipe_replaces_the_base_recipes_variants_of_its_names(tmp_path):
    """tiny_world_smoke.yaml names 04_training/rdpo_seed0 and dpo_seed0; a recipe built on it with a matrix
    that names them too replaces them (the file that says more wins); within one file the same name twice
    is an error."""
    root = Path(__file__).resolve().parents[1]
    p = tmp_path / "c.yaml"
    p.write_text(f"base: {root / 'configs' / 'tiny_world_smoke.yaml'}\nstages:\n"
                 "  '04_training/{loss}_seed{seed}': {matrix: {loss: [dpo, rdpo], seed: [0, 1]}, beta: 0.3}\n")
    cfg = load_config(p)
    runs = [s for s in cfg.stages if s.startswith("04_training/")]
    assert sorted(runs) == sorted(f"04_training/{l}_seed{s}" for l in ("dpo", "rdpo") for s in (0, 1))
    assert all(cfg.parameters(s)["beta"] == 0.3 for s in runs)


def test_worlds_run_the_stages_before_05_per_world_and_05_once_over_all(tmp_path):
    """`worlds: [3, 5]`: stages 00-04 in <run_dir>/world3 and world5 (stage 00's seed = the world seed,
    the others keep theirs), then 05 once in run_dir with the world folders as its `worlds`."""
    cfg_file = tmp_path / "w.yaml"
    cfg_file.write_text("run_dir: r\nseed: 7\nworlds: [3, 5]\nstages:\n  '00_tiny_world': {}\n  '01_retrieval': {}\n"
                        "  '04_training/rdpo_seed{seed}':\n    matrix: {seed: [0, 1]}\n    loss: rdpo\n"
                        "  '05_evaluation': {}\n")
    plan = load_config(cfg_file).plan()
    assert [(f, s) for s, f, _ in plan] == [
        ("world3", "00_tiny_world"), ("world3", "01_retrieval"), ("world3", "04_training/rdpo_seed0"),
        ("world3", "04_training/rdpo_seed1"), ("world5", "00_tiny_world"), ("world5", "01_retrieval"),
        ("world5", "04_training/rdpo_seed0"), ("world5", "04_training/rdpo_seed1"), ("", "05_evaluation")]
    seeds = [p["seed"] for _, _, p in plan]
    assert seeds == [3, 7, 0, 1, 5, 7, 0, 1, 7]
    assert plan[-1][2]["worlds"] == ["world3", "world5"]
    assert all("worlds" not in p for _, _, p in plan[:-1])
    plain = load_config(cfg_file.parent / "w.yaml", ["worlds=[]"]).plan()
    assert [f for _, f, _ in plain] == [""] * 5 and "worlds" not in plain[-1][2]
    for bad, message in (("[1, 1]", "names a world seed twice"), ("[-1]", "non-negative integers"),
                         ("three", "non-negative integers")):
        with pytest.raises((TypeError, ValueError), match=message):
            load_config(cfg_file, [f"worlds={bad}"])
