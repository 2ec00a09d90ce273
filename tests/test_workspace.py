"""Where a relative run_dir points, and what a notebook does when the stages it needs are missing."""
import os

import pytest

from realign_lib.run import workspace


def test_a_relative_run_dir_is_under_the_repository_wherever_the_kernel_starts(root, monkeypatch, tmp_path):
    monkeypatch.delenv("REALIGN_HOME", raising=False)
    assert workspace.repo_root() == root
    for cwd in (root, root / "notebooks", tmp_path):
        monkeypatch.chdir(cwd)
        assert workspace.resolve_run_dir("runs/tiny_world") == root / "runs" / "tiny_world"
    assert workspace.resolve_run_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path))
    assert workspace.resolve_run_dir("runs/a") == tmp_path / "runs" / "a"


def test_the_cli_resolves_run_dir_like_the_notebooks(root, monkeypatch, tmp_path, capsys):
    """`realign run` from another folder with a relative run_dir writes under $REALIGN_HOME, not the cwd."""
    from realign_lib.run.cli import main

    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    # run_dir resolved under $REALIGN_HOME is a file there: refused, naming that path (nothing runs)
    (tmp_path / "home" / "runs").mkdir(parents=True)
    (tmp_path / "home" / "runs" / "r").write_text("not a folder")
    assert main(["run", "--config", str(root / "configs" / "tiny_world_smoke.yaml"), "--set", "run_dir=runs/r"]) == 2
    assert f"run_dir {tmp_path / 'home' / 'runs' / 'r'} is a file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert os.environ.get(workspace.CHAIN_ENV) is None


def test_stage_outputs_are_seen_with_or_without_a_marker(tmp_path):
    run = tmp_path / "run"
    assert not workspace.stage_present(run, "00")
    (run / "data").mkdir(parents=True)
    (run / "data" / "samples.jsonl").write_text("{}\n")  # a notebook run by hand: outputs, no marker
    assert workspace.stage_present(run, "00")
    (run / "01_retrieval").mkdir()
    (run / "01_retrieval" / ".done.json").write_text("{}")  # realign run's marker
    assert workspace.stage_present(run, "01")
    (run / "04_training" / "dpo_seed0").mkdir(parents=True)
    assert not workspace.stage_present(run, "04")
    (run / "04_training" / "dpo_seed0" / "adapter_config.json").write_text("{}")
    assert workspace.stage_present(run, "04")
    assert workspace.ensure_stages(run, ["00", "01"]) == []


def test_inside_a_chain_a_missing_stage_is_an_error_that_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.CHAIN_ENV, "1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "samples.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="02_masking.*--stage 1|01_retrieval, 02_masking"):
        workspace.ensure_stages(tmp_path, ["00", "01", "02"])
