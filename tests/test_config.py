"""Run configs are checked against the notebooks' parameters cells."""
import pytest

from realign_lib.config import RunConfig, load_config, notebook_parameters, parse_override


def test_shipped_configs_load(root):
    for path in sorted((root / "configs").glob("tiny_world*.yaml")):
        cfg = load_config(path)
        assert "00_tiny_world" in cfg.stages
        assert cfg.parameters("00_tiny_world")["run_dir"] == cfg.run_dir


def test_parameters_come_from_the_notebook(root):
    params = notebook_parameters(root / "notebooks" / "00_tiny_world.ipynb")
    assert params["n_train"]["type"] == "int" and params["small_run"]["default"] is False
    assert {"run_dir", "seed", "model_path"} <= set(params)


def test_unknown_keys_and_wrong_types_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter 'n_trian'.*takes:.*n_train"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"n_trian": 5}})
    with pytest.raises(TypeError, match="n_train must be int.*got 'many'"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"n_train": "many"}})
    with pytest.raises(TypeError, match="small_run must be bool"):
        RunConfig(run_dir="r", stages={"00_tiny_world": {"small_run": 1}})
    with pytest.raises(ValueError, match="unknown stage '07_nothing'"):
        RunConfig(run_dir="r", stages={"07_nothing": {}})
    with pytest.raises(TypeError, match="'seed' must be an integer"):
        RunConfig(run_dir="r", seed="0")
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nmodel: x\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown top-level keys \['model'\]"):
        load_config(p)
    p.write_text("run_dir: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_overrides(root):
    cfg = load_config(root / "configs" / "tiny_world.yaml", ["seed=3", "00_tiny_world.n_train=500", "run_dir=runs/x"])
    assert cfg.seed == 3 and cfg.run_dir == "runs/x" and cfg.stages["00_tiny_world"]["n_train"] == 500
    assert parse_override("a.b=true") == ("a.b", True)
    with pytest.raises(ValueError, match="key=value"):
        parse_override("seed")


def test_stage_variants_run_one_notebook_several_times(root):
    cfg = RunConfig(run_dir="r", seed=7, stages={"04_training/dpo_seed1": {"loss": "dpo", "seed": 1},
                                                 "04_training/rdpo_seed0": {"loss": "rdpo"}})
    assert cfg.parameters("04_training/dpo_seed1") == {"run_dir": "r", "seed": 1, "loss": "dpo"}
    assert cfg.parameters("04_training/rdpo_seed0")["seed"] == 7  # the top-level seed unless a stage sets one
    with pytest.raises(ValueError, match="unknown parameter 'los'"):
        RunConfig(run_dir="r", stages={"04_training/x": {"los": "dpo"}})
    for bad in ("04_training/", "04_training/a b", "04_training/../x", "04_training/a.b"):
        with pytest.raises(ValueError, match="variant"):
            RunConfig(run_dir="r", stages={bad: {}})
    with pytest.raises(ValueError, match="set run_dir once"):
        RunConfig(run_dir="r", stages={"04_training/x": {"run_dir": "elsewhere"}})
    cmp = load_config(root / "configs" / "tiny_world_comparison.yaml")
    runs = [s.split("/", 1)[1] for s in cmp.stages if s.startswith("04_training/")]
    # every condition over the same three seeds, with the same steps and learning rate
    assert sorted({r.rsplit("_seed", 1)[1] for r in runs}) == ["0", "1", "2"] and len(runs) == 15
    assert len({(cmp.stages[f"04_training/{r}"]["max_steps"], cmp.stages[f"04_training/{r}"]["learning_rate"])
                for r in runs}) == 1
