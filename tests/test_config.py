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
